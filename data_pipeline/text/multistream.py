"""A multistream Wikipedia dump (``*pages-articles-multistream*.xml*.bz2``) read in ranges of its bz2 streams.

Such a dump is many bz2 streams end to end: the first holds the ``<mediawiki>`` header and site
info, each following one about 100 ``<page>`` elements, the last the closing tag. A range
``[start, end)`` of the file owns the streams that START in it. They are found with the
``*-multistream-index.txt.bz2`` beside the dump (lines ``offset:page id:title``) when there is one,
else by scanning for the bz2 stream magic (``BZh`` + level + the block magic ``0x314159265359``) and
keeping the candidates that decompress. A range's pages are parsed between a ``<mediawiki>`` the
range supplies (after the first range) and a closing tag (before the last), and page ordinals
continue from the pages before the range. Pure functions over binary file objects, no Beam.
"""

from __future__ import annotations

import bz2
import os
import re
from typing import IO

from data_pipeline.text import ranges
from data_pipeline.text.ranges import ReadRange

_STREAM_MAGIC = re.compile(rb"BZh[1-9]\x31\x41\x59\x26\x53\x59")
_MAGIC_BYTES = 10
_PAGE_TAG = re.compile(rb"<page[\s>]")
_PAGE_TAG_BYTES = 6
CHUNK_BYTES = 1 << 20
# Compressed bytes a candidate stream start may take to yield its first output (one bz2 block of
# at most 900 kB compresses to less).
VERIFY_BYTES = 2 << 20
OPEN_ROOT = b"<mediawiki>"
CLOSE_ROOT = b"</mediawiki>"


def is_multistream_dump(path: str) -> bool:
    """Whether ``path`` is named like a multistream dump (its bz2 streams can be read apart)."""
    name = os.path.basename(path).lower()
    return "multistream" in name and "-index" not in name and ".xml" in name and name.endswith(".bz2")


def index_path(path: str) -> str:
    """The index file name of a multistream dump: ``...-multistream.xml.bz2`` -> ``...-multistream-index.txt.bz2``
    (``...multistream1.xml-p1p41242.bz2`` -> ``...multistream-index1.txt-p1p41242.bz2``)."""
    head, tail = os.path.split(path) if "://" not in path else path.rsplit("/", 1)
    name = re.sub(r"multistream(\d*)\.xml", r"multistream-index\1.txt", tail, count=1)
    return f"{head}/{name}" if head else name


def stream_pages(index: IO[bytes]) -> list[tuple[int, int]]:
    """``(stream offset, pages in it)`` from a decompressed index, in file order (the header stream at 0
    has no pages and no index line)."""
    counts: dict[int, int] = {}
    for line in index:
        offset, _, _ = line.partition(b":")
        if offset.strip():
            start = int(offset)
            counts[start] = counts.get(start, 0) + 1
    return sorted(counts.items())


def plan_indexed_ranges(
    path: str, size: int, streams: list[tuple[int, int]], range_bytes: int | None = None
) -> list[ReadRange]:
    """Ranges of whole streams of about ``range_bytes`` (defaults to ``ranges.RANGE_BYTES``), each with
    the pages before it (``before``)."""
    range_bytes = range_bytes or ranges.RANGE_BYTES
    planned: list[ReadRange] = []
    start, pages, before = 0, 0, 0
    for offset, count in streams:
        if offset - start >= range_bytes:
            planned.append(ReadRange(path, start, offset, before))
            start, before = offset, before + pages
            pages = 0
        pages += count
    planned.append(ReadRange(path, start, size, before))
    return planned


def _decompresses(handle: IO[bytes], offset: int) -> bool:
    """Whether a bz2 stream that yields output starts at ``offset``."""
    handle.seek(offset)
    decompressor = bz2.BZ2Decompressor()
    fed = 0
    try:
        while fed < VERIFY_BYTES and (chunk := handle.read(64 * 1024)):
            fed += len(chunk)
            if decompressor.decompress(chunk) or decompressor.eof:
                return True
    except OSError:
        return False
    return False


def first_stream_start(handle: IO[bytes], start: int) -> int:
    """The first bz2 stream start at or after ``start`` (verified by decompressing), or the file size."""
    if start == 0:
        return 0
    position = start
    while True:
        handle.seek(position)
        block = handle.read(CHUNK_BYTES)
        for match in _STREAM_MAGIC.finditer(block):
            candidate = position + match.start()
            if _decompresses(handle, candidate):
                return candidate
        if len(block) < CHUNK_BYTES:
            return position + len(block)
        position += len(block) - (_MAGIC_BYTES - 1)  # a magic across the chunk boundary is found next time


class StreamRange:
    """The decompressed bytes of the streams starting in ``[first, end)``, wrapped so that they parse alone.

    Args:
        handle: The dump file (seekable).
        first: A stream start (see :func:`first_stream_start`).
        end: The range end.
        wrap: Supply the root element's opening and closing tags the range lacks. Defaults to True.
    """

    def __init__(self, handle: IO[bytes], first: int, end: int, wrap: bool = True) -> None:
        handle.seek(first)
        self._handle = handle
        self._end = end
        self._pending = b""
        self._pending_offset = first  # file offset of self._pending[0]
        self._decompressor = bz2.BZ2Decompressor()
        self._started = False  # whether the current stream has been fed anything
        self._done = first >= end
        self._wrap = wrap
        self._output = OPEN_ROOT if wrap and first > 0 and not self._done else b""
        self.offset = first
        """File offset of the compressed bytes read so far, for a reject's offset."""

    def read(self, size: int = -1, /) -> bytes:
        """Up to ``size`` decompressed bytes (all the rest when negative)."""
        while (size < 0 or not self._output) and not self._done:
            self._output += self._decompress_some()
        size = len(self._output) if size < 0 else size
        data, self._output = self._output[:size], self._output[size:]
        return data

    def _decompress_some(self) -> bytes:
        if not self._pending:
            self._pending_offset = self._handle.tell()
            self._pending = self._handle.read(CHUNK_BYTES)
            if not self._pending:
                if self._started:
                    raise EOFError("bz2 stream ended in the middle of a stream")
                self._done = True  # the end of the file: the dump's own closing tag was read
                return b""
        data, self._pending = self._pending, b""
        self._started = True
        out = self._decompressor.decompress(data)
        self.offset = self._pending_offset + len(data)
        if not self._decompressor.eof:
            return out
        leftover = self._decompressor.unused_data
        next_start = self._pending_offset + len(data) - len(leftover)
        self._decompressor, self._started = bz2.BZ2Decompressor(), False
        if next_start >= self._end:
            self._done = True
            at_file_end = not leftover and not self._handle.read(1)
            return out + (CLOSE_ROOT if self._wrap and not at_file_end else b"")
        self._pending, self._pending_offset = leftover, next_start
        return out


def count_pages(handle: IO[bytes], start: int, end: int) -> int:
    """``<page>`` elements in the streams that start in ``[start, end)``."""
    stream = StreamRange(handle, first_stream_start(handle, start), end, wrap=False)
    pages, tail = 0, b""
    while block := stream.read(CHUNK_BYTES):
        data = tail + block
        pages += len(_PAGE_TAG.findall(data))
        tail = data[-(_PAGE_TAG_BYTES - 1) :]  # too short to hold a whole tag counted already
    return pages
