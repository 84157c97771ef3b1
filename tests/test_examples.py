"""Unit tests of the pure example builders, partitioning helpers and codecs (no Beam)."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest

from data_pipeline.formats.text import CLS_ID, MASK_ID, SENTENCE_TASKS, SEP_ID, Example, special_token_count
from data_pipeline.text import codec, splits
from data_pipeline.text import examples as ex


def make_documents(count: int, seed: int = 0, sentence_range: tuple[int, int] = (3, 20)) -> list[ex.Document]:
    """Random documents of 4-30 sentences of ids >= 5 (never a special id)."""
    rng = np.random.default_rng(seed)
    return [
        [
            rng.integers(5, 8000, size=int(rng.integers(*sentence_range)))
            for _ in range(int(rng.integers(4, 30)))
        ]
        for _ in range(count)
    ]


def hashes(count: int) -> list[bytes]:
    return sorted(hashlib.blake2b(str(i).encode(), digest_size=16).digest() for i in range(count))


def build(objective: str, seq_len: int = 64, short: float = 0.1, dupe: int = 0, docs=None, seed: int = 7):
    documents = make_documents(200) if docs is None else docs
    options = ex.ExampleOptions(objective, seq_len, short)
    return ex.build_bucket_examples(documents, hashes(len(documents)), options, seed, "train", 3, dupe)


def framed(example: Example) -> list[int]:
    """The sequence as the loader frames it: [CLS] A [SEP] (B [SEP])."""
    tokens = [CLS_ID, *example.tokens_a.tolist(), SEP_ID]
    if len(example.tokens_b):
        tokens += [*example.tokens_b.tolist(), SEP_ID]
    return tokens


@pytest.mark.parametrize("objective", SENTENCE_TASKS)
@pytest.mark.parametrize("seq_len", [8, 64, 128])
def test_length_never_exceeds_seq_len_after_framing(objective: str, seq_len: int) -> None:
    keyed = build(objective, seq_len, docs=make_documents(60, sentence_range=(1, 300)))
    assert keyed
    for _, example in keyed:
        content = len(example.tokens_a) + len(example.tokens_b)
        assert content + special_token_count(len(example.tokens_b)) <= seq_len
        assert len(example.tokens_a) >= 1
        if objective == "none":
            assert len(example.tokens_b) == 0 and example.label == 0
        else:
            assert len(example.tokens_b) >= 1


@pytest.mark.parametrize("objective", SENTENCE_TASKS)
def test_special_tokens_only_from_framing(objective: str) -> None:
    for _, example in build(objective):
        tokens = framed(example)
        assert tokens[0] == CLS_ID and tokens[-1] == SEP_ID
        assert CLS_ID not in tokens[1:] and MASK_ID not in tokens
        seps = [i for i, token in enumerate(tokens) if token == SEP_ID]
        if objective == "none":
            assert seps[-1] == len(tokens) - 1 and 1 not in seps  # document separators sit inside
        else:
            assert seps == [len(example.tokens_a) + 1, len(tokens) - 1]


def binomial_bounds(n: int, p: float = 0.5, sigmas: float = 4.0) -> tuple[float, float]:
    spread = sigmas * (p * (1 - p) / n) ** 0.5
    return p - spread, p + spread


def test_random_next_share_is_one_half() -> None:
    labels = np.array([example.label for _, example in build("nsp", 128)])
    low, high = binomial_bounds(len(labels))
    assert len(labels) > 500
    assert low < labels.mean() < high


def test_random_next_segment_comes_from_another_document() -> None:
    # Two documents with disjoint vocabularies: a random B must use the other one's ids.
    docs = [[np.arange(10, 20)] * 20, [np.arange(100, 110)] * 20]
    for _, example in build("nsp", 32, short=0.0, docs=docs):
        a_low = example.tokens_a.min() >= 100
        b_low = example.tokens_b.min() >= 100
        assert (a_low != b_low) == bool(example.label)


def test_sop_swap_share_and_order() -> None:
    docs = [[100 * i + np.arange(5, 10) for i in range(40)] for _ in range(50)]  # ids grow along the text
    keyed = build("sop", 32, docs=docs)
    labels = np.array([example.label for _, example in keyed])
    low, high = binomial_bounds(len(labels))
    assert low < labels.mean() < high
    for _, example in keyed:
        in_order = example.tokens_a.max() < example.tokens_b.min()
        assert in_order != bool(example.label)


def test_none_packs_across_documents_with_sep() -> None:
    docs = [[np.full(3, 10 + d)] * 2 for d in range(30)]  # 6-token documents
    keyed = build("none", 32, docs=docs)
    for _, example in keyed:
        tokens = example.tokens_a
        assert len(tokens) <= 30
        assert SEP_ID in tokens.tolist()
        # Each SEP separates two different documents.
        for i in np.flatnonzero(tokens == SEP_ID):
            assert tokens[i - 1] != tokens[i + 1]
    assert sum(len(e.tokens_a) - int((e.tokens_a == SEP_ID).sum()) for _, e in keyed) == 30 * 6


def test_short_seq_prob_shortens_sequences() -> None:
    lengths = {}
    for prob in (0.0, 0.5):
        keyed = build("nsp", 128, short=prob)
        lengths[prob] = np.array([len(e.tokens_a) + len(e.tokens_b) for _, e in keyed])
    assert (lengths[0.5] < 60).mean() > (lengths[0.0] < 60).mean() + 0.1


def test_deterministic_under_seed_and_different_per_dupe() -> None:
    def fingerprint(keyed):
        return [(key, e.tokens_a.tolist(), e.tokens_b.tolist(), e.label) for key, e in keyed]

    assert fingerprint(build("nsp")) == fingerprint(build("nsp"))
    assert fingerprint(build("nsp")) != fingerprint(build("nsp", dupe=1))
    assert fingerprint(build("nsp")) != fingerprint(build("nsp", seed=8))
    keys = [key for key, _ in build("nsp")]
    assert len(set(keys)) == len(keys)


def test_truncate_pair_trims_the_longer_side() -> None:
    rng = random.Random(0)
    a, b = ex.truncate_pair(np.arange(100), np.arange(10), 50, rng)
    assert (len(a), len(b)) == (40, 10)
    assert a[0] + 40 + (99 - a[-1]) == 100  # a contiguous window of the original
    a, b = ex.truncate_pair(np.arange(10), np.arange(10), 15, rng)
    assert (len(a), len(b)) == (8, 7)  # ties trim B first, as BERT does
    a, b = ex.truncate_pair(np.arange(1), np.arange(500), 2, rng)
    assert (len(a), len(b)) == (1, 1)


def test_split_bucket_and_shard_helpers() -> None:
    low = bytes(8) + bytes(range(8))
    high = b"\xff" * 16
    assert splits.split_of(low, 0.005) == "val" and splits.split_of(high, 0.005) == "train"
    assert splits.split_of(low, 0.0) == "train"
    all_hashes = hashes(20000)
    share = np.mean([splits.split_of(h, 0.1) == "val" for h in all_hashes])
    assert 0.09 < share < 0.11
    assert splits.bucket_count(0) == 1 and splits.bucket_count(1000) == 1 and splits.bucket_count(1001) == 2
    assert splits.shard_count(0, 128) == 1 and splits.shard_count(300 * 2**20, 128) == 3
    assert all(0 <= splits.bucket_of(h, 7) < 7 for h in all_hashes[:100])
    options = ex.ExampleOptions("nsp", 128)
    assert splits.planned_shards(1000, 1, options, 2, 128) == 1
    # 300M uint16 tokens in ~2.4M sequences: about 587 MiB -> 5 shards of 128 MiB.
    assert splits.planned_shards(300_000_000, 1, options, 2, 128) == 5
    assert splits.planned_shards(300_000_000, 2, options, 2, 128) == 10


def test_codecs_round_trip() -> None:
    sentences = [[5, 6, 7], [], [70000, 8]]
    document = codec.unpack_document(codec.pack_document(sentences, np.dtype(np.uint32)))
    assert [s.tolist() for s in document] == sentences
    assert codec.unpack_document(codec.pack_document([], np.dtype(np.uint16))) == []
    example = Example(np.array([5, 6]), np.array([7]), 1)
    blob = codec.pack_example(example, np.dtype(np.uint16))
    back = codec.unpack_example(blob)
    assert (back.tokens_a.tolist(), back.tokens_b.tolist(), back.label) == ([5, 6], [7], 1)
    assert codec.example_token_count(blob) == 3
    assert codec.document_token_count(codec.pack_document(sentences, np.dtype(np.uint32))) == 5


def test_select_representatives_keeps_smallest_source_index() -> None:
    h1, h2 = b"\x01" * 16, b"\x02" * 16
    records = [(h1, "b.txt", 0, b"x"), (h2, "a.txt", 5, b"y"), (h1, "a.txt", 9, b"z"), (h1, "a.txt", 3, b"w")]
    kept, duplicates = splits.select_representatives(records)
    assert kept == [(h1, "a.txt", 3, b"w"), (h2, "a.txt", 5, b"y")]
    assert duplicates == [(h1, "a.txt", 9, b"z"), (h1, "b.txt", 0, b"x")]


def random_blob_examples(count: int, seed: int) -> list[Example]:
    rng = np.random.default_rng(seed)
    return [
        Example(rng.integers(5, 9000, rng.integers(1, 40)), rng.integers(5, 9000, rng.integers(0, 40)), i % 2)
        for i in range(count)
    ]


def test_chunk_arrays_from_blobs_equal_encode_chunk() -> None:
    from data_pipeline.formats.text import encode_chunk

    dtype = np.dtype(np.uint16)
    examples = random_blob_examples(300, seed=5)
    tokens, seqs = codec.encode_example_blobs([codec.pack_example(e, dtype) for e in examples], dtype)
    expected_tokens, expected_seqs = encode_chunk(examples, dtype)
    assert np.array_equal(tokens, expected_tokens) and tokens.dtype == expected_tokens.dtype
    assert np.array_equal(seqs, expected_seqs)
