"""The compact blobs that carry documents and examples between the stages of the `prepare text` job.

A blob is a few header bytes and raw little-endian token arrays: far cheaper for the runner to move
and for numpy to read back than pickled arrays. Pure functions, no Beam.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from itertools import accumulate, chain
from typing import Any

import numpy as np
from numpy.typing import NDArray

from data_pipeline.formats.text import Example
from data_pipeline.text.examples import Document

_DOC_HEADER = struct.Struct("<BI")
_EXAMPLE_HEADER = struct.Struct("<BHHB")


def pack_document(sentences: Sequence[Sequence[int]], dtype: np.dtype) -> bytes:
    """Tokenised sentences as one compact blob: itemsize, count, uint32 lengths, then the tokens."""
    lengths = np.fromiter((len(sentence) for sentence in sentences), np.uint32, count=len(sentences))
    tokens = np.fromiter(chain.from_iterable(sentences), dtype, count=int(lengths.sum()))
    return _DOC_HEADER.pack(dtype.itemsize, len(sentences)) + lengths.tobytes() + tokens.tobytes()


def unpack_document(blob: bytes) -> Document:
    """Inverse of :func:`pack_document` (arrays are read-only views of ``blob``)."""
    itemsize, count = _DOC_HEADER.unpack_from(blob)
    lengths = np.frombuffer(blob, np.uint32, count, _DOC_HEADER.size)
    tokens = np.frombuffer(blob, np.dtype(f"<u{itemsize}"), offset=_DOC_HEADER.size + 4 * count)
    # Python's accumulate beats np.cumsum's call overhead for the ~30 sentences of a document, and
    # plain slicing beats np.split.
    ends = list(accumulate(lengths.tolist()))
    return [tokens[start:end] for start, end in zip([0, *ends[:-1]], ends)]


def document_token_count(blob: bytes) -> int:
    """Tokens of a packed document, from its size alone."""
    itemsize, count = _DOC_HEADER.unpack_from(blob)
    return (len(blob) - _DOC_HEADER.size - 4 * count) // itemsize


def pack_example(example: Example, dtype: np.dtype) -> bytes:
    """One example as a blob: itemsize, len_a, len_b, label, then the A and B tokens."""
    header = _EXAMPLE_HEADER.pack(dtype.itemsize, len(example.tokens_a), len(example.tokens_b), example.label)
    return (
        header
        + np.asarray(example.tokens_a).astype(dtype, copy=False).tobytes()
        + np.asarray(example.tokens_b).astype(dtype, copy=False).tobytes()
    )


def unpack_example(blob: bytes) -> Example:
    """Inverse of :func:`pack_example`."""
    itemsize, len_a, len_b, label = _EXAMPLE_HEADER.unpack_from(blob)
    tokens = np.frombuffer(blob, np.dtype(f"<u{itemsize}"), offset=_EXAMPLE_HEADER.size)
    return Example(tokens[:len_a], tokens[len_a : len_a + len_b], label)


def example_token_count(blob: bytes) -> int:
    """Content tokens of a packed example, read from its header only."""
    _, len_a, len_b, _ = _EXAMPLE_HEADER.unpack_from(blob)
    return len_a + len_b


_EXAMPLE_HEADER_DTYPE = np.dtype([("itemsize", "u1"), ("len_a", "<u2"), ("len_b", "<u2"), ("label", "u1")])


def encode_example_blobs(blobs: Sequence[bytes], dtype: np.dtype) -> tuple[NDArray[Any], NDArray[np.uint16]]:
    """:func:`~data_pipeline.formats.text.encode_chunk` straight from :func:`pack_example` blobs.

    A blob's tokens are A then B in the token dtype already, so the chunk's ``tokens`` array is the
    blobs' token bytes joined, and its ``seqs`` rows are their headers: no :class:`Example` per example.

    Raises:
        ValueError: A blob was packed with another itemsize than ``dtype``'s.
    """
    size = _EXAMPLE_HEADER.size
    headers = np.frombuffer(b"".join([blob[:size] for blob in blobs]), _EXAMPLE_HEADER_DTYPE)
    if bool(np.any(headers["itemsize"] != dtype.itemsize)):
        raise ValueError(
            f"example blobs packed with itemsizes {sorted(set(headers['itemsize'].tolist()))}, "
            f"expected {dtype.itemsize}"
        )
    seqs = np.empty((len(blobs), 3), dtype=np.uint16)
    seqs[:, 0] = headers["len_a"]
    seqs[:, 1] = headers["len_b"]
    seqs[:, 2] = headers["label"]
    tokens = np.frombuffer(b"".join([blob[size:] for blob in blobs]), dtype.newbyteorder("<"))
    return tokens, seqs
