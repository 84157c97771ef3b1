"""BERT example building (NSP, SOP, FULL-SENTENCES) and the shuffle keys of the examples.

Everything here is a pure function of (token arrays, options, seeded rng): no I/O and no Beam, so the unit
tests call it directly. A *document* is a list of sentences, each a 1-D integer array of token ids.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from data_pipeline.formats.text import SEP_ID, Example

Document = list[NDArray[np.integer]]


@dataclass(frozen=True)
class ExampleOptions:
    """How sequences are cut from documents."""

    objective: str = "nsp"
    """``nsp`` (BERT next-sentence), ``sop`` (ALBERT sentence order) or ``none`` (RoBERTa packing)."""
    seq_len: int = 128
    """Sequence length INCLUDING the ``[CLS]``/``[SEP]`` framing tokens."""
    short_seq_prob: float = 0.1
    """Probability that a document's pairs target a random shorter length (``nsp``/``sop``)."""
    sep_id: int = SEP_ID
    """The tokenizer's [SEP] id: ``none`` packing marks document boundaries with it."""

    @property
    def max_content_tokens(self) -> int:
        """Content tokens per sequence: ``seq_len`` minus 3 framing tokens for pairs, 2 for ``none``."""
        return self.seq_len - (2 if self.objective == "none" else 3)


# --------------------------------------------------------------------------------------- pair building


def truncate_pair(
    tokens_a: NDArray[np.integer], tokens_b: NDArray[np.integer], max_tokens: int, rng: random.Random
) -> tuple[NDArray[np.integer], NDArray[np.integer]]:
    """BERT's ``truncate_seq_pair`` in closed form: trim the longer side, one token at a random end.

    BERT removes one token at a time from the longer segment (B on a tie), from the front or the back
    with probability 1/2 each. The number removed from each side follows from the lengths alone, and the
    number of those taken from the front is then Binomial(removed, 1/2): the same distribution, without a
    Python loop per token.
    """
    excess = len(tokens_a) + len(tokens_b) - max_tokens
    if excess <= 0:
        return tokens_a, tokens_b
    balance = min(excess, abs(len(tokens_a) - len(tokens_b)))
    rest = excess - balance
    cut_a, cut_b = rest // 2, rest - rest // 2
    if len(tokens_a) > len(tokens_b):
        cut_a += balance
    else:
        cut_b += balance
    return _trim(tokens_a, cut_a, rng), _trim(tokens_b, cut_b, rng)


def _trim(tokens: NDArray[np.integer], count: int, rng: random.Random) -> NDArray[np.integer]:
    if count == 0:
        return tokens
    front = rng.getrandbits(count).bit_count()  # Binomial(count, 1/2): one fair coin per token
    return tokens[front : len(tokens) - (count - front)]


def _below(rng: random.Random, n: int) -> int:
    """``rng.randrange(n)`` for ``n >= 1``, drawing the very same bits, without its argument checks.

    CPython's ``randrange`` draws ``n.bit_length()`` random bits until the value falls below ``n``;
    this is that loop alone, which example building calls a few times per example.
    """
    if n < 1:
        raise ValueError(f"empty range: nothing below {n}")
    bits = n.bit_length()
    value = rng.getrandbits(bits)
    while value >= n:
        value = rng.getrandbits(bits)
    return value


def _target_length(max_tokens: int, short_seq_prob: float, rng: random.Random) -> int:
    # Short sequences now and then so that the model also sees lengths it meets at fine-tuning time.
    if rng.random() < short_seq_prob:
        return 2 + _below(rng, max_tokens - 1)
    return max_tokens


def _random_segment(
    documents: Sequence[Document], doc_index: int, target_length: int, rng: random.Random
) -> NDArray[np.integer]:
    """Contiguous sentences of another document, from a random start, until ``target_length`` is met."""
    other = doc_index
    if len(documents) > 1:
        other = _below(rng, len(documents) - 1)
        other += other >= doc_index  # skip the document itself
    document = documents[other]
    parts: list[NDArray[np.integer]] = []
    length = 0
    for sentence in document[_below(rng, len(document)) :]:
        parts.append(sentence)
        length += len(sentence)
        if length >= target_length:
            break
    return np.concatenate(parts)


