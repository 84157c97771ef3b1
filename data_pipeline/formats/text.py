"""The chunked text shard format: tokenised examples as compact WebDataset tar shards (write and read).

A shard is a plain tar file that the ``webdataset`` library reads as it is. Each tar *sample* is a
chunk of many sequences, so that tar and ``.npy`` headers cost almost nothing per token:

``KEY.tokens.npy``
    1-D ``uint16`` (vocabulary < 65,536) or ``uint32`` array: the content tokens of every sequence
    of the chunk, concatenated. Segments are stored without ``[CLS]``/``[SEP]`` framing; the loader
    adds ``[CLS] A [SEP] B [SEP]`` (or ``[CLS] A [SEP]`` when B is empty).
``KEY.seqs.npy``
    ``(n, 3)`` ``uint16`` array, one row per sequence: ``(len_a, len_b, label)``. ``label`` is the
    NSP label (1 = B is a random segment) or the SOP label (1 = A and B swapped); 0 for ``none``.

``KEY`` is ``{split}-{shard:06d}-{chunk:06d}``. Sequence ``i`` of a shard is addressed as
``shard_path:i`` (its index counting from the first chunk).
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
from numpy.typing import NDArray

from data_pipeline.formats.tar import HashingWriter, add_member

# The sentence-pair task whose label each sequence carries (``seqs`` column 2): next-sentence
# prediction, sentence-order prediction, or no task (label always 0).
SENTENCE_TASKS = ("nsp", "sop", "none")
DEFAULT_CHUNK_SEQUENCES = 4096
# BERT specials, at fixed ids in every tokenizer this project trains (SentencePiece control symbols,
# so no input text can produce them).
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(5)


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the five BERT special tokens of one tokenizer, whatever they are ([CLS] is 101 in
    bert-base-uncased); the manifest's ``tokenizer.special_ids`` keys them by ``SPECIAL_TOKENS``."""

    pad: int
    unk: int
    cls: int
    sep: int
    mask: int

    @classmethod
    def from_tokens(cls, ids: Mapping[str, Any], source: str) -> SpecialIds:
        """Read ``{"[PAD]": id, ...}`` (the manifest form).

        Raises:
            ValueError: A token missing or an id that is not a non-negative integer, naming ``source``.
        """
        missing = [token for token in SPECIAL_TOKENS if token not in ids]
        bad = {token: ids[token] for token in SPECIAL_TOKENS if token in ids and not _is_id(ids[token])}
        if missing or bad:
            raise ValueError(f"{source}: special_ids lacks {missing} or has bad ids {bad}; got {dict(ids)}")
        return cls(*(int(ids[token]) for token in SPECIAL_TOKENS))

    def as_tokens(self) -> dict[str, int]:
        """``{"[PAD]": pad, "[UNK]": unk, "[CLS]": cls, "[SEP]": sep, "[MASK]": mask}``."""
        return dict(zip(SPECIAL_TOKENS, self.ids))

    @property
    def ids(self) -> tuple[int, int, int, int, int]:
        """``(pad, unk, cls, sep, mask)``."""
        return (self.pad, self.unk, self.cls, self.sep, self.mask)

    @property
    def never_masked(self) -> tuple[int, int, int, int]:
        """Ids the masker never selects: PAD, CLS, SEP and MASK ([UNK] is content)."""
        return (self.pad, self.cls, self.sep, self.mask)


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# The ids of this project's own SentencePiece tokenizers (`pretrain tokenizer`); any other tokenizer's
# come from the manifest.
SENTENCEPIECE_SPECIAL_IDS = SpecialIds(PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID)


def special_token_count(len_b: int) -> int:
    """Number of framing tokens for a sequence whose B segment has ``len_b`` tokens."""
    return 3 if len_b > 0 else 2


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id of a vocabulary of ``vocab_size``."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


@dataclass(frozen=True)
class Example:
    """One unmasked training sequence before framing: segment A, optional segment B and a label."""

    tokens_a: NDArray[np.integer]
    tokens_b: NDArray[np.integer]
    label: int = 0


@dataclass
class Chunk:
    """A decoded tar sample: the tokens of ``n`` sequences and their ``(len_a, len_b, label)`` rows."""

    key: str
    tokens: NDArray[np.integer]
    seqs: NDArray[np.uint16]
    offsets: NDArray[np.int64] = field(init=False)

    def __post_init__(self) -> None:
        lengths = self.seqs[:, 0].astype(np.int64) + self.seqs[:, 1]
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        if int(self.offsets[-1]) != len(self.tokens):
            raise ValueError(
                f"chunk {self.key}: seqs rows add up to {int(self.offsets[-1])} tokens, "
                f"tokens array holds {len(self.tokens)}"
            )

    def __len__(self) -> int:
        return len(self.seqs)

    def example(self, i: int) -> Example:
        """Sequence ``i`` of this chunk as an :class:`Example`."""
        start, len_a, len_b = int(self.offsets[i]), int(self.seqs[i, 0]), int(self.seqs[i, 1])
        return Example(
            self.tokens[start : start + len_a],
            self.tokens[start + len_a : start + len_a + len_b],
            int(self.seqs[i, 2]),
        )


