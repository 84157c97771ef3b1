"""Two-view image loader for SimCLR: JPEG decode and random resized crops in DataLoader workers.

Reads the shards of ``pretrain prepare images`` (WebDataset samples ``KEY.jpg`` + optional
``KEY.cls``) by random access: each shard is indexed once by scanning its tar headers, after which
an image is one seek and one read. The epoch order, the split of a global batch over ranks and
micro steps, the equal step count of every rank and the ``(epoch, position)`` state are those of
the text loader (:mod:`training.order`, :class:`training.data.PretrainLoader`), so resuming at a
step boundary gives the same next batches bit for bit, and resuming with another world size shares
the rest of the epoch out anew.

Each image yields two crops (scale 0.08-1 of the area, aspect 3/4-4/3, as torchvision's
``RandomResizedCrop``) drawn from a generator keyed by ``(seed, epoch, global position)``, so a
crop does not depend on world size or worker count. The JPEG is decoded at the smallest of its
1/1, 1/2, 1/4, 1/8 scales (``Image.draft``) that still gives both crops at least the target size.
Batches hold uint8 ``(m, 3, S, S)`` views; the colour augmentations run on the training device
(:mod:`training.simclr.augment`).
"""

from __future__ import annotations

import io
import math
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import IO, Any

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image

from data_pipeline.errors import UserError
from data_pipeline.shard_format import IMAGE_FORMAT_NAME, MANIFEST_NAME, ManifestError
from training.data import PretrainLoader, _iterate, _ValidationStream
from training.order import EpochOrder, make_partition, order_rng, sequential_ids, steps_per_epoch
from training.shards import ShardReader, check_split, join_location, read_manifest, split_identity

DEFAULT_IMAGE_WINDOW = 4096
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
NO_LABEL = -1
_CROP_STREAM = 16  # distinct from training.order's streams
Box = tuple[float, float, float, float]
"""``(left, top, right, bottom)`` in pixels of the full-size image."""


@dataclass(frozen=True)
class CropConfig:
    """Random resized crop of the loader (torchvision's ``RandomResizedCrop`` ranges by default)."""

    scale_min: float = 0.08
    """Smallest share of the image area a crop covers."""
    scale_max: float = 1.0
    """Largest share of the image area a crop covers."""
    ratio_min: float = 3 / 4
    """Smallest width / height of a crop."""
    ratio_max: float = 4 / 3
    """Largest width / height of a crop."""

    def validate(self) -> None:
        """Raise ``UserError`` for an empty or out-of-range interval."""
        if not 0 < self.scale_min <= self.scale_max <= 1:
            raise UserError(
                f"crop scale ({self.scale_min}, {self.scale_max}) must satisfy 0 < min <= max <= 1"
            )
        if not 0 < self.ratio_min <= self.ratio_max:
            raise UserError(f"crop ratio ({self.ratio_min}, {self.ratio_max}) must satisfy 0 < min <= max")


def random_resized_crop_box(rng: np.random.Generator, width: int, height: int, crop: CropConfig) -> Box:
    """``(left, top, right, bottom)`` of a random crop, by torchvision's RandomResizedCrop rule.

    Ten tries at a random area share and log-uniform aspect; if none fits, the central crop with
    the aspect clamped to the ratio range.
    """
    area = width * height
    log_ratio = (math.log(crop.ratio_min), math.log(crop.ratio_max))
    for _ in range(10):
        target = area * rng.uniform(crop.scale_min, crop.scale_max)
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w, crop_h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left = int(rng.integers(0, width - crop_w + 1))
            top = int(rng.integers(0, height - crop_h + 1))
            return left, top, left + crop_w, top + crop_h
    aspect = width / height
    if aspect < crop.ratio_min:
        crop_w, crop_h = width, round(width / crop.ratio_min)
    elif aspect > crop.ratio_max:
        crop_w, crop_h = round(height * crop.ratio_max), height
    else:
        crop_w, crop_h = width, height
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return left, top, left + crop_w, top + crop_h