def nsp_examples(
    documents: Sequence[Document],
    doc_index: int,
    max_tokens: int,
    short_seq_prob: float,
    rng: random.Random,
) -> list[Example]:
    """BERT's ``create_instances_from_document`` for document ``doc_index`` (label 1 = B is random).

    One deliberate change keeps the random-next share at 1/2: a chunk of a single sentence is split
    inside that sentence for a true continuation, where BERT always made it a random next (which pushes
    the random share above 1/2 when sentences are long). Only a one-token chunk is forced random.
    """
    document = documents[doc_index]
    target = _target_length(max_tokens, short_seq_prob, rng)
    examples: list[Example] = []
    last = len(document) - 1
    # The chunk is document[start : i + 1], kept as bounds: a one-sentence side is used as it is,
    # without the copy np.concatenate would make.
    start, length, i = 0, 0, 0
    while i <= last:
        length += len(document[i])
        if i == last or length >= target:
            size = i + 1 - start
            a_end = 1 + _below(rng, size - 1) if size >= 2 else 1
            tokens_a = _joined(document, start, start + a_end)
            random_next = rng.random() < 0.5 or (size == 1 and len(tokens_a) < 2)
            if random_next:
                tokens_b = _random_segment(documents, doc_index, target - len(tokens_a), rng)
                i -= size - a_end  # the unused sentences start the next chunk
            elif size == 1:
                cut = 1 + _below(rng, len(tokens_a) - 1)
                tokens_a, tokens_b = tokens_a[:cut], tokens_a[cut:]
            else:
                tokens_b = _joined(document, start + a_end, i + 1)
            tokens_a, tokens_b = truncate_pair(tokens_a, tokens_b, max_tokens, rng)
            examples.append(Example(tokens_a, tokens_b, int(random_next)))
            start, length = i + 1, 0
        i += 1
    return examples


def _joined(document: Document, start: int, end: int) -> NDArray[np.integer]:
    """Sentences ``start:end`` of ``document`` as one array (the sentence itself when there is one)."""
    return document[start] if end - start == 1 else np.concatenate(document[start:end])


def sop_examples(
    document: Document, max_tokens: int, short_seq_prob: float, rng: random.Random
) -> list[Example]:
    """ALBERT sentence-order pairs: A and B consecutive, swapped with probability 1/2 (label 1 = swapped).

    A single-sentence chunk is split inside the sentence; a one-token chunk cannot form a pair and is
    left out.
    """
    target = _target_length(max_tokens, short_seq_prob, rng)
    examples: list[Example] = []
    chunk: list[NDArray[np.integer]] = []
    length = 0
    for i, sentence in enumerate(document):
        chunk.append(sentence)
        length += len(sentence)
        if i < len(document) - 1 and length < target:
            continue
        if len(chunk) >= 2:
            a_end = 1 + _below(rng, len(chunk) - 1)
            tokens_a, tokens_b = np.concatenate(chunk[:a_end]), np.concatenate(chunk[a_end:])
        elif length >= 2:
            cut = 1 + _below(rng, length - 1)
            tokens_a, tokens_b = chunk[0][:cut], chunk[0][cut:]
        else:
            chunk, length = [], 0
            continue
        swapped = rng.random() < 0.5
        if swapped:
            tokens_a, tokens_b = tokens_b, tokens_a
        tokens_a, tokens_b = truncate_pair(tokens_a, tokens_b, max_tokens, rng)
        examples.append(Example(tokens_a, tokens_b, int(swapped)))
        chunk, length = [], 0
    return examples


def full_sentence_examples(
    documents: Sequence[Document], max_tokens: int, sep_id: int = SEP_ID
) -> list[tuple[int, Example]]:
    """RoBERTa FULL-SENTENCES: contiguous sentences packed up to ``max_tokens``, crossing documents.

    A ``[SEP]`` token marks each document boundary inside a sequence (never first or last). Returns
    ``(index of the document the sequence starts in, example)`` pairs; ``len_b`` is always 0.
    """
    examples: list[tuple[int, Example]] = []
    parts: list[NDArray[np.integer]] = []
    length, origin = 0, 0
    separator = np.array([sep_id], dtype=np.int64)

    def flush() -> None:
        nonlocal parts, length
        if parts and parts[-1] is separator:
            parts.pop()
        if parts:
            examples.append((origin, Example(np.concatenate(parts), np.empty(0, np.int64), 0)))
        parts, length = [], 0

    for doc_index, document in enumerate(documents):
        if parts:
            parts.append(separator)
            length += 1
        for sentence in document:
            if length + len(sentence) > max_tokens:
                flush()
            if not parts:
                origin = doc_index
            parts.append(sentence)
            length += len(sentence)
    flush()
    return examples


