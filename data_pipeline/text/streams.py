"""Byte streams for the readers: decompression that survives damage, peeking, and lines of bounded size."""

from __future__ import annotations

import bz2
import gzip
from collections.abc import Iterator
from typing import IO, Protocol

import zstandard

MAX_DOC_BYTES = 8 * 1024 * 1024
"""Largest document (txt file or paragraph, jsonl line, parquet cell, wiki page text) kept, in bytes."""
PREVIEW_BYTES = 64 * 1024
"""Bytes of an over-long or undecodable record kept as the reject payload."""
READ_CHUNK = 1024 * 1024
ZSTD_INPUT_CHUNK = 64 * 1024
ZSTD_FEED_BYTES = 1024


class Readable(Protocol):
    """Anything with a binary ``read``: all the readers use of a stream."""

    def read(self, size: int = -1, /) -> bytes: ...


class CountingStream:
    """Counts the bytes read from the stored file, to say where a damaged stream broke."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.bytes_read = 0

    def read(self, size: int = -1, /) -> bytes:
        data = self._raw.read(size)
        self.bytes_read += len(data)
        return data


class PeekedStream:
    """A stream whose first bytes were already read (to detect an empty file) and are served again."""

    def __init__(self, head: bytes, rest: Readable) -> None:
        self._head = head
        self._rest = rest

    def read(self, size: int = -1, /) -> bytes:
        if self._head:
            if size < 0:
                data, self._head = self._head + self._rest.read(), b""
                return data
            data, self._head = self._head[:size], self._head[size:]
            return data
        return self._rest.read(size)


class ZstdReader:
    """Streaming zstd decompression across concatenated frames that notices a truncated last frame.

    ``zstandard``'s own stream reader ends silently on a truncated frame, so frames are tracked here.
    Input is fed ``ZSTD_FEED_BYTES`` at a time and only when the output is used up: a zstd block needs
    at least 4 input bytes for at most 128 KiB of output, so even a decompression bomb stays within
    about 32 MiB per feed.
    """

    def __init__(self, raw: Readable) -> None:
        self._raw = raw
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame: zstandard.ZstdDecompressionObj | None = None
        self._input = memoryview(b"")
        self._buffer = bytearray()
        self._done = False

    def read(self, size: int = -1, /) -> bytes:
        """Up to ``size`` bytes (all when negative), returning as soon as some are decompressed."""
        while (size < 0 or not self._buffer) and not self._done:
            if not self._input:
                self._input = memoryview(self._raw.read(ZSTD_INPUT_CHUNK))
            if not self._input:
                self._done = True
                if self._frame is not None:
                    raise EOFError("zstd stream ended in the middle of a frame")
                break
            self._feed(bytes(self._input[:ZSTD_FEED_BYTES]))
            self._input = self._input[ZSTD_FEED_BYTES:]
        size = len(self._buffer) if size < 0 else size
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def _feed(self, data: bytes) -> None:
        while data:
            if self._frame is None:
                self._frame = self._decompressor.decompressobj()
            self._buffer += self._frame.decompress(data)
            if not self._frame.eof:
                return
            data = self._frame.unused_data
            self._frame = None


class ShortReads:
    """``read(n)`` as ``read1(n)``: returns what is decompressed so far instead of filling ``n`` bytes.

    A full ``read`` of a damaged stream raises and loses the intact data decompressed before the
    damage in the same call; short reads hand it over first.
    """

    def __init__(self, stream: gzip.GzipFile | bz2.BZ2File) -> None:
        self._stream = stream

    def read(self, size: int = -1, /) -> bytes:
        return self._stream.read1(size) if size > 0 else self._stream.read()


def decompressed(raw: Readable, compression: str | None) -> Readable:
    """``raw`` decompressed; gzip members and bz2/zstd streams may be concatenated (multistream)."""
    if compression == "gz":
        return ShortReads(gzip.GzipFile(fileobj=raw, mode="rb"))  # type: ignore[arg-type]
    if compression == "bz2":
        return ShortReads(bz2.BZ2File(raw, mode="rb"))  # type: ignore[arg-type]
    if compression == "zst":
        return ZstdReader(raw)
    return raw


def is_seekable(raw: IO[bytes]) -> bool:
    """Whether ``raw`` can seek (a stream without ``seekable`` cannot)."""
    try:
        return bool(raw.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def iter_lines(stream: Readable, max_bytes: int = MAX_DOC_BYTES) -> Iterator[tuple[bytes, bool]]:
    """Yield ``(line, too_long)`` for each line, without its ``\\n`` or ``\\r\\n``.

    A line longer than ``max_bytes`` is not held: only its first ``PREVIEW_BYTES`` are kept, the rest is
    read and dropped, and it comes out with ``too_long=True``. Memory stays near ``max_bytes +
    READ_CHUNK`` whatever the line length.
    """
    pending = bytearray()
    too_long = False
    while chunk := stream.read(READ_CHUNK):
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            if not pending and not too_long and end - start <= max_bytes:
                yield strip_cr(chunk[start:end]), False  # Fast path: the line lies within this chunk.
            else:
                too_long = append_capped(pending, chunk[start:end], too_long, max_bytes)
                yield strip_cr(bytes(pending)), too_long
                pending.clear()
                too_long = False
            start = end + 1
        too_long = append_capped(pending, chunk[start:], too_long, max_bytes)
    if pending or too_long:
        yield strip_cr(bytes(pending)), too_long


def append_capped(pending: bytearray, piece: bytes, too_long: bool, max_bytes: int) -> bool:
    """Append ``piece`` unless over ``max_bytes``, then keep only a preview; returns the new too_long."""
    if too_long:
        return True
    pending += piece
    if len(pending) > max_bytes:
        del pending[PREVIEW_BYTES:]
        return True
    return False


def strip_cr(line: bytes) -> bytes:
    """``line`` without a final carriage return."""
    return line[:-1] if line.endswith(b"\r") else line
