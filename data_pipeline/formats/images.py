"""The image shard format: standard WebDataset samples ``KEY.jpg`` and, when labelled, ``KEY.cls``.

``KEY`` is the hex digest of the image's source bytes; ``KEY.cls`` holds the class index in ASCII
digits (an index into the manifest's ``classes``). Tar metadata is fixed, so the same images in
the same order give the same bytes.
"""

from __future__ import annotations

import math
import tarfile
from collections.abc import Iterable, Iterator
from typing import IO, Any, Protocol

from data_pipeline.formats.tar import HashingWriter, add_member

IMAGE_SUFFIX = "jpg"
LABEL_SUFFIX = "cls"
TAR_BLOCK = 512


class ImageSample(Protocol):
    """What a shard stores of one image: its identity, its JPEG and its class index (-1: unlabelled)."""

    @property
    def digest(self) -> bytes: ...

    @property
    def jpeg(self) -> bytes: ...

    @property
    def label(self) -> int: ...


def sample_key(digest: bytes) -> str:
    """The WebDataset key of a sample: its digest in hex (no dots, unique once duplicates are gone)."""
    return digest.hex()


def _member_bytes(payload_bytes: int) -> int:
    return TAR_BLOCK + math.ceil(payload_bytes / TAR_BLOCK) * TAR_BLOCK


def sample_tar_bytes(jpeg_bytes: int, labelled: bool) -> int:
    """Tar bytes one sample adds to a shard: a header and padded payload per member."""
    return _member_bytes(jpeg_bytes) + (_member_bytes(2) if labelled else 0)


def write_image_shard(sink: IO[bytes], relative_path: str, images: Iterable[ImageSample]) -> dict[str, Any]:
    """Write ``images`` (in their final order) as one tar shard to ``sink``; the caller closes ``sink``.

    Args:
        sink: A binary stream; need not be seekable.
        relative_path: The shard's path relative to the output directory, recorded in the entry.
        images: The samples, in shard order.

    Returns:
        The manifest's ``shards[]`` entry: path, samples, images, bytes, sha256.
    """
    hashing = HashingWriter(sink)
    count = 0
    with tarfile.open(fileobj=hashing, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for image in images:
            key = sample_key(image.digest)
            add_member(tar, f"{key}.{IMAGE_SUFFIX}", image.jpeg)
            if image.label >= 0:
                add_member(tar, f"{key}.{LABEL_SUFFIX}", str(image.label).encode("ascii"))
            count += 1
    return {
        "path": relative_path,
        "samples": count,
        "images": count,
        "bytes": hashing.nbytes,
        "sha256": hashing.sha256.hexdigest(),
    }


def iter_tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {suffix: bytes})`` per WebDataset sample of a local tar, streamed in file order."""
    key, members = None, {}
    with tarfile.open(path, "r|") as tar:
        for member in tar:
            member_key, _, suffix = member.name.partition(".")
            if key is not None and member_key != key:
                yield key, members
                members = {}
            key = member_key
            handle = tar.extractfile(member)
            members[suffix] = handle.read() if handle else b""
    if key is not None:
        yield key, members
