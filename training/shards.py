"""Manifest loading and random-access chunk reading of local or remote shards (no Beam).

A local shard is indexed once by scanning its tar headers (data is skipped by seeking; of each
``seqs.npy`` only the npy header is read), after which any chunk is one seek and one read. A URL
(``s3://``, ``gs://``, ``https://``, ``file://``...) is opened through fsspec when it knows the
protocol, which gives the same random access; otherwise, and for ``pipe:CMD``, the shard is fetched
once through webdataset's ``gopen`` and kept in memory while its chunks are in use.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
from numpy.typing import NDArray

from data_pipeline.errors import UserError
from data_pipeline.shard_format import (
    FORMAT_NAME,
    KNOWN_FORMATS,
    MANIFEST_NAME,
    Chunk,
    ManifestError,
    load_manifest,
)

OBJECTIVES = ("nsp", "sop", "none")
_OPEN_HANDLES = 4
_MIN_CACHED_CHUNKS = 8


def is_local(location: str) -> bool:
    """True for a plain filesystem path (no ``scheme://`` and no ``pipe:``)."""
    return "://" not in location and not location.startswith("pipe:")


def join_location(data_dir: str, relative: str) -> str:
    """``data_dir/relative``; a ``pipe:CMD DIR`` location becomes ``pipe:CMD DIR/relative``."""
    return data_dir.rstrip("/") + "/" + relative


def open_binary(location: str) -> IO[bytes]:
    """A seekable binary stream of a local path or URL (see the module docstring)."""
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


def _parse_manifest(text: str, source: str, expected_format: str = FORMAT_NAME) -> dict[str, Any]:
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as error:
        raise ManifestError(f"manifest {source} is not valid JSON: {error}") from error
    missing = [key for key in KNOWN_FORMATS[expected_format][0] if key not in manifest]
    if missing:
        raise ManifestError(f"manifest {source} lacks keys {missing}")
    if manifest["format"] != expected_format:
        raise ManifestError(f"manifest {source}: format {manifest['format']!r}, expected {expected_format!r}")
    return manifest


def read_manifest(data_dir: str, expected_format: str = FORMAT_NAME) -> dict[str, Any]:
    """The manifest of a data directory (local path or URL), with the shard_format checks.

    Args:
        data_dir: Local directory or URL holding ``manifest.json``.
        expected_format: ``FORMAT_NAME`` (text) or ``IMAGE_FORMAT_NAME``. Defaults to text.
    """
    if is_local(data_dir):
        return load_manifest(data_dir, expected_format)
    source = join_location(data_dir, MANIFEST_NAME)
    try:
        with open_binary(source) as stream:
            text = stream.read().decode("utf-8")
    except (OSError, ValueError) as error:
        raise ManifestError(f"cannot read manifest {source}: {error}") from error
    return _parse_manifest(text, source, expected_format)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_split(manifest: dict[str, Any], source: str, split: str) -> None:
    """Check ``splits.<split>``: a non-empty shard list of paths and sample counts that add up."""
    splits = manifest["splits"]
    if not isinstance(splits, dict) or split not in splits:
        available = sorted(splits) if isinstance(splits, dict) else splits
        raise ManifestError(f"manifest {source}: no split {split!r} in splits (has {available})")
    shards = splits[split].get("shards")
    if not isinstance(shards, list) or not shards:
        raise ManifestError(
            f"manifest {source}: splits.{split}.shards must be a non-empty list, got {shards!r}"
        )
    for index, shard in enumerate(shards):
        if (
            not isinstance(shard, dict)
            or not isinstance(shard.get("path"), str)
            or not _is_count(shard.get("samples"))
        ):
            raise ManifestError(
                f"manifest {source}: splits.{split}.shards[{index}] needs a string path and a sample count, got {shard!r}"
            )
    listed = sum(shard["samples"] for shard in shards)
    if splits[split].get("samples") != listed:
        raise ManifestError(
            f"manifest {source}: splits.{split}.samples is {splits[split].get('samples')!r}, its shards hold {listed}"
        )


def check_manifest(manifest: dict[str, Any], source: str, split: str) -> None:
    """Check the fields the text loader relies on; raise ManifestError naming the key and value."""
    check_split(manifest, source, split)
    if not isinstance(manifest["seq_len"], int) or manifest["seq_len"] < 3:
        raise ManifestError(
            f"manifest {source}: seq_len must be an integer >= 3, got {manifest['seq_len']!r}"
        )
    if manifest["objective"] not in OBJECTIVES:
        raise ManifestError(
            f"manifest {source}: objective {manifest['objective']!r} is not one of {OBJECTIVES}"
        )
    tokenizer = manifest["tokenizer"]
    if (
        not isinstance(tokenizer, dict)
        or not isinstance(tokenizer.get("path"), str)
        or not _is_count(tokenizer.get("vocab_size"))
    ):
        raise ManifestError(f"manifest {source}: tokenizer needs a path and a vocab_size, got {tokenizer!r}")


def split_identity(manifest: dict[str, Any], split: str) -> str:
    """sha256 over the (path, samples, sha256) of a split's shards: what the order depends on."""
    listing = [
        [shard["path"], shard["samples"], shard.get("sha256")]
        for shard in manifest["splits"][split]["shards"]
    ]
    return hashlib.sha256(json.dumps(listing).encode("utf-8")).hexdigest()


@dataclass
class _Member:
    offset: int
    size: int


@dataclass
class ShardIndex:
    """Where each chunk of one shard lies and how many samples precede it."""

    keys: list[str]
    tokens: list[_Member]
    seqs: list[_Member]
    chunk_first: NDArray[np.int64] = field(default_factory=lambda: np.zeros(1, np.int64))


def _npy_rows(handle: IO[bytes], member: _Member) -> int:
    handle.seek(member.offset)
    head = io.BytesIO(handle.read(min(member.size, 4096)))
    version = np.lib.format.read_magic(head)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, _ = reader(head)
    return int(shape[0])


def index_shard(handle: IO[bytes], location: str) -> ShardIndex:
    """Scan the tar headers of an open shard; read only the npy header of each ``seqs.npy``."""
    members: dict[str, dict[str, _Member]] = {}
    try:
        with tarfile.open(fileobj=handle, mode="r:") as tar:
            for member in tar:
                key, _, suffix = member.name.partition(".")
                if not member.isfile() or suffix not in ("tokens.npy", "seqs.npy"):
                    raise UserError(f"shard {location}: unexpected member {member.name!r}")
                members.setdefault(key, {})[suffix] = _Member(member.offset_data, member.size)
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


class ShardReader:
    """Random access to the chunks of a split's shards, with small LRU caches (one per process).

    The decoded-chunk cache holds the chunks of two shuffle windows (at least 8 chunks), so that
    reading a window in permuted order decodes each of its chunks once.

    Args:
        data_dir: The data directory (local path or URL).
        shards: The split's ``shards`` entries from the manifest.
        window_samples: Samples per shuffle window (sizes the chunk cache).
    """

    def __init__(self, data_dir: str, shards: list[dict[str, Any]], window_samples: int) -> None:
        self.locations = [join_location(data_dir, shard["path"]) for shard in shards]
        self.expected = [int(shard["samples"]) for shard in shards]
        self.window_samples = window_samples
        self.cached_chunks = _MIN_CACHED_CHUNKS
        self.indexes: dict[int, ShardIndex] = {}
        self.chunks_read = 0
        self._handles: OrderedDict[int, IO[bytes]] = OrderedDict()
        self._chunks: OrderedDict[tuple[int, int], Chunk] = OrderedDict()
        self._pid = os.getpid()

    def _handle(self, shard: int) -> IO[bytes]:
        if self._pid != os.getpid():
            # A forked worker must not share file offsets with its parent: reopen everything.
            self._handles, self._pid = OrderedDict(), os.getpid()
        handle = self._handles.get(shard)
        if handle is None:
            try:
                handle = open_binary(self.locations[shard])
            except OSError as error:
                raise UserError(f"shard {self.locations[shard]}: cannot open ({error})") from error
            self._handles[shard] = handle
            if len(self._handles) > _OPEN_HANDLES:
                self._handles.popitem(last=False)[1].close()
        self._handles.move_to_end(shard)
        return handle

    def index(self, shard: int) -> ShardIndex:
        """The chunk index of a shard (built on first use, then kept)."""
        if shard not in self.indexes:
            index = index_shard(self._handle(shard), self.locations[shard])
            found = int(index.chunk_first[-1])
            if found != self.expected[shard]:
                raise UserError(
                    f"shard {self.locations[shard]}: {self.expected[shard]} samples in manifest, {found} in file"
                )
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
        index, handle = self.index(shard), self._handle(shard)
        arrays = []
        for member in (index.tokens[number], index.seqs[number]):
            handle.seek(member.offset)
            arrays.append(np.load(io.BytesIO(handle.read(member.size)), allow_pickle=False))
        try:
            chunk = Chunk(index.keys[number], arrays[0], arrays[1])
        except ValueError as error:
            raise UserError(f"shard {self.locations[shard]}: {error}") from error
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
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __getstate__(self) -> dict[str, Any]:
        # Handles and caches stay in the process that made them; a worker starts empty.
        state = dict(self.__dict__)
        state.update(_handles=OrderedDict(), _chunks=OrderedDict(), indexes={}, chunks_read=0, _pid=-1)
        return state
