"""The export directory on disk: file names, the staged write (cast, then publish at once) and the readers."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from data_pipeline.errors import UserError
from training.dtypes import DTYPES

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"


def check_dtype(dtype: str) -> None:
    """Refuse a stored dtype name that is not one of :data:`training.dtypes.DTYPES`.

    Raises:
        UserError: Naming the option, its value and the choices.
    """
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")


def cast(tensors: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Contiguous tensors, the floating-point ones in ``dtype`` (``fp32``, ``bf16`` or ``fp16``)."""
    target = DTYPES[dtype]
    return {
        name: tensor.detach().to(target).contiguous() if tensor.is_floating_point() else tensor.contiguous()
        for name, tensor in tensors.items()
    }


@dataclass
class ExportFiles:
    """Everything one export directory holds, ready to be written."""

    weights: dict[str, torch.Tensor]
    """Tensors of model.safetensors, before the cast (no two names on one storage)."""
    config: dict[str, Any]
    """config.json."""
    card: str
    """The model card, README.md."""
    copies: dict[str, Path] = field(default_factory=dict)
    """Files copied in unchanged: name in the export -> source file."""
    writers: list[Callable[[Path], None]] = field(default_factory=list)
    """Functions that write further files into the (staging) folder they are given."""


def publish(out_dir: Path | str, files: ExportFiles, dtype: str) -> None:
    """Write ``files`` into a temporary sibling of ``out_dir``, then move each into ``out_dir``.

    An interrupted export never leaves a folder that looks complete, and a re-export replaces the export
    files of an existing folder (other files there are kept).

    Args:
        out_dir: Destination; created when absent.
        files: The contents.
        dtype: Stored floating-point type: ``fp32``, ``bf16`` or ``fp16``.
    """
    out_dir = Path(out_dir).resolve()
    staging = out_dir.with_name(f".{out_dir.name}.partial{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    # The cast copy lives only while it is written: the peak is the caller's weights plus one copy.
    save_file(cast(files.weights, dtype), str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
    (staging / WEIGHTS_FILE).chmod(0o644)  # safetensors creates it owner-only; an export is for sharing
    (staging / CONFIG_FILE).write_text(json.dumps(files.config, indent=2) + "\n", encoding="utf-8")
    for name, source in files.copies.items():
        shutil.copyfile(source, staging / name)
    for write in files.writers:
        write(staging)
    (staging / CARD_FILE).write_text(files.card, encoding="utf-8")
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(staging.iterdir()):
        os.replace(path, out_dir / path.name)
    staging.rmdir()


def read_export_config(export_dir: Path) -> dict[str, Any]:
    """config.json of an export directory.

    Raises:
        UserError: Missing, unreadable, or without the ``pretrain`` section.
    """
    path = export_dir / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise UserError(f"{export_dir}: not an export directory (no {CONFIG_FILE})") from error
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON: {error}") from error
    if not isinstance(config, dict) or "model_config" not in (config.get("pretrain") or {}):
        raise UserError(f"{path}: no pretrain.model_config section (not written by `pretrain export`)")
    return config


def read_weights(
    export_dir: Path, keep: Callable[[str], bool] = lambda name: True
) -> dict[str, torch.Tensor]:
    """The tensors of an export's model.safetensors whose names ``keep`` accepts, floating point as fp32.

    Raises:
        UserError: The export has no weights file.
    """
    path = export_dir / WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"{export_dir}: no {WEIGHTS_FILE}")
    weights: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            if keep(name):
                tensor = handle.get_tensor(name)
                weights[name] = tensor.float() if tensor.is_floating_point() else tensor
    return weights


def card_tables(
    card: dict[str, Any], sections: Iterable[tuple[str, str]], show: Callable[[Any], str]
) -> list[str]:
    """Model card lines: a two-column table per non-empty section, then each of ``card["notes"]``.

    Args:
        card: The facts; ``sections`` name its dict-valued keys.
        sections: (title, key) pairs, in the order shown.
        show: How a value is written in the table.
    """
    lines: list[str] = []
    for title, key in sections:
        section = card.get(key) or {}
        if section:
            lines += ["", f"## {title}", "", "| | |", "|---|---|"]
            lines += [f"| {name} | {show(value)} |" for name, value in section.items()]
    for note in card.get("notes") or []:
        lines += ["", f"Note: {note}"]
    return lines
