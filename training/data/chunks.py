"""Random access to the token chunks of text shards (``KEY.tokens.npy`` + ``KEY.seqs.npy`` tar members).

A shard is indexed once by scanning its tar headers (data is skipped by seeking; of each
``seqs.npy`` only the npy header is read), after which any chunk is one seek and one read.
"""

from __future__ import annotations

import io
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
from numpy.typing import NDArray

from data_pipeline.errors import UserError
from data_pipeline.formats.text import Chunk
from training.data.files import DEFAULT_VERIFY, ShardFiles

MIN_CACHED_CHUNKS = 8


@dataclass
class Member:
    """Byte range of one tar member's data."""

    offset: int
    size: int


@dataclass
class ShardIndex:
    """Where each chunk of one shard lies and how many samples precede it."""

    keys: list[str]
    tokens: list[Member]
    seqs: list[Member]
    chunk_first: NDArray[np.int64] = field(default_factory=lambda: np.zeros(1, np.int64))


def _npy_rows(handle: IO[bytes], member: Member) -> int:
    handle.seek(member.offset)
    head = io.BytesIO(handle.read(min(member.size, 4096)))
    version = np.lib.format.read_magic(head)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, _ = reader(head)
    return int(shape[0])


def index_shard(handle: IO[bytes], location: str) -> ShardIndex:
    """Scan the tar headers of an open shard; read only the npy header of each ``seqs.npy``."""
    members: dict[str, dict[str, Member]] = {}
    try:
        with tarfile.open(fileobj=handle, mode="r:") as tar:
            for member in tar:
                key, _, suffix = member.name.partition(".")
                if not member.isfile() or suffix not in ("tokens.npy", "seqs.npy"):
                    raise UserError(f"shard {location}: unexpected member {member.name!r}")
                members.setdefault(key, {})[suffix] = Member(member.offset_data, member.size)
        keys = sorted(members)
        incomplete = [key for key in keys if len(members[key]) != 2]
        if incomplete:
            raise UserError(f"shard {location}: incomplete chunks {incomplete}")
        index = ShardIndex(
            keys, [members[k]["tokens.npy"] for k in keys], [members[k]["seqs.npy"] for k in keys]
        )
        rows = [_npy_rows(handle, member) for member in index.seqs]
    except (tarfile.TarError, ValueError, EOFError) as error:
        raise UserError(f"shard {location}: not a readable shard tar ({error})") from error
    index.chunk_first = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])
    return index


class ChunkReader:
    """Random access to the chunks of a split's shards, with a small LRU cache (one per process).

    The decoded-chunk cache holds the chunks of two shuffle windows (at least 8 chunks), so that
    reading a window in permuted order decodes each of its chunks once.

    Args:
        data_dir: The data directory (local path or URL).
        shards: The split's ``shards`` entries from the manifest.
        window_samples: Samples per shuffle window (sizes the chunk cache).
        verify: How the shard files are checked (:class:`ShardFiles`). Defaults to ``DEFAULT_VERIFY``.
    """

    def __init__(
        self, data_dir: str, shards: list[dict[str, Any]], window_samples: int, verify: str = DEFAULT_VERIFY
    ) -> None:
        self.files = ShardFiles(data_dir, shards, verify)
        self.window_samples = window_samples
        self.cached_chunks = MIN_CACHED_CHUNKS
        self.indexes: dict[int, ShardIndex] = {}
        self.chunks_read = 0
        self._chunks: OrderedDict[tuple[int, int], Chunk] = OrderedDict()

    def index(self, shard: int) -> ShardIndex:
        """The chunk index of a shard (built on first use, then kept)."""
        if shard not in self.indexes:
            index = index_shard(self.files.handle(shard), self.files.locations[shard])
            self.files.check_count(shard, int(index.chunk_first[-1]))
            self.indexes[shard] = index
            smallest = int(np.diff(index.chunk_first).min(initial=self.window_samples) or 1)
            self.cached_chunks = max(self.cached_chunks, 2 * (-(-self.window_samples // smallest) + 1))
        return self.indexes[shard]

    def chunk(self, shard: int, number: int) -> Chunk:
        """Chunk ``number`` of a shard, decoded (cached)."""
        key = (shard, number)
        if key in self._chunks:
            self._chunks.move_to_end(key)
            return self._chunks[key]
        index = self.index(shard)
        try:
            # A pickled (object) array is refused: ValueError, like a malformed one.
            tokens, seqs = (
                np.load(io.BytesIO(self.files.read(shard, member.offset, member.size)), allow_pickle=False)
                for member in (index.tokens[number], index.seqs[number])
            )
            chunk = Chunk(index.keys[number], tokens, seqs)
        except ValueError as error:
            raise UserError(f"shard {self.files.locations[shard]}: {error}") from error
        self.chunks_read += 1
        self._chunks[key] = chunk
        if len(self._chunks) > self.cached_chunks:
            self._chunks.popitem(last=False)
        return chunk

    def locate(
        self, shards: NDArray[np.int64], samples: NDArray[np.int64]
    ) -> list[tuple[NDArray[np.int64], Chunk, NDArray[np.int64]]]:
        """Group requested samples by chunk: ``(rows of the request, chunk, indices within the chunk)``."""
        groups = []
        for shard in np.unique(shards):
            rows = np.flatnonzero(shards == shard)
            first = self.index(int(shard)).chunk_first
            numbers = np.searchsorted(first, samples[rows], side="right") - 1
            for number in np.unique(numbers):
                here = rows[numbers == number]
                groups.append((here, self.chunk(int(shard), int(number)), samples[here] - first[number]))
        return groups

    def close(self) -> None:
        """Close this process's shard files."""
        self.files.close()

    def __getstate__(self) -> dict[str, Any]:
        # Indexes and decoded chunks stay in the process that made them; a worker starts empty.
        state = dict(self.__dict__)
        state.update(_chunks=OrderedDict(), indexes={}, chunks_read=0)
        return state