def _random_boxes(
    rng: np.random.Generator, crop: CropConfig, count: int, width: int, height: int
) -> list[Box]:
    return [random_resized_crop_box(rng, width, height, crop) for _ in range(count)]


def center_crop_box(width: int, height: int, crop_fraction: float) -> Box:
    """The central square of side ``crop_fraction * min(width, height)`` (resize-then-center-crop)."""
    side = crop_fraction * min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def _central_box(crop_fraction: float, width: int, height: int) -> list[Box]:
    return [center_crop_box(width, height, crop_fraction)]


def decode_crops(
    data: bytes, boxes_of: Callable[[int, int], list[Box]], size: int, source: str
) -> NDArray[np.uint8]:
    """Decode an image once and resize each of its crop boxes to ``size`` x ``size``.

    Args:
        data: Encoded image bytes.
        boxes_of: ``(width, height) -> list of (left, top, right, bottom)`` in full-size pixels.
        size: Output side.
        source: Name of the image for error messages.

    Returns:
        (crops, size, size, 3) uint8.

    Raises:
        UserError: The bytes are not a decodable image.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            boxes = np.asarray(boxes_of(width, height), dtype=np.float64)  # (crops, 4)
            narrowest = (boxes[:, 2:] - boxes[:, :2]).min(axis=0)  # smallest crop width and height
            # JPEG decodes at 1/2, 1/4, 1/8 scale: ask for the least pixels that keep every crop >= size.
            image.draft(
                "RGB", (math.ceil(width * size / narrowest[0]), math.ceil(height * size / narrowest[1]))
            )
            scale = np.array([image.size[0] / width, image.size[1] / height] * 2)
            rgb = image.convert("RGB")
            crops = [
                np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR, box=tuple(box * scale)))
                for box in boxes
            ]
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UserError(f"image {source}: cannot decode ({error})") from error
    return np.stack(crops)


@dataclass
class _ImageMembers:
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


def index_image_shard(handle: IO[bytes], location: str) -> _ImageMembers:
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
    return _ImageMembers(
        keys,
        np.array([images[key].offset_data for key in keys], dtype=np.int64),
        np.array([images[key].size for key in keys], dtype=np.int64),
        np.array(
            [_parse_label(handle, labels[key], location) if key in labels else NO_LABEL for key in keys],
            dtype=np.int64,
        ),
    )


class ImageShardReader(ShardReader):
    """Random access to single images of a split's shards (file handles shared with ShardReader)."""

    def index(self, shard: int) -> _ImageMembers:  # type: ignore[override]
        """The image index of a shard (built on first use, then kept)."""
        if shard not in self.indexes:
            members = index_image_shard(self._handle(shard), self.locations[shard])
            if len(members.keys) != self.expected[shard]:
                raise UserError(
                    f"shard {self.locations[shard]}: {self.expected[shard]} samples in manifest, "
                    f"{len(members.keys)} images in file"
                )
            self.indexes[shard] = members  # type: ignore[assignment]
        return self.indexes[shard]  # type: ignore[return-value]

    def read(self, shard: int, sample: int) -> tuple[str, bytes, int]:
        """``(name, encoded bytes, label)`` of image ``sample`` of a shard."""
        members, handle = self.index(shard), self._handle(shard)
        handle.seek(int(members.offsets[sample]))
        name = f"{self.locations[shard]}:{members.keys[sample]}"
        return name, handle.read(int(members.sizes[sample])), int(members.labels[sample])


def read_image_manifest(data_dir: str, split: str) -> dict[str, Any]:
    """The manifest of an image data directory (local path or URL), with ``split`` checked."""
    manifest = read_manifest(str(data_dir), IMAGE_FORMAT_NAME)
    source = join_location(str(data_dir), MANIFEST_NAME)
    if not isinstance(manifest["classes"], list):
        raise ManifestError(
            f"manifest {source}: classes must be a list of names, got {manifest['classes']!r}"
        )
    check_split(manifest, source, split)
    return manifest


