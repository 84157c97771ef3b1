"""Range readers: the records starting in one byte range of a splittable file (JSON lines, wiki dump)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import IO

from data_pipeline.rejects import Reject
from data_pipeline.text.multistream import StreamRange, first_stream_start, is_multistream_dump
from data_pipeline.text.ranges import LineRangeStream, ReadRange, first_line_start
from data_pipeline.text.readers import (
    BOM,
    STREAM_ERRORS,
    Document,
    ReaderOptions,
    compression_of,
    detect_format,
    read_jsonl,
    read_wiki,
)
from data_pipeline.text.streams import PeekedStream, Readable

LINES = "lines"
STREAMS = "streams"


def split_kind(path: str, options: ReaderOptions) -> str | None:
    """How ``path`` can be read in byte ranges: ``LINES`` (uncompressed JSON lines, see
    :mod:`~data_pipeline.text.ranges`), ``STREAMS`` (a multistream wiki dump, see
    :mod:`~data_pipeline.text.multistream`), or None (only whole)."""
    input_format = detect_format(path, options)
    if input_format == "jsonl" and compression_of(path) is None:
        return LINES
    if input_format == "wiki" and compression_of(path) == "bz2" and is_multistream_dump(path):
        return STREAMS
    return None


def is_splittable(path: str, options: ReaderOptions) -> bool:
    """Whether ``path`` can be read in byte ranges (see :func:`split_kind`)."""
    return split_kind(path, options) is not None


def read_range(
    path: str,
    opener: Callable[[str], IO[bytes]],
    options: ReaderOptions,
    part: ReadRange,
    before: int,
) -> Iterator[Document | Reject]:
    """The records that start in ``part`` of a splittable file: with the other ranges of the file,
    exactly the records of :func:`read_records`, with the same ordinals.

    Args:
        path: The input file; ``opener`` must give a seekable stream.
        opener: As for :func:`read_records`.
        options: Format and field choices.
        part: A range of ``path`` (``end`` set).
        before: Newlines (pages of a dump) in the ranges before ``part``.
    """
    reader = read_line_range if split_kind(path, options) == LINES else read_stream_range
    yield from reader(path, opener, options, part, before)


def _read_opened(
    path: str,
    opener: Callable[[str], IO[bytes]],
    part: ReadRange,
    records: Callable[[IO[bytes], int], Iterator[Document | Reject]],
) -> Iterator[Document | Reject]:
    """Open ``path`` and yield ``records(stream, end of part)``; a file that cannot be opened is a reject."""
    end = part.end
    if end is None:
        raise ValueError(f"{path}: a whole-file read goes through read_records, not a range reader")
    try:
        raw = opener(path)
    except Exception as error:  # noqa: BLE001 - as in read_records
        yield Reject("unreadable_file", path, None, f"{type(error).__name__}: {error}")
        return
    with contextlib.closing(raw):
        yield from records(raw, end)


def read_stream_range(
    path: str,
    opener: Callable[[str], IO[bytes]],
    options: ReaderOptions,
    part: ReadRange,
    pages_before: int,
) -> Iterator[Document | Reject]:
    """The pages of the bz2 streams that start in ``part`` of a multistream dump, numbered from ``pages_before``."""

    def records(raw: IO[bytes], end: int) -> Iterator[Document | Reject]:
        stream: StreamRange | None = None
        try:
            first = first_stream_start(raw, part.start)
            if first >= end:
                return  # no stream starts in this range
            stream = StreamRange(raw, first, end)
            yield from read_wiki(path, stream, options, pages_before)
        except STREAM_ERRORS as error:
            offset = stream.offset if stream is not None else part.start
            yield Reject("corrupt_stream", path, offset, f"{type(error).__name__}: {error}")

    yield from _read_opened(path, opener, part, records)


def read_line_range(
    path: str,
    opener: Callable[[str], IO[bytes]],
    options: ReaderOptions,
    part: ReadRange,
    lines_before: int,
) -> Iterator[Document | Reject]:
    """The records of the lines that start in ``part`` of a splittable file (see :func:`is_splittable`).

    Together the ranges of a file give exactly the records of :func:`read_records` on the whole
    file, with the same line numbers.

    Args:
        path: The input file; ``opener`` must give a seekable stream.
        opener: As for :func:`read_records`.
        options: Format and field choices.
        part: A range of ``path`` (``end`` set).
        lines_before: Newlines in the file before ``part.start``.
    """

    def records(raw: IO[bytes], end: int) -> Iterator[Document | Reject]:
        try:
            first = first_line_start(raw, part.start)
            raw.seek(first)
            stream: Readable = LineRangeStream(raw, first, end)
            if first == 0:
                head = stream.read(len(BOM))
                stream = PeekedStream(b"" if head == BOM else head, stream)
            # A line starting after ``start`` follows the newline found in between.
            first_line = lines_before + int(first > part.start)
            yield from read_jsonl(path, stream, options, first_line)
        except OSError as error:
            yield Reject("corrupt_stream", path, part.start, f"{type(error).__name__}: {error}")

    yield from _read_opened(path, opener, part, records)
