"""Sorted run files: how the bulky payload of the `prepare text` shuffles travels outside the runner.

A bundle writes its records to a run file in sections, each section sorted and belonging to one
group key (a shard, or a group of buckets); the runner then only moves :class:`Section` records
(file, offset, length, count), and the consumer of a key k-way merges that key's sections while
streaming them. Memory stays bounded by one run's buffer, whatever the size of the corpus.

Two record kinds, both length-framed little-endian:

* document: ``bucket u32, hash_len u8, source_len u16, blob_len u32, index i64`` then the hash, the
  UTF-8 source and the packed token blob (``codec.pack_document``);
* example: ``sort key u64, blob_len u32`` then the packed example blob (``codec.pack_example``).

Pure functions over binary file objects, no Beam.
"""

from __future__ import annotations

import heapq
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, NamedTuple

from data_pipeline.text.documents import TokenizedDocument

# A bundle flushes its buffer to a new run file once it holds this many payload bytes: large enough
# that a shard merges few runs, small enough that a worker's memory stays flat.
RUN_BYTES = 32 * 2**20
# Read buffers of one k-way merge, shared by its sections (each reads at least MIN_READ_BYTES at a
# time): a corpus ten times larger has ten times more runs to merge, not ten times the memory.
MERGE_BUFFER_BYTES = 8 * 2**20
MIN_READ_BYTES = 64 * 1024
MAX_READ_BYTES = 1 << 20

_DOCUMENT = struct.Struct("<IBHIq")
_EXAMPLE = struct.Struct("<QI")


class Section(NamedTuple):
    """A contiguous, sorted slice of a run file: ``length`` bytes from ``offset`` holding ``count`` records."""

    path: str
    offset: int
    length: int
    count: int


class BucketedDocument(NamedTuple):
    """A tokenised document with its bucket: the merge key is the tuple order (bucket, hash, source, index)."""

    bucket: int
    doc_hash: bytes
    source: str
    index: int
    blob: bytes


def encode_document(record: BucketedDocument) -> bytes:
    """One document record (see the module docstring)."""
    source = record.source.encode("utf-8", "surrogatepass")
    header = _DOCUMENT.pack(record.bucket, len(record.doc_hash), len(source), len(record.blob), record.index)
    return b"".join((header, record.doc_hash, source, record.blob))


def encode_example(key: int, blob: bytes) -> bytes:
    """One example record (see the module docstring)."""
    return _EXAMPLE.pack(key, len(blob)) + blob


def write_sections(
    sink: IO[bytes], sections: Iterable[tuple[object, Sequence[bytes]]], path: str
) -> list[tuple[object, Section]]:
    """Write each group's encoded records, in the order given, as one section of the file at ``path``.

    Args:
        sink: The open file (written from its start).
        sections: ``(group key, encoded records already in merge order)`` pairs.
        path: The file's path, recorded in the sections.

    Returns:
        ``(group key, Section)`` for every non-empty group.
    """
    written: list[tuple[object, Section]] = []
    offset = 0
    for key, records in sections:
        if not records:
            continue
        payload = b"".join(records)
        sink.write(payload)
        written.append((key, Section(path, offset, len(payload), len(records))))
        offset += len(payload)
    return written


Opener = Callable[[str], IO[bytes]]


def read_block_bytes(sections: int) -> int:
    """Bytes each of ``sections`` merged sections reads at a time (see ``MERGE_BUFFER_BYTES``)."""
    return min(MAX_READ_BYTES, max(MIN_READ_BYTES, MERGE_BUFFER_BYTES // max(1, sections)))


def _section_bytes(section: Section, opener: Opener, block_bytes: int) -> Iterator[bytes]:
    """The section's bytes in blocks of at most ``block_bytes``; the file is closed at the end."""
    with opener(section.path) as handle:
        handle.seek(section.offset)
        left = section.length
        while left > 0:
            block = handle.read(min(block_bytes, left))
            if not block:
                raise ValueError(
                    f"run file {section.path}: ends {left} bytes before the end of its section at "
                    f"{section.offset}"
                )
            left -= len(block)
            yield block


def _frames(
    blocks: Iterator[bytes], header: struct.Struct, size_of: Callable[[tuple], int]
) -> Iterator[tuple[tuple, bytes]]:
    """Split a stream of blocks into ``(header fields, body bytes)`` frames, across block boundaries."""
    pending = b""
    for block in blocks:
        data = pending + block if pending else block
        position = 0
        while len(data) - position >= header.size:
            fields = header.unpack_from(data, position)
            end = position + header.size + size_of(fields)
            if end > len(data):
                break
            yield fields, data[position + header.size : end]
            position = end
        pending = data[position:]
    if pending:
        raise ValueError(f"run file: {len(pending)} bytes of a truncated record")


def read_documents(
    section: Section, opener: Opener, block_bytes: int = MAX_READ_BYTES
) -> Iterator[BucketedDocument]:
    """The document records of ``section``, in file order."""
    for (bucket, hash_len, source_len, _, index), body in _frames(
        _section_bytes(section, opener, block_bytes), _DOCUMENT, lambda f: f[1] + f[2] + f[3]
    ):
        source = body[hash_len : hash_len + source_len].decode("utf-8", "surrogatepass")
        yield BucketedDocument(bucket, body[:hash_len], source, index, body[hash_len + source_len :])


def read_examples(
    section: Section, opener: Opener, block_bytes: int = MAX_READ_BYTES
) -> Iterator[tuple[int, bytes]]:
    """The ``(sort key, example blob)`` records of ``section``, in file order."""
    for (key, _), body in _frames(_section_bytes(section, opener, block_bytes), _EXAMPLE, lambda f: f[1]):
        yield key, body


def merged_documents(sections: Iterable[Section], opener: Opener) -> Iterator[BucketedDocument]:
    """Documents of many sorted sections in ascending (bucket, hash, source, index) order, streamed."""
    sections = list(sections)
    block_bytes = read_block_bytes(len(sections))
    streams = [read_documents(section, opener, block_bytes) for section in sections]
    return heapq.merge(*streams)


def merged_examples(sections: Iterable[Section], opener: Opener) -> Iterator[tuple[int, bytes]]:
    """``(key, blob)`` of many sorted sections in ascending order, streamed.

    Ascending tuples: by key, and by blob only when two keys are equal, the order a full sort of
    all ``(key, blob)`` pairs gives.
    """
    sections = list(sections)
    block_bytes = read_block_bytes(len(sections))
    streams = [read_examples(section, opener, block_bytes) for section in sections]
    return heapq.merge(*streams)


def documents_by_bucket(
    documents: Iterator[BucketedDocument],
) -> Iterator[tuple[int, list[TokenizedDocument]]]:
    """Consecutive documents of one bucket, as ``(bucket, records)``: the input must be bucket-ordered."""
    bucket: int | None = None
    records: list[TokenizedDocument] = []
    for document in documents:
        if document.bucket != bucket:
            if bucket is not None:
                yield bucket, records
            bucket, records = document.bucket, []
        records.append(TokenizedDocument(document.doc_hash, document.source, document.index, document.blob))
    if bucket is not None:
        yield bucket, records
