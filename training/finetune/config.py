"""Typed fine-tuning configuration: ``task``, ``model``, ``train`` and a literal ``deepspeed`` section.

It reuses the pre-training config machinery (:mod:`training.config`): the same YAML section checking,
the same ``--set key.path=value`` overrides (precedence: ``--set`` > file > defaults) and the same
DeepSpeed batch arithmetic. The ``model:`` section is the pre-training one and is read only for
``--model none`` (the random-init baseline); a pre-trained model brings its own architecture.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_pipeline.errors import UserError
from training.config import ModelConfig, apply_overrides, build_section, deepspeed_section, read_config_file

TASK_TYPES = ("classification", "pair", "regression", "tokens", "image")
IMAGE_TASK_TYPES = ("image",)
"""Task types read from image shard directories (``pretrain prepare images``) with a ResNet encoder."""
DEFAULT_METRICS = {
    "image": "accuracy",
    "classification": "accuracy",
    "pair": "accuracy",
    "regression": "pearson",
    "tokens": "entity_f1",
}
TASK_METRICS = {
    "image": ("accuracy", "macro_f1", "mcc"),
    "classification": ("accuracy", "macro_f1", "mcc"),
    "pair": ("accuracy", "macro_f1", "mcc"),
    "regression": ("pearson", "spearman", "mse"),
    "tokens": ("entity_f1", "entity_precision", "entity_recall"),
}
LOWER_IS_BETTER = frozenset({"mse", "loss"})
POOLINGS = ("cls", "mean")
WARMUP_SHARE = 0.1
"""Share of the run's optimizer steps spent warming up when the scheduler names no ``warmup_num_steps``."""
FREEZE_PATTERN = re.compile(r"^(full|head|top-(\d+))$")


@dataclass
class TaskConfig:
    """What to predict and where the inputs are in the data files."""

    type: str = "classification"
    """``classification`` (one text), ``pair`` (two texts), ``regression`` (one or two texts), ``tokens``,
    or ``image`` (image classification on image shard directories)."""
    text: str = "text"
    """Column of the (first) text; for ``tokens`` the whitespace-split text when there is no tokens column."""
    text_pair: str = "text_pair"
    """Column of the second text (``pair``; ``regression`` uses it when present)."""
    label: str = "label"
    """Column of the label: a class name or number, or a real value for ``regression``."""
    tokens: str = "tokens"
    """``tokens`` task: column holding a list of words (else ``text`` is split on whitespace)."""
    tags: str = "tags"
    """``tokens`` task: column holding one BIO tag per word (a list, or a whitespace-separated string)."""
    max_seq_len: int = 128
    """Longest input in tokens, [CLS]/[SEP] included; longer inputs are truncated (and counted)."""
    pooling: str = "cls"
    """Sentence representation: ``cls`` (BERT's tanh pooler on [CLS]) or ``mean`` (mean of the tokens)."""
    image_size: int | None = None
    """``image`` task: side of the crops. Defaults to the pre-trained model's, else the manifest's size."""
    train_crop_scale_min: float = 0.08
    """``image`` task: smallest area share of the random resized crop of training images (1.0: whole image)."""
    eval_crop_fraction: float = 0.875
    """``image`` task: central share of the shorter side kept for evaluation (1.0 for small images)."""


@dataclass
class ResNetConfig:
    """The ResNet of ``--model none`` for image tasks (a pre-trained model brings its own)."""

    depth: int = 18
    """18, 34, 50 or 101."""
    cifar_stem: bool = False
    """3x3 stride-1 first convolution and no max-pool (for 32 px images)."""


@dataclass
class FinetuneTrainConfig:
    """Epochs, seed, evaluation and early stopping."""

    epochs: int = 3
    """Passes over the training file; each ends with an evaluation."""
    seed: int = 1234
    """Seed of the head initialisation, dropout, the random-init baseline and the example order."""
    metric: str = "auto"
    """Metric that picks the best epoch and drives early stopping; ``auto`` takes the task's first."""
    patience: int = 0
    """Stop after this many evaluations without improvement of ``metric`` (0: never stop early)."""
    freeze: str = "full"
    """``full`` (all trains), ``head`` (linear probe) or ``top-K`` (last K encoder layers + head)."""
    label_fraction: float = 1.0
    """Share of each class's training rows used (class-balanced, seeded by ``seed``): 0.01, 0.1 or 1.0."""
    head_dropout: float = 0.1
    """Dropout before the task head's output layer."""
    eval_batch_size: int = 64
    """Rows per evaluation batch on each rank."""
    log_every: int = 10
    """Log the training loss every this many optimizer steps."""


@dataclass
class FinetuneConfig:
    """The whole fine-tuning configuration, one attribute per YAML section."""

    task: TaskConfig = field(default_factory=TaskConfig)
    """The task and its columns."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture of the random-init baseline (``--model none``) only."""
    resnet: ResNetConfig = field(default_factory=ResNetConfig)
    """Architecture of the random-init image baseline (``--model none`` with ``task.type: image``) only."""
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    """Epochs, evaluation, early stopping and freezing."""
    tokenizer: str | None = None
    """SentencePiece model (file or directory) for ``--model none``; ``--tokenizer`` overrides it."""
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """The literal DeepSpeed config (train_batch_size is the global batch)."""