def cap_sentences(document: Document, max_tokens: int) -> Document:
    """Drop empty sentences and cut any sentence longer than ``max_tokens`` to its first ``max_tokens``."""
    return [sentence[:max_tokens] for sentence in document if len(sentence)]


# ------------------------------------------------------------------------------------ bucket building


_SORT_KEY_SUFFIX = struct.Struct("<QI")


def example_sort_key(seed: int, doc_hash: bytes, example_index: int, dupe: int) -> int:
    """The 64-bit global-shuffle key of an example; also picks its shard (``key % num_shards``)."""
    return _sort_key(_sort_key_prefix(seed, doc_hash), example_index, dupe)


def _sort_key_prefix(seed: int, doc_hash: bytes) -> bytes:
    # The part of the hashed payload shared by every example of a document.
    return struct.pack("<Q", seed % (1 << 64)) + doc_hash


def _sort_key(prefix: bytes, example_index: int, dupe: int) -> int:
    payload = prefix + _SORT_KEY_SUFFIX.pack(example_index, dupe)
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little")


def bucket_rng(seed: int, split: str, bucket: int, dupe: int) -> random.Random:
    """The random stream of one (split, bucket, dupe): independent of element order and worker count.

    Python's generator rather than numpy's: example building draws a few numbers at a time, where
    numpy's per-call overhead would dominate.
    """
    key = hashlib.blake2b(f"{seed}/{split}/{bucket}/{dupe}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(key, "little"))


def build_bucket_examples(
    documents: Sequence[Document],
    doc_hashes: Sequence[bytes],
    options: ExampleOptions,
    seed: int,
    split: str,
    bucket: int,
    dupe: int,
) -> list[tuple[int, Example]]:
    """All examples of one bucket for one dupe pass, each with its sort key.

    Args:
        documents: The bucket's documents, sorted by hash; sentences need not be capped yet.
        doc_hashes: ``document_hash`` of each document (same order).
        options: Objective and lengths.
        seed: The job seed.
        split: ``train`` or ``val``.
        bucket: The bucket id within the split.
        dupe: Which of the ``dupe_factor`` passes this is (each has its own random stream).
    """
    capped, hashes = capped_documents(documents, doc_hashes, options)
    return build_pass_examples(capped, hashes, options, seed, split, bucket, dupe)


def capped_documents(
    documents: Sequence[Document], doc_hashes: Sequence[bytes], options: ExampleOptions
) -> tuple[list[Document], list[bytes]]:
    """Documents with their sentences capped (:func:`cap_sentences`), empty ones left out with their hash.

    Done once per bucket and shared by all of its dupe passes (see :func:`build_pass_examples`).
    """
    max_tokens = options.max_content_tokens
    capped = [cap_sentences(document, max_tokens) for document in documents]
    keep = [i for i, document in enumerate(capped) if document]
    return [capped[i] for i in keep], [doc_hashes[i] for i in keep]


def build_pass_examples(
    capped: Sequence[Document],
    hashes: Sequence[bytes],
    options: ExampleOptions,
    seed: int,
    split: str,
    bucket: int,
    dupe: int,
) -> list[tuple[int, Example]]:
    """:func:`build_bucket_examples` for documents already passed through :func:`capped_documents`."""
    rng = bucket_rng(seed, split, bucket, dupe)
    max_tokens = options.max_content_tokens
    if options.objective == "none":
        order = list(range(len(capped)))
        rng.shuffle(order)  # a different packing per dupe pass
        packed = full_sentence_examples([capped[i] for i in order], max_tokens, options.sep_id)
        tagged = [(order[origin], example) for origin, example in packed]
    elif options.objective == "nsp":
        tagged = [
            (i, example)
            for i in range(len(capped))
            for example in nsp_examples(capped, i, max_tokens, options.short_seq_prob, rng)
        ]
    else:
        tagged = [
            (i, example)
            for i, document in enumerate(capped)
            for example in sop_examples(document, max_tokens, options.short_seq_prob, rng)
        ]
    prefixes = [_sort_key_prefix(seed, doc_hash) for doc_hash in hashes]
    counters = [0] * len(capped)
    keyed = []
    for origin, example in tagged:
        index = counters[origin]
        counters[origin] = index + 1
        keyed.append((_sort_key(prefixes[origin], index, dupe), example))
    return keyed
