"""Byte ranges of one large input file, so that several workers read it: pure functions, no Beam.

A line-based file (uncompressed JSON lines) is cut into ranges of about ``RANGE_BYTES``, the way
Beam's own text source does it: a range owns the lines that START inside it, reading past its end to
finish its last line and skipping the line it starts in the middle of. (A multistream wiki dump is
cut the same way at its bz2 streams: :mod:`data_pipeline.text.multistream`.) Record ordinals stay
those of a whole-file read: a first pass counts the newlines (pages) of every range, and a range's
first ordinal follows from the counts of the ranges before it.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import IO, NamedTuple

RANGE_BYTES = 64 * 2**20
"""Target bytes per range of a split file (and the size above which a file is split)."""
MIN_RANGE_BYTES = 4 * 2**20
"""Smallest range made to give every worker a share of few large files."""
SCAN_BYTES = 1 << 20


class ReadRange(NamedTuple):
    """What one read task reads: a whole file (``end`` is None) or the records starting in ``[start, end)``."""

    path: str
    start: int = 0
    end: int | None = None
    before: int | None = None
    """Records (pages) before the range when known in advance (from a dump's index), else None."""

    @property
    def is_whole(self) -> bool:
        """Whether this is a whole-file read."""
        return self.end is None


def plan_ranges(path: str, size: int, splittable: bool, range_bytes: int | None = None) -> list[ReadRange]:
    """The ranges of one input: a single whole read unless it is ``splittable`` and over ``range_bytes``.

    Args:
        path: The input file.
        size: Its size in bytes.
        splittable: Whether its format is line-based and uncompressed.
        range_bytes: Target bytes per range. Defaults to ``RANGE_BYTES``.
    """
    range_bytes = range_bytes or RANGE_BYTES
    if not splittable or size <= range_bytes:
        return [ReadRange(path)]
    count = -(-size // range_bytes)
    bounds = [size * i // count for i in range(count + 1)]
    return [ReadRange(path, start, end) for start, end in itertools.pairwise(bounds)]


def count_newlines(handle: IO[bytes], start: int, end: int) -> int:
    """Newlines in bytes ``[start, end)`` of a seekable file."""
    handle.seek(start)
    left, newlines = end - start, 0
    while left > 0 and (block := handle.read(min(SCAN_BYTES, left))):
        newlines += block.count(b"\n")
        left -= len(block)
    return newlines


def count_before(counts: Mapping[tuple[str, int], int], path: str, start: int) -> int:
    """Newlines (pages) before the range at ``start`` of ``path``, from the per-range counts
    ``{(path, range start): count}``."""
    return sum(count for (other, begin), count in counts.items() if other == path and begin < start)


def first_line_start(handle: IO[bytes], start: int) -> int:
    """The first line start at or after ``start``: ``start`` itself when a newline precedes it (or it is 0).

    Returns the file size when no line starts there.
    """
    if start == 0:
        return 0
    handle.seek(start - 1)
    position = start - 1
    while block := handle.read(SCAN_BYTES):
        found = block.find(b"\n")
        if found >= 0:
            return position + found + 1
        position += len(block)
    return position


class LineRangeStream:
    """The bytes of a seekable file from a line start up to the end of the last line starting before ``end``.

    Args:
        handle: The file, positioned at ``first``.
        first: A line start (the offset ``handle`` is at).
        end: The range end: the stream stops after the newline at or after ``end - 1``, or at the
            end of the file.
    """

    def __init__(self, handle: IO[bytes], first: int, end: int) -> None:
        self._handle = handle
        self._position = first
        self._end = end
        self._done = first >= end

    def read(self, size: int = -1, /) -> bytes:
        """Up to ``size`` bytes of the range (all of the rest when negative)."""
        if size < 0:
            return b"".join(iter(lambda: self.read(SCAN_BYTES), b""))
        if self._done:
            return b""
        data = self._handle.read(size)
        if not data:
            self._done = True
            return b""
        found = data.find(b"\n", max(0, self._end - 1 - self._position))
        if found >= 0:
            self._done = True
            data = data[: found + 1]
        self._position += len(data)
        return data