SECTIONS: dict[str, type] = {
    "task": TaskConfig,
    "model": ModelConfig,
    "resnet": ResNetConfig,
    "train": FinetuneTrainConfig,
}


def metric_name(config: FinetuneConfig) -> str:
    """The metric that chooses the best epoch (``train.metric``, or the task's default for ``auto``)."""
    return DEFAULT_METRICS[config.task.type] if config.train.metric == "auto" else config.train.metric


def parse_freeze(mode: str, key: str = "train.freeze") -> int | None:
    """The number of top encoder layers that train: None for ``full``, 0 for ``head``, K for ``top-K``.

    Raises:
        UserError: Not ``full``, ``head`` or ``top-K`` with K >= 1.
    """
    match = FREEZE_PATTERN.match(mode)
    if not match or (match.group(2) is not None and int(match.group(2)) < 1):
        raise UserError(f"{key} {mode!r}: expected full, head or top-K with K >= 1 (e.g. top-2)")
    if mode == "full":
        return None
    return 0 if mode == "head" else int(match.group(2))


def _check_values(config: FinetuneConfig) -> None:
    task, train = config.task, config.train
    if task.type not in TASK_TYPES:
        raise UserError(f"task.type {task.type!r}: expected one of {', '.join(TASK_TYPES)}")
    if task.pooling not in POOLINGS:
        raise UserError(f"task.pooling {task.pooling!r}: expected one of {', '.join(POOLINGS)}")
    if task.max_seq_len < 4:
        raise UserError(f"task.max_seq_len: expected at least 4, got {task.max_seq_len}")
    metric = metric_name(config)
    if metric not in TASK_METRICS[task.type]:
        raise UserError(
            f"train.metric {metric!r}: a {task.type} task reports {', '.join(TASK_METRICS[task.type])}"
        )
    for key in ("epochs", "eval_batch_size", "log_every"):
        if getattr(train, key) < 1:
            raise UserError(f"train.{key}: expected a positive int, got {getattr(train, key)}")
    if train.patience < 0:
        raise UserError(f"train.patience: expected an int >= 0, got {train.patience}")
    if not 0.0 < train.label_fraction <= 1.0:
        raise UserError(f"train.label_fraction: expected a value in (0, 1], got {train.label_fraction}")
    if not 0.0 < task.train_crop_scale_min <= 1.0 or not 0.0 < task.eval_crop_fraction <= 1.0:
        raise UserError(
            f"task.train_crop_scale_min {task.train_crop_scale_min} and task.eval_crop_fraction "
            f"{task.eval_crop_fraction}: expected values in (0, 1]"
        )
    if task.image_size is not None and task.image_size < 1:
        raise UserError(f"task.image_size: expected a positive int, got {task.image_size}")
    if not 0.0 <= train.head_dropout < 1.0:
        raise UserError(f"train.head_dropout: expected a value in [0, 1), got {train.head_dropout}")
    parse_freeze(train.freeze)


def config_from_dict(raw: dict[str, Any]) -> FinetuneConfig:
    """Build and type-check a :class:`FinetuneConfig` from a (merged) YAML mapping."""
    unknown = sorted(set(raw) - set(SECTIONS) - {"deepspeed", "tokenizer"})
    if unknown:
        raise UserError(f"{unknown[0]}: unknown section (known: {', '.join(SECTIONS)}, tokenizer, deepspeed)")
    sections = {name: build_section(name, cls, raw.get(name)) for name, cls in SECTIONS.items()}
    deepspeed = deepspeed_section(raw)
    tokenizer = raw.get("tokenizer")
    if tokenizer is not None and not isinstance(tokenizer, str):
        raise UserError(f"tokenizer: expected a path, got {tokenizer!r}")
    config = FinetuneConfig(deepspeed=deepspeed, tokenizer=tokenizer, **sections)
    _check_values(config)
    return config


def load_finetune_config(path: str | Path, overrides: Sequence[str] = ()) -> FinetuneConfig:
    """Read a fine-tuning YAML file and apply ``--set`` overrides.

    Args:
        path: The YAML file.
        overrides: ``key.path=value`` items, applied in order. Defaults to none.

    Raises:
        UserError: The file is missing or not YAML, a key is unknown or a value is of the wrong type.
    """
    return config_from_dict(apply_overrides(read_config_file(path), overrides))


def config_yaml(config: FinetuneConfig) -> str:
    """The resolved config as YAML (printed at start and saved as RUN_DIR/config.yaml)."""
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False, default_flow_style=False)


def warmup_steps(total_steps: int) -> int:
    """Warm-up steps of a run of ``total_steps`` optimizer steps: ``WARMUP_SHARE`` of it, at least one.

    Fine-tuning runs differ in length by orders of magnitude; 10% warm-up is the usual BERT recipe.
    """
    return max(1, round(WARMUP_SHARE * total_steps))
