"""Image classification on a ResNet encoder: image shards, linear probe or fine-tuning, ResNet export.

``--train`` and ``--eval`` are directories of ``pretrain prepare images``. When they are the same
directory its ``train`` split trains and its ``val`` split evaluates; otherwise ``--eval``'s ``val``
split (its ``train`` split when it has no ``val``) evaluates. Training images get a random resized crop
and a horizontal flip drawn from ``(seed, epoch, row)``; evaluation images the central crop. The encoder
comes from a SimCLR export or run directory, or is random (``--model none``, the baseline).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn

from data_pipeline.errors import UserError
from training.data.images import ImageReader, read_image_manifest
from training.finetune.base import FinetuneOptions
from training.finetune.config import FinetuneConfig, parse_freeze
from training.finetune.heads import TaskOutput
from training.finetune.metrics import classification_scores
from training.finetune.subsets import class_balanced_subset
from training.models.resnet import ResNet, resnet
from training.simclr.augment import IMAGENET_MEAN, IMAGENET_STD
from training.simclr.images import CropConfig, center_crop_box, decode_crops, random_resized_crop_box

STAGES = ("layer1", "layer2", "layer3", "layer4")
"""The ResNet stages ``top-K`` unfreezes from the top."""


@dataclass
class ImageSplit:
    """The labelled images of one split of a shard directory, in manifest order."""

    location: str
    """``DIR (split)``, for messages."""
    reader: ImageReader
    shards: NDArray[np.int64]
    samples: NDArray[np.int64]
    labels: NDArray[np.int64]
    classes: list[str]
    image_size: int
    """The manifest's stored image size."""

    def subset(self, rows: NDArray[np.int64]) -> ImageSplit:
        """The same split restricted to ``rows``."""
        return ImageSplit(
            self.location,
            self.reader,
            self.shards[rows],
            self.samples[rows],
            self.labels[rows],
            self.classes,
            self.image_size,
        )


def read_split(data_dir: str, split: str) -> ImageSplit:
    """Index the images of ``split`` (tar headers only) and read their labels.

    Raises:
        UserError: No manifest, no such split, or images without a class (an unlabelled directory).
    """
    manifest = read_image_manifest(data_dir, split)
    entries = manifest["splits"][split]["shards"]
    reader = ImageReader(str(data_dir), entries)
    counts = [int(entry["samples"]) for entry in entries]
    labels = np.concatenate([reader.index(shard).labels for shard in range(len(entries))])
    location = f"{data_dir} ({split})"
    unlabelled = int((labels < 0).sum())
    if unlabelled or not manifest.get("classes"):
        raise UserError(
            f"{location}: {unlabelled} of {len(labels)} images have no class; an image task needs shards "
            "prepared from class folders (or parquet with a label column)"
        )
    return ImageSplit(
        location,
        reader,
        np.repeat(np.arange(len(entries), dtype=np.int64), counts),
        np.concatenate([np.arange(count, dtype=np.int64) for count in counts]),
        labels,
        list(manifest["classes"]),
        int(manifest["image_size"]),
    )


def eval_split_name(train_dir: str, eval_dir: str) -> str:
    """``val`` for the same directory as ``--train`` or one that has it; else ``train``."""
    if Path(train_dir).resolve() == Path(eval_dir).resolve():
        return "val"
    manifest = read_image_manifest(eval_dir, "train") if Path(eval_dir).is_dir() else {}
    return "val" if "val" in (manifest.get("splits") or {}) else "train"


def load_image_splits(
    train_dir: str, eval_dir: str, fraction: float, seed: int
) -> tuple[ImageSplit, ImageSplit]:
    """The training split (a class-balanced ``fraction`` of it) and the evaluation split.

    Raises:
        UserError: As :func:`read_split`, a same-directory run without a ``val`` split, or class lists
            that differ between the two directories.
    """
    train = read_split(train_dir, "train")
    eval_name = eval_split_name(train_dir, eval_dir)
    try:
        evaluation = read_split(eval_dir, eval_name)
    except UserError as error:
        if eval_name == "val" and "val" in str(error):
            raise UserError(
                f"--eval {eval_dir}: no val split to evaluate on (prepare it with --val-fraction, or pass a "
                f"separate --eval directory): {error}"
            ) from error
        raise
    if evaluation.classes != train.classes:
        raise UserError(
            f"--eval {evaluation.location} has classes {evaluation.classes}, --train {train.location} has "
            f"{train.classes}: they must be the same list"
        )
    return train.subset(class_balanced_subset(train.labels, fraction, seed)), evaluation


