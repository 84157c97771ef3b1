"""Open shard files of one split by index: local paths or URLs, a few handles kept, reopened after fork.

Shards are checked against the manifest as ``--verify-shards`` asks: ``size`` compares each local
shard's size with the manifest's ``bytes`` when the split is opened, ``full`` also hashes each shard
once per process when it is first opened and compares the manifest's ``sha256`` (a full read of
every shard a process touches), ``none`` trusts the files.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import IO, Any, Literal

from data_pipeline.errors import UserError
from data_pipeline.formats.location import is_local, join_location, open_binary

OPEN_HANDLES = 4
"""Shard files kept open per process (least recently used closed first)."""

VerifyShards = Literal["full", "size", "none"]
VERIFY_MODES: tuple[VerifyShards, ...] = ("full", "size", "none")
DEFAULT_VERIFY: VerifyShards = "full"
"""How shards are checked unless asked otherwise: size at start and sha256 at first open."""

# (location, sha256) of the shards this process has hashed and found right. Sources are rebuilt
# (an evaluation pass opens its split anew), so the record lives with the process, not one object;
# a forked worker inherits what its parent had checked.
_VERIFIED: set[tuple[str, str]] = set()


def check_verify_mode(verify: str) -> None:
    """Raise ``UserError`` unless ``verify`` is one of ``VERIFY_MODES``."""
    if verify not in VERIFY_MODES:
        raise UserError(f"--verify-shards {verify!r}: expected one of {', '.join(VERIFY_MODES)}")


def require_checksums(data_dir: str, shards: list[dict[str, Any]], verify: str) -> None:
    """Refuse shards whose manifest entry lacks what ``verify`` checks (``sha256`` for full, ``bytes``).

    Args:
        data_dir: The data directory, for the message.
        shards: The split's ``shards`` entries from the manifest.
        verify: ``full``, ``size`` or ``none``.

    Raises:
        UserError: Naming the shard, the missing key and the ``--verify-shards`` value that skips it.
    """
    check_verify_mode(verify)
    needed = {"full": ("bytes", "sha256"), "size": ("bytes",), "none": ()}[verify]
    for shard in shards:
        for key in needed:
            if shard.get(key) is None:
                weaker = "size (or none)" if key == "sha256" else "none"
                raise UserError(
                    f"shard {join_location(data_dir, shard['path'])}: the manifest records no {key}, so "
                    f"--verify-shards {verify} cannot check it; pass --verify-shards {weaker} "
                    "to use it unchecked"
                )


def file_digest(handle: IO[bytes]) -> str:
    """Hex sha256 of a seekable stream from its start, read in 1 MiB blocks; leaves it at the start."""
    digest = hashlib.sha256()
    handle.seek(0)
    for block in iter(lambda: handle.read(1 << 20), b""):
        digest.update(block)
    # A newly opened stream is read from its start (tar indexing does not seek first).
    handle.seek(0)
    return digest.hexdigest()


class ShardFiles:
    """The shard files of a split, opened on first use through :func:`open_binary`.

    Each process keeps its own handles: a forked DataLoader worker must not share file offsets with
    its parent, so a change of process id drops the inherited handles, and pickling sends none.

    What the manifest records of a shard is checked as ``verify`` says (see the module docstring):
    the sizes of local shards here, each sha256 when the shard is first opened. An entry without
    ``bytes`` or ``sha256`` is not checked for it (:func:`require_checksums` refuses such entries).

    Args:
        data_dir: The data directory (local path or URL).
        shards: The split's ``shards`` entries from the manifest (``path``, ``samples``, and
            ``bytes`` and ``sha256`` when checked).
        verify: ``full``, ``size`` or ``none``. Defaults to ``DEFAULT_VERIFY`` (full).

    Raises:
        UserError: A local shard is missing or has another size than the manifest's ``bytes``.
    """

    def __init__(self, data_dir: str, shards: list[dict[str, Any]], verify: str = DEFAULT_VERIFY) -> None:
        check_verify_mode(verify)
        self.locations = [join_location(data_dir, shard["path"]) for shard in shards]
        self.expected = [int(shard["samples"]) for shard in shards]
        self.sizes: list[int | None] = [shard.get("bytes") for shard in shards]
        self.sha256: list[str | None] = [shard.get("sha256") for shard in shards]
        self.verify = verify
        self._handles: OrderedDict[int, IO[bytes]] = OrderedDict()
        self._pid = os.getpid()
        if verify != "none":
            for shard in range(len(self.locations)):
                self.check_size(shard)

    def check_size(self, shard: int) -> None:
        """Compare a local shard's size with the manifest's ``bytes`` (remote shards are not sized)."""
        location, expected = self.locations[shard], self.sizes[shard]
        if expected is None or not is_local(location):
            return
        try:
            found = os.stat(location).st_size
        except OSError as error:
            raise UserError(f"shard {location}: cannot open ({error})") from error
        if found != expected:
            raise UserError(f"shard {location}: {found} bytes, the manifest says {expected} bytes")

    def check_sha256(self, shard: int, handle: IO[bytes]) -> None:
        """Hash a newly opened shard once per process and compare the manifest's ``sha256``."""
        location, expected = self.locations[shard], self.sha256[shard]
        if self.verify != "full" or expected is None or (location, expected) in _VERIFIED:
            return
        try:
            found = file_digest(handle)
        except OSError as error:
            raise UserError(f"shard {location}: cannot read ({error})") from error
        if found != expected:
            raise UserError(
                f"shard {location}: sha256 {found} differs from the manifest's {expected} "
                "(not the file `pretrain prepare` wrote)"
            )
        _VERIFIED.add((location, expected))

    def handle(self, shard: int) -> IO[bytes]:
        """An open, seekable stream of shard ``shard`` (position unspecified: seek before reading)."""
        if self._pid != os.getpid():
            self._handles, self._pid = OrderedDict(), os.getpid()
        handle = self._handles.get(shard)
        if handle is None:
            try:
                handle = open_binary(self.locations[shard])
            except OSError as error:
                raise UserError(f"shard {self.locations[shard]}: cannot open ({error})") from error
            try:
                self.check_sha256(shard, handle)
            except BaseException:
                handle.close()
                raise
            self._handles[shard] = handle
            if len(self._handles) > OPEN_HANDLES:
                self._handles.popitem(last=False)[1].close()
        self._handles.move_to_end(shard)
        return handle

    def read(self, shard: int, offset: int, size: int) -> bytes:
        """``size`` bytes of shard ``shard`` from byte ``offset``."""
        handle = self.handle(shard)
        handle.seek(offset)
        return handle.read(size)

    def check_count(self, shard: int, found: int, noun: str | None = None) -> None:
        """Raise ``UserError`` when a shard holds another number of samples than the manifest says.

        Args:
            shard: Shard index within the split.
            found: Samples found in the file.
            noun: What was counted, for the message ("images"). Defaults to None (no word).
        """
        if found != self.expected[shard]:
            counted = f"{found} {noun}" if noun else str(found)
            raise UserError(
                f"shard {self.locations[shard]}: {self.expected[shard]} samples in manifest, {counted} in file"
            )

    def close(self) -> None:
        """Close this process's handles."""
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_handles=OrderedDict(), _pid=-1)
        return state