@dataclass
class ImageBatchBuilder:
    """Turns global positions into uint8 view batches (picklable: sent to DataLoader workers)."""

    data_dir: str
    shards: list[dict[str, Any]]
    image_size: int
    seed: int
    window_samples: int
    crop: CropConfig = CropConfig()
    eval_crop_fraction: float = 0.875
    reader: ImageShardReader = field(init=False)
    _orders: dict[int, EpochOrder] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.reader = ImageShardReader(self.data_dir, self.shards, self.window_samples)
        self.shard_samples = np.array([shard["samples"] for shard in self.shards], dtype=np.int64)

    def order(self, epoch: int) -> EpochOrder:
        """The epoch's order (the previous epoch's is dropped)."""
        if epoch not in self._orders:
            self._orders = {epoch: EpochOrder(self.shard_samples, self.seed, epoch, self.window_samples)}
        return self._orders[epoch]

    def train_batch(self, epoch: int, first: int, count: int) -> dict[str, Any]:
        """Two random crops of each image at positions ``first...first+count-1`` of the epoch's order."""
        positions = np.arange(first, first + count, dtype=np.int64)
        shards, samples = self.order(epoch).sample_ids(positions)
        views = np.empty((count, 2, self.image_size, self.image_size, 3), dtype=np.uint8)
        labels, names = np.empty(count, dtype=np.int64), []
        for row, (position, shard, sample) in enumerate(zip(positions, shards, samples)):
            name, data, labels[row] = self.reader.read(int(shard), int(sample))
            rng = order_rng(self.seed, epoch, _CROP_STREAM, int(position))
            views[row] = decode_crops(data, partial(_random_boxes, rng, self.crop, 2), self.image_size, name)
            names.append(name)
        # (m, 2, S, S, 3) -> two (m, 3, S, S) contiguous tensors
        channels_first = np.ascontiguousarray(views.transpose(1, 0, 4, 2, 3))
        return {
            "view1": torch.from_numpy(channels_first[0]),
            "view2": torch.from_numpy(channels_first[1]),
            "labels": torch.from_numpy(labels),
            "sample_ids": names,
        }

    def validation_batch(self, first: int, count: int) -> dict[str, Any]:
        """The central crop of images ``first...`` in manifest order (for kNN and evaluation)."""
        shards, samples = sequential_ids(self.shard_samples, np.arange(first, first + count, dtype=np.int64))
        images = np.empty((count, self.image_size, self.image_size, 3), dtype=np.uint8)
        labels, names = np.empty(count, dtype=np.int64), []
        for row, (shard, sample) in enumerate(zip(shards, samples)):
            name, data, labels[row] = self.reader.read(int(shard), int(sample))
            central = partial(_central_box, self.eval_crop_fraction)
            images[row] = decode_crops(data, central, self.image_size, name)[0]
            names.append(name)
        return {
            "images": torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
            "labels": torch.from_numpy(labels),
            "sample_ids": names,
        }


