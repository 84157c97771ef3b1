"""Compact WebDataset shard format for tokenised examples (write and read); imports no Beam.

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

import hashlib
import io
import json
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
from numpy.typing import NDArray

from data_pipeline.errors import UserError

FORMAT_NAME = "pretrain-chunked-v1"
# Image shards (`pretrain prepare images`): standard WebDataset samples ``KEY.jpg`` + ``KEY.cls``.
IMAGE_FORMAT_NAME = "pretrain-images-v1"
MANIFEST_NAME = "manifest.json"
DEFAULT_CHUNK_SEQUENCES = 4096
# BERT specials, at fixed ids in every tokenizer this project trains (SentencePiece control symbols,
# so no input text can produce them).
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(5)


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


class _HashingWriter(io.RawIOBase):
    """Write-through stream that counts bytes and computes sha256 of everything written."""

    def __init__(self, sink: IO[bytes]) -> None:
        self.sink = sink
        self.sha256 = hashlib.sha256()
        self.nbytes = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sink.write(view)
        self.sha256.update(view)
        self.nbytes += len(view)
        return len(view)


def _npy_bytes(array: NDArray[Any]) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    # Fixed metadata so that the same content always gives byte-identical tars.
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


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
    hashing = _HashingWriter(sink)
    samples = tokens = 0
    with tarfile.open(fileobj=hashing, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for chunk_index, (token_array, seqs) in enumerate(chunks):
            key = f"{key_prefix}-{chunk_index:06d}"
            _add_member(tar, f"{key}.tokens.npy", _npy_bytes(token_array))
            _add_member(tar, f"{key}.seqs.npy", _npy_bytes(seqs))
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


def file_sha256(path: str) -> str:
    """Hex sha256 of a local file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ManifestError(UserError):
    """A manifest that is missing, unreadable or lacks a required field."""


REQUIRED_MANIFEST_KEYS = ("format", "splits", "tokenizer", "seq_len", "objective", "seed", "documents")
REQUIRED_IMAGE_MANIFEST_KEYS = ("format", "splits", "classes", "image_size", "seed", "images", "documents")
# The keys each known format requires, and the command that writes it.
KNOWN_FORMATS = {
    FORMAT_NAME: (REQUIRED_MANIFEST_KEYS, "pretrain prepare text"),
    IMAGE_FORMAT_NAME: (REQUIRED_IMAGE_MANIFEST_KEYS, "pretrain prepare images"),
}


def load_manifest(path: str, expected_format: str | None = FORMAT_NAME) -> dict[str, Any]:
    """Read and check ``manifest.json`` (a file path, or a directory holding it).

    Args:
        path: The manifest file, or the shard directory that holds it.
        expected_format: The format the caller reads; None accepts any known format. Defaults to
            ``FORMAT_NAME`` (tokenised text).
    """
    if not path.endswith(".json"):
        path = path.rstrip("/") + "/" + MANIFEST_NAME
    command = KNOWN_FORMATS[expected_format][1] if expected_format else "pretrain prepare text|images"
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except FileNotFoundError as error:
        raise ManifestError(f"no manifest at {path}: run `{command}` first") from error
    except json.JSONDecodeError as error:
        raise ManifestError(f"manifest {path} is not valid JSON: {error}") from error
    if not isinstance(manifest, dict):
        raise ManifestError(f"manifest {path}: a JSON object expected, found {type(manifest).__name__}")
    found = manifest.get("format")
    # The keys of the format found (or, when that is unknown, of the one expected).
    required = KNOWN_FORMATS.get(found, KNOWN_FORMATS[expected_format or FORMAT_NAME])[0]
    missing = [key for key in required if key not in manifest]
    if missing:
        raise ManifestError(f"manifest {path} lacks keys {missing}")
    if found not in KNOWN_FORMATS or (expected_format is not None and found != expected_format):
        expected = expected_format or " or ".join(KNOWN_FORMATS)
        raise ManifestError(f"manifest {path}: format {found!r}, expected {expected!r}")
    return manifest
