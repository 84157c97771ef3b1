"""Two-view image batches for SimCLR: JPEG decode and random resized crops in DataLoader workers.

Reads the shards of ``pretrain prepare images`` by random access (:mod:`training.data.images`).
The epoch order, the split of a global batch over ranks and micro steps, the equal step count of
every rank and the ``(epoch, position)`` state are the step loader's
(:class:`training.data.loader.StepLoader`), as for text, so resuming at a step boundary gives the
same next batches bit for bit, and resuming with another world size shares the rest of the epoch
out anew.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image

from data_pipeline.errors import UserError
from data_pipeline.formats.manifest import split_identity
from training.data.files import DEFAULT_VERIFY, require_checksums
from training.data.images import ImageReader, read_image_manifest
from training.data.loader import StepLoader, check_eval_partition, eval_batches
from training.order import make_partition, order_rng

DEFAULT_IMAGE_WINDOW = 4096
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
class ImageSource:
    """One split of image shards as two-view or central-crop batches (a ``BatchSource``)."""

    data_dir: str
    manifest: dict[str, Any]
    split: str
    image_size: int
    seed: int
    window_samples: int
    crop: CropConfig = CropConfig()
    eval_crop_fraction: float = 0.875
    verify: str = DEFAULT_VERIFY
    shard_samples: NDArray[np.int64] = field(init=False)
    identity: str = field(init=False)
    reader: ImageReader = field(init=False)

    def __post_init__(self) -> None:
        shards = self.manifest["splits"][self.split]["shards"]
        self.reader = ImageReader(self.data_dir, shards, self.verify)
        self.shard_samples = np.array([shard["samples"] for shard in shards], dtype=np.int64)
        self.identity = split_identity(self.manifest, self.split)

    @property
    def classes(self) -> list[str]:
        """Class names of the labels (empty for unlabelled images)."""
        return list(self.manifest.get("classes", []))

    def train_batch(
        self, epoch: int, positions: NDArray[np.int64], shards: NDArray[np.int64], samples: NDArray[np.int64]
    ) -> dict[str, Any]:
        """Two random crops of each image, drawn by ``(seed, epoch, position)``."""
        count = len(positions)
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

    def validation_batch(
        self, positions: NDArray[np.int64], shards: NDArray[np.int64], samples: NDArray[np.int64]
    ) -> dict[str, Any]:
        """The central crop of each image (for kNN and evaluation)."""
        images = np.empty((len(positions), self.image_size, self.image_size, 3), dtype=np.uint8)
        labels, names = np.empty(len(positions), dtype=np.int64), []
        central = partial(_central_box, self.eval_crop_fraction)
        for row, (shard, sample) in enumerate(zip(shards, samples)):
            name, data, labels[row] = self.reader.read(int(shard), int(sample))
            images[row] = decode_crops(data, central, self.image_size, name)[0]
            names.append(name)
        return {
            "images": torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
            "labels": torch.from_numpy(labels),
            "sample_ids": names,
        }


def image_source(
    data_dir: str,
    split: str,
    image_size: int,
    seed: int,
    window_samples: int,
    crop: CropConfig,
    eval_crop_fraction: float = 0.875,
    verify: str = DEFAULT_VERIFY,
) -> ImageSource:
    """Read and check the manifest and options of an image data directory; return the split's source.

    The split's shards are checked as ``verify`` says (:mod:`training.data.files`).
    """
    for name, value in (("image_size", image_size), ("window_samples", window_samples)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    if not 0 < eval_crop_fraction <= 1:
        raise UserError(f"eval_crop_fraction must be in (0, 1], got {eval_crop_fraction!r}")
    crop.validate()
    manifest = read_image_manifest(str(data_dir), split)
    require_checksums(str(data_dir), manifest["splits"][split]["shards"], verify)
    return ImageSource(
        str(data_dir), manifest, split, image_size, seed, window_samples, crop, eval_crop_fraction, verify
    )


def image_loader(
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
    verify: str = DEFAULT_VERIFY,
) -> StepLoader[ImageSource]:
    """The resumable loader of two-view uint8 micro batches of one rank.

    Each batch is a dict with ``view1`` and ``view2`` (m, 3, S, S) uint8, ``labels`` (m,) int64
    (-1 when unlabelled) and ``sample_ids`` (``shard:key``).

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
        verify: Shard checks, ``full``, ``size`` or ``none``. Defaults to full.
    """
    partition = make_partition(global_batch_size, micro_batch_size, world_size, rank)
    source = image_source(
        data_dir, split, image_size, seed, window_samples, crop or CropConfig(), verify=verify
    )
    return StepLoader(source, partition, split=split, seed=seed, num_workers=num_workers)


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
    verify: str = DEFAULT_VERIFY,
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
        verify: Shard checks, ``full``, ``size`` or ``none``. Defaults to full.
    """
    check_eval_partition(micro_batch_size, rank, world_size)
    source = image_source(
        data_dir, split, image_size, 0, DEFAULT_IMAGE_WINDOW, CropConfig(), eval_crop_fraction, verify
    )
    total = int(source.shard_samples.sum())
    yield from eval_batches(
        source,
        micro_batch_size=micro_batch_size,
        rank=rank,
        world_size=world_size,
        max_batches=max_batches,
        num_workers=num_workers,
        too_few=f"split {split!r} of {data_dir} holds {total} images, fewer than world size {world_size}",
    )
