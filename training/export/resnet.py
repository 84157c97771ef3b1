"""The ResNet export of a SimCLR run: the encoder under torchvision's names, plus config.json.

The export directory holds ``model.safetensors`` (the encoder: ``torchvision.models.resnet18/50()``
loads it with ``strict=False`` and misses only ``fc.*``), ``config.json`` (the architecture, the
preprocessing and our record under ``pretrain``) and a model card ``README.md``. The projection head
is a pre-training device and is left out, as in SimCLR's evaluation protocol.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml

from data_pipeline.errors import UserError
from training import checkpoint as ckpt
from training.export.checkpoints import consolidate, final_metrics, find_checkpoint
from training.export.files import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ExportFiles,
    card_tables,
    check_dtype,
    publish,
    read_export_config,
    read_weights,
)
from training.models.resnet import ResNet, resnet
from training.simclr import build_simclr
from training.simclr.augment import IMAGENET_MEAN, IMAGENET_STD

EXPORT_FORMAT = "torchvision"
ENCODER_PREFIX = "encoder."
METHOD = "simclr"
"""The pre-training method whose runs export a ResNet (recorded as ``objective`` in the trainer state)."""


def run_method(run_dir: Path, step: int | None = None) -> str:
    """The pre-training method of a run's checkpoint (``bert`` for checkpoints that record none).

    Every checkpoint of a run records the same method, so the JSON state of the newest readable one
    answers without the file checks :func:`find_checkpoint` makes (the export makes them once, later).

    Raises:
        UserError: As :func:`~training.export.checkpoints.find_checkpoint`, when no state is readable.
    """
    checkpoint_dir = run_dir / "checkpoints"
    tags = ckpt.complete_tags(checkpoint_dir) if step is None else [ckpt.tag_for_step(step)]
    for tag in reversed(tags):
        try:
            return str(ckpt.read_trainer_state(checkpoint_dir / tag).get("objective", "bert"))
        except UserError:
            continue
    return str(ckpt.read_trainer_state(find_checkpoint(run_dir, step)).get("objective", "bert"))


def encoder_of(model_config: dict[str, Any], source: str) -> ResNet:
    """An untrained encoder of the recorded architecture (for names and shapes).

    Raises:
        UserError: A model config without ``depth``/``cifar_stem`` (not a SimCLR run's).
    """
    if not isinstance(model_config.get("depth"), int) or not isinstance(model_config.get("cifar_stem"), bool):
        raise UserError(f"{source}: model_config {model_config!r} lacks depth and cifar_stem of a ResNet")
    return resnet(model_config["depth"], num_classes=None, cifar_stem=model_config["cifar_stem"])


def check_encoder_state(
    state_dict: dict[str, torch.Tensor], model_config: dict[str, Any], source: str
) -> None:
    """Refuse encoder weights whose names or shapes differ from the recorded ResNet.

    Raises:
        UserError: Naming ``source``, the missing and unexpected keys, or the first shape that differs.
    """
    with torch.device("meta"):
        expected = encoder_of(model_config, source).state_dict()
    missing, unexpected = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise UserError(f"{source}: encoder weights do not fit: missing {missing}, unexpected {unexpected}")
    for name, tensor in expected.items():
        if tuple(state_dict[name].shape) != tuple(tensor.shape):
            raise UserError(
                f"{source}: {name} has shape {tuple(state_dict[name].shape)}, expected {tuple(tensor.shape)}"
            )


def preprocessing_of(run_dir: Path) -> dict[str, Any]:
    """Image size, evaluation crop and normalisation of a run (from RUN_DIR/config.yaml when present)."""
    section: dict[str, Any] = {}
    path = run_dir / "config.yaml"
    if path.is_file():
        section = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("simclr") or {}
    preprocessing = {key: section[key] for key in ("image_size", "eval_crop_fraction") if key in section}
    return {**preprocessing, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def read_simclr_checkpoint(
    run_dir: Path, step: int | None = None, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """Consolidate a SimCLR run's checkpoint: (model config, encoder state_dict in torchvision names, card).

    Raises:
        UserError: As :func:`~training.export.checkpoints.find_checkpoint` and
            :func:`~training.export.checkpoints.consolidate`, or a checkpoint that is not SimCLR's.
    """
    tag_dir = find_checkpoint(run_dir, step)
    state = ckpt.read_trainer_state(tag_dir)
    if state.get("objective") != METHOD or "model_config" not in state:
        raise UserError(
            f"checkpoint {tag_dir}: not a simclr checkpoint (objective {state.get('objective')!r})"
        )
    model_config = dict(state["model_config"])
    build = partial(
        build_simclr,
        model_config["depth"],
        model_config["cifar_stem"],
        model_config.get("projection_hidden_dim"),
        model_config.get("projection_dim", 128),
    )
    full, notes = consolidate(tag_dir, int(state["zero_stage"]), build, dtype)
    encoder = {name[len(ENCODER_PREFIX) :]: t for name, t in full.items() if name.startswith(ENCODER_PREFIX)}
    check_encoder_state(encoder, model_config, f"checkpoint {tag_dir}")
    training = {key: state[key] for key in ("step", "samples_seen", "epoch", "world_size") if key in state}
    card = {
        "source": str(tag_dir),
        "training": training,
        "data": {"data folder": state.get("data_dir")},
        "metrics": {key: value for key, value in final_metrics(run_dir).items() if key != "step"},
        "notes": notes,
        "preprocessing": preprocessing_of(run_dir),
    }
    return model_config, encoder, card


def export_config(
    model_config: dict[str, Any], dtype: str, preprocessing: dict[str, Any], num_classes: int | None
) -> dict[str, Any]:
    """config.json of a ResNet export (``num_classes`` None: the encoder alone)."""
    return {
        "architecture": f"resnet{model_config['depth']}",
        "depth": model_config["depth"],
        "cifar_stem": model_config["cifar_stem"],
        "feature_dim": model_config.get("feature_dim"),
        "num_classes": num_classes,
        "preprocessing": preprocessing,
        "pretrain": {"format": EXPORT_FORMAT, "dtype": dtype, "model_config": model_config},
    }


def card_text(model_config: dict[str, Any], dtype: str, card: dict[str, Any]) -> str:
    """The model card: architecture, how to load it, training progress and final metrics."""
    stem = "CIFAR stem (3x3 stride-1 conv1, no max-pool)" if model_config["cifar_stem"] else "ImageNet stem"
    lines = [
        f"# ResNet-{model_config['depth']} encoder pre-trained with SimCLR (`pretrain`)",
        "",
        f"Weights stored as {dtype} in `{WEIGHTS_FILE}` under torchvision's names, {stem}, no `fc`:",
        "",
        f"    model = torchvision.models.resnet{model_config['depth']}()",
        "    model.load_state_dict(safetensors.torch.load_file('model.safetensors'), strict=False)  # misses fc.*",
    ]
    if model_config["cifar_stem"]:
        lines += [
            "",
            "Replace `conv1` by a 3x3 stride-1 convolution and `maxpool` by an identity before loading.",
        ]
    if card.get("source"):
        lines += ["", f"Exported from `{card['source']}`."]
    sections = (("Training", "training"), ("Preprocessing", "preprocessing"), ("Final metrics", "metrics"))
    lines += card_tables(card, sections, str)
    return "\n".join(lines) + "\n"


def write_resnet_export(
    out_dir: Path | str,
    encoder: dict[str, torch.Tensor],
    model_config: dict[str, Any],
    *,
    dtype: str = "fp32",
    card: dict[str, Any] | None = None,
    classifier: dict[str, torch.Tensor] | None = None,
    extra_config: dict[str, Any] | None = None,
) -> None:
    """Write model.safetensors, config.json and README.md into a staging folder, then move them in place.

    Args:
        out_dir: Destination; created, or its export files replaced.
        encoder: The encoder's state_dict under torchvision's names (no ``fc``).
        model_config: The recorded architecture (``depth``, ``cifar_stem``, ``feature_dim``...).
        dtype: ``fp32``, ``bf16`` or ``fp16``. Defaults to ``fp32``.
        card: Facts for the model card (``source``, ``training``, ``preprocessing``, ``metrics``, ``notes``).
        classifier: A fine-tuned ``fc.weight``/``fc.bias``, stored beside the encoder (the model then loads
            into ``torchvision.models.resnetN(num_classes=C)`` strictly). Defaults to None.
        extra_config: Top-level keys added to config.json (e.g. ``finetune``). Defaults to None.

    Raises:
        UserError: Unknown dtype, or weights that do not fit the recorded ResNet.
    """
    check_dtype(dtype)
    check_encoder_state(encoder, model_config, "weights to export")
    card = dict(card or {})
    num_classes = int(classifier["fc.weight"].shape[0]) if classifier else None
    config = {
        **export_config(model_config, dtype, card.get("preprocessing") or {}, num_classes),
        **(extra_config or {}),
    }
    weights = {**encoder, **(classifier or {})}
    publish(out_dir, ExportFiles(weights, config, card_text(model_config, dtype, card)), dtype)


def load_image_encoder(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """Pre-trained encoder weights (torchvision names, fp32) from an export or a SimCLR run directory.

    A fine-tuned export's classifier (``fc.*``) is left out.

    Returns:
        The recorded architecture, the encoder state_dict and the preprocessing (image size, normalisation).

    Raises:
        UserError: ``path`` is neither, or its weights do not fit its config.
    """
    root = Path(path)
    if (root / CONFIG_FILE).is_file():
        config = read_export_config(root)
        model_config = dict(config["pretrain"]["model_config"])
        encoder = read_weights(root, keep=lambda name: not name.startswith("fc."))
        check_encoder_state(encoder, model_config, str(root / WEIGHTS_FILE))
        return model_config, encoder, dict(config.get("preprocessing") or {})
    if (root / "checkpoints").is_dir():
        model_config, encoder, card = read_simclr_checkpoint(root)
        return model_config, encoder, card["preprocessing"]
    raise UserError(f"{path}: neither an export directory ({CONFIG_FILE}) nor a run directory (checkpoints/)")
