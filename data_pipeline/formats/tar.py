"""Deterministic tar writing shared by every shard format: fixed member metadata and a hashing sink."""

from __future__ import annotations

import hashlib
import io
import tarfile
from typing import IO, Any


class HashingWriter(io.RawIOBase):
    """Write-through stream that counts bytes and computes sha256 of everything written.

    Args:
        sink: The binary stream every byte is passed on to; need not be seekable.
    """

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


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    """Append ``payload`` to ``tar`` as the regular file ``name``.

    The metadata is fixed (mtime 0, mode 0644, owner 0), so that the same content always gives
    byte-identical tars.
    """
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))
