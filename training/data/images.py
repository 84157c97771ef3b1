"""Random access to single images of image shards (WebDataset samples ``KEY.jpg`` + optional ``KEY.cls``).

A shard is indexed once by scanning its tar headers, after which an image is one seek and one read.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
from numpy.typing import NDArray

from data_pipeline.errors import UserError
from data_pipeline.formats.location import join_location
from data_pipeline.formats.manifest import (
    IMAGE_FORMAT_NAME,
    MANIFEST_NAME,
    ManifestError,
    check_split,
    read_manifest,
)
from training.data.files import DEFAULT_VERIFY, ShardFiles

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
NO_LABEL = -1


@dataclass
class ImageMembers:
    """Where the images of one shard lie, in tar order, and their labels."""

    keys: list[str]
    offsets: NDArray[np.int64]
    sizes: NDArray[np.int64]
    labels: NDArray[np.int64]


def _member_key(name: str) -> tuple[str, str]:
    """WebDataset's split of a member name into key and suffix (at the first dot of the base name)."""
    folder, _, base = name.rpartition("/")
    stem, _, suffix = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), suffix.lower()


def _parse_label(handle: IO[bytes], member: tarfile.TarInfo, location: str) -> int:
    handle.seek(member.offset_data)
    text = handle.read(min(member.size, 32)).decode("ascii", errors="replace").strip()
    if not text.isdigit():
        raise UserError(f"shard {location}: {member.name} holds {text!r}, not a class index")
    return int(text)


def index_image_shard(handle: IO[bytes], location: str) -> ImageMembers:
    """Scan a shard's tar headers: offset and size of each image, label from its ``.cls`` (or -1)."""
    images: dict[str, tarfile.TarInfo] = {}
    labels: dict[str, tarfile.TarInfo] = {}
    try:
        with tarfile.open(fileobj=handle, mode="r:") as tar:
            members = [member for member in tar if member.isfile()]
    except (tarfile.TarError, EOFError) as error:
        raise UserError(f"shard {location}: not a readable tar ({error})") from error
    for member in members:
        key, suffix = _member_key(member.name)
        if suffix in IMAGE_SUFFIXES:
            if key in images:
                raise UserError(f"shard {location}: sample {key!r} has more than one image")
            images[key] = member
        elif suffix == "cls":
            labels[key] = member
    keys = list(images)  # tar order: the order the image job wrote (already shuffled)
    return ImageMembers(
        keys,
        np.array([images[key].offset_data for key in keys], dtype=np.int64),
        np.array([images[key].size for key in keys], dtype=np.int64),
        np.array(
            [_parse_label(handle, labels[key], location) if key in labels else NO_LABEL for key in keys],
            dtype=np.int64,
        ),
    )


class ImageReader:
    """Random access to single images of a split's shards (one per process).

    Args:
        data_dir: The data directory (local path or URL).
        shards: The split's ``shards`` entries from the manifest.
        verify: How the shard files are checked (:class:`ShardFiles`). Defaults to ``DEFAULT_VERIFY``.
    """

    def __init__(self, data_dir: str, shards: list[dict[str, Any]], verify: str = DEFAULT_VERIFY) -> None:
        self.files = ShardFiles(data_dir, shards, verify)
        self.indexes: dict[int, ImageMembers] = {}

    def index(self, shard: int) -> ImageMembers:
        """The image index of a shard (built on first use, then kept)."""
        if shard not in self.indexes:
            members = index_image_shard(self.files.handle(shard), self.files.locations[shard])
            self.files.check_count(shard, len(members.keys), "images")
            self.indexes[shard] = members
        return self.indexes[shard]

    def read(self, shard: int, sample: int) -> tuple[str, bytes, int]:
        """``(name, encoded bytes, label)`` of image ``sample`` of a shard."""
        members = self.index(shard)
        data = self.files.read(shard, int(members.offsets[sample]), int(members.sizes[sample]))
        name = f"{self.files.locations[shard]}:{members.keys[sample]}"
        return name, data, int(members.labels[sample])

    def close(self) -> None:
        """Close this process's shard files."""
        self.files.close()

    def __getstate__(self) -> dict[str, Any]:
        # Indexes stay in the process that made them; a worker starts empty.
        state = dict(self.__dict__)
        state.update(indexes={})
        return state


def read_image_manifest(data_dir: str, split: str) -> dict[str, Any]:
    """The manifest of an image data directory (local path or URL), with ``split`` checked."""
    manifest = read_manifest(str(data_dir), IMAGE_FORMAT_NAME)
    source = join_location(str(data_dir), MANIFEST_NAME)
    if not isinstance(manifest["classes"], list):
        raise ManifestError(f"manifest {source}: classes must be a list of names, got {manifest['classes']!r}")
    check_split(manifest, source, split)
    return manifest