def make_image_builder(
    data_dir: str,
    split: str,
    image_size: int,
    seed: int,
    window_samples: int,
    crop: CropConfig,
    eval_crop_fraction: float = 0.875,
) -> tuple[dict[str, Any], ImageBatchBuilder]:
    """Read and check the manifest and options; return the manifest and a batch builder."""
    for name, value in (("image_size", image_size), ("window_samples", window_samples)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    if not 0 < eval_crop_fraction <= 1:
        raise UserError(f"eval_crop_fraction must be in (0, 1], got {eval_crop_fraction!r}")
    crop.validate()
    manifest = read_image_manifest(str(data_dir), split)
    builder = ImageBatchBuilder(
        str(data_dir),
        manifest["splits"][split]["shards"],
        image_size,
        seed,
        window_samples,
        crop,
        eval_crop_fraction,
    )
    return manifest, builder


class ImageLoader(PretrainLoader):
    """Two-view uint8 micro batches of one rank, epoch after epoch, resumable at step boundaries.

    Iteration, ``step_done``, ``state_dict`` and ``load_state_dict`` are the text loader's (same
    state keys and checks); only the batch builder differs. Each batch is a dict with ``view1``
    and ``view2`` (m, 3, S, S) uint8, ``labels`` (m,) int64 (-1 when unlabelled) and
    ``sample_ids`` (``shard:key``).

    Args:
        data_dir: Directory (or URL) holding ``manifest.json`` of ``pretrain prepare images``.
        split: Manifest split. Defaults to "train".
        global_batch_size: Images per optimizer step over all ranks (kept fixed across resumes).
        micro_batch_size: Images per forward pass of one rank.
        image_size: Side of the output crops in pixels. Defaults to 224.
        rank: This rank. Defaults to 0.
        world_size: Number of ranks. Defaults to 1.
        seed: Order and crop seed. Defaults to 0.
        crop: Random resized crop ranges. Defaults to ``CropConfig()``.
        num_workers: DataLoader processes decoding images. Defaults to 4.
        window_samples: Shuffle window within a shard, in images. Defaults to 4096.
    """

    def __init__(
        self,
        data_dir: str,
        *,
        split: str = "train",
        global_batch_size: int,
        micro_batch_size: int,
        image_size: int = 224,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        crop: CropConfig | None = None,
        num_workers: int = 4,
        window_samples: int = DEFAULT_IMAGE_WINDOW,
    ) -> None:
        # The parent's constructor reads a text manifest and tokenizer; set the same fields here.
        self._partition = make_partition(global_batch_size, micro_batch_size, world_size, rank)
        self.manifest, self._builder = make_image_builder(  # type: ignore[assignment]
            data_dir, split, image_size, seed, window_samples, crop or CropConfig()
        )
        self.split, self.seed, self.num_workers = split, seed, num_workers
        self.image_size = image_size
        self.classes: list[str] = list(self.manifest.get("classes", []))
        self.grad_accum: int = self._partition.grad_accum
        self.samples_per_epoch: int = self.manifest["splits"][split]["samples"]
        self.steps_per_epoch: int = steps_per_epoch(self.samples_per_epoch, global_batch_size, split)
        self._identity = split_identity(self.manifest, split)
        self._epoch, self._step = 0, 0


def image_eval_batches(
    data_dir: str,
    *,
    split: str = "val",
    micro_batch_size: int,
    image_size: int = 224,
    rank: int = 0,
    world_size: int = 1,
    eval_crop_fraction: float = 0.875,
    max_batches: int | None = None,
    num_workers: int = 0,
) -> Iterator[dict[str, Any]]:
    """One pass over a split in manifest order, central crops; each rank an equal contiguous slice.

    Every rank gets ``samples // world_size`` images (the remainder, fewer than ``world_size``, is
    left out) so that features gathered across ranks line up. Batches hold ``images`` (m, 3, S, S)
    uint8, ``labels`` and ``sample_ids``; the last may be smaller than ``micro_batch_size``.

    Args:
        data_dir: Directory (or URL) holding ``manifest.json``.
        split: The split ("train" for a kNN memory bank, "val" for its queries). Defaults to "val".
        micro_batch_size: Images per batch.
        image_size: Output side. Defaults to 224.
        rank: This rank. Defaults to 0.
        world_size: Number of ranks. Defaults to 1.
        eval_crop_fraction: Central share of the shorter side kept (224/256). Defaults to 0.875.
        max_batches: Stop after this many batches. Defaults to None (the whole slice).
        num_workers: DataLoader worker processes. Defaults to 0.
    """
    make_partition(micro_batch_size * world_size, micro_batch_size, world_size, rank)
    manifest, builder = make_image_builder(
        data_dir, split, image_size, 0, DEFAULT_IMAGE_WINDOW, CropConfig(), eval_crop_fraction
    )
    per_rank = manifest["splits"][split]["samples"] // world_size
    if per_rank < 1:
        raise UserError(
            f"split {split!r} of {data_dir} holds {manifest['splits'][split]['samples']} images, "
            f"fewer than world size {world_size}"
        )
    stream = _ValidationStream(builder, rank * per_rank, per_rank, micro_batch_size)  # type: ignore[arg-type]
    for number, batch in enumerate(_iterate(stream, num_workers)):
        if max_batches is not None and number >= max_batches:
            return
        yield batch