BoxesOf = Callable[[int, int], list[tuple[float, float, float, float]]]
"""``(width, height) -> [(left, top, right, bottom)]``: the crop boxes of one image (``decode_crops``)."""


def decode_rows(
    split: ImageSplit, rows: Sequence[int], size: int, boxes_for: Callable[[int], BoxesOf]
) -> NDArray[np.uint8]:
    """(len(rows), 3, size, size) uint8 crops; ``boxes_for(row)`` gives the crop boxes of that row's image."""
    images = np.empty((len(rows), size, size, 3), dtype=np.uint8)
    for position, row in enumerate(rows):
        name, data, _ = split.reader.read(int(split.shards[row]), int(split.samples[row]))
        images[position] = decode_crops(data, boxes_for(row), size, name)[0]
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def _random_box(
    rng: np.random.Generator, crop: CropConfig, width: int, height: int
) -> list[tuple[float, float, float, float]]:
    return [random_resized_crop_box(rng, width, height, crop)]


def _central_box(fraction: float, width: int, height: int) -> list[tuple[float, float, float, float]]:
    return [center_crop_box(width, height, fraction)]


class ImageTaskModel(nn.Module):
    """A ResNet encoder, a parameter-free BatchNorm of its features and a linear classifier ``fc``.

    The feature norm (MAE's and MoCo v3's linear-probe practice) makes the probe independent of the
    encoder's feature scale, which differs between a pre-trained and a random encoder by orders of
    magnitude; it is folded into ``fc`` on export (:func:`fold_feature_norm`). Frozen stages stay in eval
    mode while training, so a linear probe neither uses nor changes their BatchNorm statistics.

    Args:
        encoder: ResNet without ``fc``.
        classes: Number of classes.
        dropout: Dropout before ``fc``.
    """

    def __init__(self, encoder: ResNet, classes: int, dropout: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.feature_norm = nn.BatchNorm1d(encoder.feature_dim, affine=False)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(encoder.feature_dim, classes)
        self.frozen: list[nn.Module] = []

    def train(self, mode: bool = True) -> ImageTaskModel:
        super().train(mode)
        for module in self.frozen:
            module.eval()
        return self

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> TaskOutput:
        """(B, 3, H, W) normalised images -> (B, classes) logits, and the cross-entropy with labels."""
        logits = self.fc(self.dropout(self.feature_norm(self.encoder(images))))
        return TaskOutput(None if labels is None else F.cross_entropy(logits.float(), labels), logits)


def fold_feature_norm(state: dict[str, torch.Tensor], eps: float = 1e-5) -> dict[str, torch.Tensor]:
    """``fc.weight``/``fc.bias`` with the feature norm folded in: ``W (x - mean) / std + b`` as one Linear.

    Args:
        state: The task model's state_dict (``feature_norm.running_*`` and ``fc.*``).
        eps: The norm's epsilon. Defaults to BatchNorm's 1e-5.
    """
    scale = (state["feature_norm.running_var"].double() + eps).rsqrt()  # (features,)
    weight = state["fc.weight"].double() * scale  # (classes, features)
    bias = state["fc.bias"].double() - weight @ state["feature_norm.running_mean"].double()
    return {"fc.weight": weight.float(), "fc.bias": bias.float()}


def freeze_image_model(model: ImageTaskModel, mode: str) -> list[str]:
    """Apply ``full``, ``head`` or ``top-K`` (the last K of the 4 stages + ``fc``); return what trains.

    Raises:
        UserError: K larger than the number of stages.
    """
    top = parse_freeze(mode)
    if top is not None and top > len(STAGES):
        raise UserError(f"--freeze {mode}: a ResNet has {len(STAGES)} stages (layer1-layer4)")
    training = (
        None if top is None else ("fc.", *(f"encoder.{stage}." for stage in STAGES[len(STAGES) - top :]))
    )
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(training is None or name.startswith(training))
    if top is not None:
        # The stem and the frozen stages keep their BatchNorm statistics too.
        kept = set(STAGES[len(STAGES) - top :])
        model.frozen = [module for name, module in model.encoder.named_children() if name not in kept]
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


class ImageTask:
    """An ``image`` task: see the module docstring and :class:`training.finetune.base.Task`."""

    def __init__(self, config: FinetuneConfig, options: FinetuneOptions) -> None:
        from training.export.resnet import load_image_encoder

        self.config, self.location = config, options.model
        self.train, self.eval = load_image_splits(
            options.train_path, options.eval_path, config.train.label_fraction, config.train.seed
        )
        if options.model == "none":
            section = config.resnet
            preprocessing: dict[str, Any] = {}
            encoder = resnet(section.depth, num_classes=None, cifar_stem=section.cifar_stem)
            self.model_config = {
                "architecture": f"resnet{section.depth}",
                "depth": section.depth,
                "cifar_stem": section.cifar_stem,
                "feature_dim": encoder.feature_dim,
            }
        else:
            self.model_config, weights, preprocessing = load_image_encoder(options.model)
            encoder = resnet(
                self.model_config["depth"], num_classes=None, cifar_stem=self.model_config["cifar_stem"]
            )
            encoder.load_state_dict(weights)
        self.image_size = int(
            config.task.image_size or preprocessing.get("image_size") or self.train.image_size
        )
        self.mean = tuple(preprocessing.get("mean", IMAGENET_MEAN))
        self.std = tuple(preprocessing.get("std", IMAGENET_STD))
        self.model = ImageTaskModel(encoder, len(self.train.classes), config.train.head_dropout)
        self.trainable = freeze_image_model(self.model, config.train.freeze)

    @property
    def labels(self) -> list[str]:
        return self.train.classes

    @property
    def train_rows(self) -> int:
        return len(self.train.labels)

    @property
    def eval_rows(self) -> int:
        return len(self.eval.labels)

    def batch(self, indices: Sequence[int], split: str, epoch: int, device: torch.device) -> dict[str, Any]:
        """Normalised images and labels of rows ``indices``: augmented for ``train``, central crops for ``eval``."""
        task, seed = self.config.task, self.config.train.seed
        if split == "train":
            crop = CropConfig(scale_min=task.train_crop_scale_min)
            rngs = {row: np.random.default_rng([seed, epoch, int(row)]) for row in indices}
            images = decode_rows(
                self.train, indices, self.image_size, lambda row: partial(_random_box, rngs[row], crop)
            )
            flips = torch.tensor([bool(rngs[row].random() < 0.5) for row in indices])
            pixels = torch.from_numpy(images)
            pixels = torch.where(flips.view(-1, 1, 1, 1), pixels.flip(-1), pixels)
            labels = self.train.labels[list(indices)]
        else:
            central = partial(_central_box, task.eval_crop_fraction)
            pixels = torch.from_numpy(decode_rows(self.eval, indices, self.image_size, lambda row: central))
            labels = self.eval.labels[list(indices)]
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        images_float = (pixels.to(device).float() / 255.0 - mean) / std
        return {"images": images_float, "labels": torch.from_numpy(labels).to(device)}

    def predictions(self, logits: torch.Tensor, indices: Sequence[int]) -> list[Any]:
        return logits.argmax(-1).tolist()

    def score(self, predictions: list[Any]) -> tuple[dict[str, float], list[Any], list[Any]]:
        gold = [int(label) for label in self.eval.labels]
        names = self.train.classes
        return (
            classification_scores(predictions, gold),
            [names[i] for i in predictions],
            [names[i] for i in gold],
        )

    def write_best(self, out_dir: Path, state: dict[str, torch.Tensor], facts: dict[str, Any]) -> None:
        """A ResNet export: the encoder and ``fc`` under torchvision's names, the task under ``finetune``."""
        from training.export.resnet import write_resnet_export

        encoder = {
            name.removeprefix("encoder."): t for name, t in state.items() if name.startswith("encoder.")
        }
        classifier = fold_feature_norm(state)
        task = {
            "type": self.config.task.type,
            "labels": self.labels,
            "freeze": self.config.train.freeze,
            "label_fraction": self.config.train.label_fraction,
            "base_model": self.location,
            **facts,
        }
        preprocessing = {
            "image_size": self.image_size,
            "eval_crop_fraction": self.config.task.eval_crop_fraction,
            "mean": list(self.mean),
            "std": list(self.std),
        }
        card = {
            "source": f"fine-tuned from {self.location}",
            "metrics": facts,
            "preprocessing": preprocessing,
        }
        write_resnet_export(
            out_dir,
            encoder,
            self.model_config,
            card=card,
            classifier=classifier,
            extra_config={"finetune": task},
        )

    def describe(self) -> str:
        return (
            f"task image | model {self.location} ({self.model_config['architecture']}) | labels "
            f"{len(self.labels)} | train images {self.train_rows} of {self.train.location} | eval images "
            f"{self.eval_rows} of {self.eval.location} | image size {self.image_size}"
        )
