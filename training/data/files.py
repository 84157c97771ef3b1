"""Open shard files of one split by index: local paths or URLs, a few handles kept, reopened after fork."""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import IO, Any

from data_pipeline.errors import UserError
from data_pipeline.formats.location import join_location, open_binary

OPEN_HANDLES = 4
"""Shard files kept open per process (least recently used closed first)."""


class ShardFiles:
    """The shard files of a split, opened on first use through :func:`open_binary`.

    Each process keeps its own handles: a forked DataLoader worker must not share file offsets with
    its parent, so a change of process id drops the inherited handles, and pickling sends none.

    Args:
        data_dir: The data directory (local path or URL).
        shards: The split's ``shards`` entries from the manifest (``path`` and ``samples``).
    """

    def __init__(self, data_dir: str, shards: list[dict[str, Any]]) -> None:
        self.locations = [join_location(data_dir, shard["path"]) for shard in shards]
        self.expected = [int(shard["samples"]) for shard in shards]
        self._handles: OrderedDict[int, IO[bytes]] = OrderedDict()
        self._pid = os.getpid()

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