def _npy_bytes(array: NDArray[Any]) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def encode_chunk(examples: Sequence[Example], dtype: np.dtype) -> tuple[NDArray[Any], NDArray[np.uint16]]:
    """Pack examples into the ``tokens`` and ``seqs`` arrays of one chunk."""
    seqs = np.empty((len(examples), 3), dtype=np.uint16)
    parts: list[NDArray[Any]] = []
    for row, example in enumerate(examples):
        seqs[row] = (len(example.tokens_a), len(example.tokens_b), example.label)
        parts.append(example.tokens_a)
        parts.append(example.tokens_b)
    tokens = np.concatenate(parts).astype(dtype, copy=False) if parts else np.empty(0, dtype)
    return tokens, seqs


@dataclass
class ShardStats:
    """What one written shard holds: the fields of a manifest ``shards[]`` entry."""

    path: str
    samples: int
    tokens: int
    bytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "samples": self.samples,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "sha256": self.sha256,
        }


def write_shard(
    sink: IO[bytes],
    relative_path: str,
    key_prefix: str,
    examples: Iterable[Example],
    vocab_size: int,
    chunk_sequences: int = DEFAULT_CHUNK_SEQUENCES,
) -> ShardStats:
    """Write ``examples`` as one tar shard to ``sink``; the caller owns (and closes) ``sink``.

    Args:
        sink: A binary stream; need not be seekable (any Beam filesystem's ``create``).
        relative_path: The shard's path relative to the output directory, recorded in the stats.
        key_prefix: ``{split}-{shard:06d}``; chunk keys append ``-{chunk:06d}``.
        examples: The sequences, in their final (shuffled) order.
        vocab_size: Picks the token dtype (``uint16`` below 65,536 ids).
        chunk_sequences: Sequences per tar sample. Defaults to 4096.
    """
    dtype = token_dtype(vocab_size)

    def chunks() -> Iterator[tuple[NDArray[Any], NDArray[np.uint16]]]:
        batch: list[Example] = []
        for example in examples:
            batch.append(example)
            if len(batch) >= chunk_sequences:
                yield encode_chunk(batch, dtype)
                batch = []
        if batch:
            yield encode_chunk(batch, dtype)

    return write_chunks(sink, relative_path, key_prefix, chunks())


def write_chunks(
    sink: IO[bytes],
    relative_path: str,
    key_prefix: str,
    chunks: Iterable[tuple[NDArray[Any], NDArray[np.uint16]]],
) -> ShardStats:
    """Write already encoded ``(tokens, seqs)`` chunks as one tar shard (see :func:`write_shard`).

    The chunks must be what :func:`encode_chunk` gives: ``tokens`` in the vocabulary's token dtype
    and ``seqs`` an ``(n, 3)`` ``uint16`` array with ``n >= 1``.
    """
    hashing = HashingWriter(sink)
    samples = tokens = 0
    with tarfile.open(fileobj=hashing, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for chunk_index, (token_array, seqs) in enumerate(chunks):
            key = f"{key_prefix}-{chunk_index:06d}"
            add_member(tar, f"{key}.tokens.npy", _npy_bytes(token_array))
            add_member(tar, f"{key}.seqs.npy", _npy_bytes(seqs))
            samples += len(seqs)
            tokens += len(token_array)
    return ShardStats(relative_path, samples, tokens, hashing.nbytes, hashing.sha256.hexdigest())


def iter_chunks(stream: IO[bytes], name: str = "<stream>") -> Iterator[Chunk]:
    """Decode the chunks of a shard from a binary stream, in file order (no seeking needed)."""
    pending: dict[str, dict[str, NDArray[Any]]] = {}
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, suffix = member.name.partition(".")
            handle = tar.extractfile(member)
            if handle is None or suffix not in ("tokens.npy", "seqs.npy"):
                raise ValueError(f"shard {name}: unexpected member {member.name!r}")
            array = np.load(io.BytesIO(handle.read()), allow_pickle=False)
            parts = pending.setdefault(key, {})
            parts[suffix] = array
            if len(parts) == 2:
                del pending[key]
                yield Chunk(key, parts["tokens.npy"], parts["seqs.npy"])
    if pending:
        raise ValueError(f"shard {name}: incomplete chunks {sorted(pending)}")


def read_shard(path: str) -> list[Chunk]:
    """All chunks of a local shard file."""
    with open(path, "rb") as handle:
        return list(iter_chunks(handle, path))


def chunk_from_sample(sample: dict[str, Any]) -> Chunk:
    """Build a :class:`Chunk` from a ``webdataset`` sample (raw bytes or already-decoded arrays)."""
    arrays = {}
    for suffix in ("tokens.npy", "seqs.npy"):
        value = sample[suffix]
        arrays[suffix] = value if isinstance(value, np.ndarray) else np.load(io.BytesIO(value))
    return Chunk(sample["__key__"], arrays["tokens.npy"], arrays["seqs.npy"])
