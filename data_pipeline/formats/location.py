"""Where prepared data lives: local paths, filesystem URLs and ``pipe:`` commands, opened the same way."""

from __future__ import annotations

import hashlib
import io
import shlex
from typing import IO


def is_local(location: str) -> bool:
    """True for a plain filesystem path (no ``scheme://`` and no ``pipe:``)."""
    return "://" not in location and not location.startswith("pipe:")


def join_location(data_dir: str, relative: str) -> str:
    """``data_dir/relative``; a ``pipe:CMD DIR`` location becomes ``pipe:CMD DIR/relative``.

    For a ``pipe:`` location ``relative`` is shell-quoted, so that it stays one word of the command
    whatever it holds (a plain file name is left as it is).
    """
    if data_dir.startswith("pipe:"):
        relative = shlex.quote(relative)
    return data_dir.rstrip("/") + "/" + relative


def open_binary(location: str) -> IO[bytes]:
    """A seekable binary stream of a local path or URL.

    A URL (``s3://``, ``gs://``, ``https://``, ``file://``...) is opened through fsspec when it knows
    the protocol, which gives random access; otherwise, and for ``pipe:CMD``, the whole file is
    fetched once through webdataset's ``gopen`` and served from memory.

    Raises:
        OSError: The location cannot be opened (FileNotFoundError when it does not exist).
    """
    if is_local(location):
        return open(location, "rb")
    if not location.startswith("pipe:"):
        try:
            import fsspec

            return fsspec.open(location, "rb").open()
        except (ImportError, ValueError):
            # A protocol fsspec does not know: fall back to webdataset's openers below.
            pass
    from webdataset import gopen

    with gopen(location, "rb") as stream:
        return io.BytesIO(stream.read())


def file_sha256(path: str) -> str:
    """Hex sha256 of a local file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
