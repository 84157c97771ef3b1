"""A run's checkpoint as one state_dict: find the tag folder, consolidate any ZeRO stage, read the metrics."""

from __future__ import annotations

import contextlib
import io
import math
import pickle
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from data_pipeline.errors import UserError
from training import checkpoint as ckpt
from training.checkpoint_files import load_without_code

MODEL_STATES_FILE = "mp_rank_00_model_states.pt"

ModelBuilder = Callable[[], torch.nn.Module]
"""A function that builds the model whose checkpoint is read (called on the meta device: no memory)."""


def find_checkpoint(run_dir: Path, step: int | None = None) -> Path:
    """The complete checkpoint tag folder of ``run_dir``: the newest sound one, or that of ``step``.

    Every candidate is checked against its ``COMPLETE`` record and scanned for pickles that would run
    code (:func:`training.checkpoint.damage`) before anything reads it; a damaged newest tag is passed
    over for the next older one, with a line naming the damaged file.

    Raises:
        UserError: ``run_dir`` is not a run directory, has no complete checkpoint, none at ``step``
            (listing the steps there are), a damaged one at ``step``, or only damaged ones.
    """
    checkpoint_dir = run_dir / "checkpoints"
    if not checkpoint_dir.is_dir():
        raise UserError(f"{run_dir}: not a run directory (no checkpoints/ folder)")
    tags = ckpt.complete_tags(checkpoint_dir)
    if step is not None:
        return _checkpoint_at(checkpoint_dir, tags, step)
    tag_dir, notes = ckpt.newest_sound([checkpoint_dir / tag for tag in tags])
    if tag_dir is None:
        raise UserError(
            f"{checkpoint_dir}: no complete checkpoint (no tag folder holds {ckpt.COMPLETE_MARKER})"
        )
    for note in notes:
        print(f"{note}; passing over it", file=sys.stderr, flush=True)
    if notes:
        print(f"using {tag_dir.name}, the newest checkpoint that is sound", file=sys.stderr, flush=True)
    return tag_dir


def _checkpoint_at(checkpoint_dir: Path, tags: list[str], step: int) -> Path:
    """The tag folder of ``step``, refused when missing or damaged (never replaced by another step)."""
    wanted = ckpt.tag_for_step(step)
    if wanted not in tags:
        available = ", ".join(str(ckpt.step_of_tag(tag)) for tag in tags)
        raise UserError(
            f"{checkpoint_dir}: no complete checkpoint at step {step}; available steps: {available}"
        )
    problem = ckpt.damage(checkpoint_dir / wanted)
    if problem is not None:
        raise UserError(f"checkpoint {checkpoint_dir / wanted} is damaged: {problem}")
    return checkpoint_dir / wanted


def _materialise(tensors: Iterable[tuple[str, Any]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors in ``dtype``, made one at a time (DeepSpeed's lazy tensors included).

    Tensors that share storage in the checkpoint (tied weights) stay shared here, so they cost once.
    """
    made: dict[int, torch.Tensor] = {}
    result: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        if id(tensor) not in made:
            value = tensor.contiguous()  # a GatheredTensor of ZeRO-3 partitions is joined here
            if value.is_floating_point():
                value = value.to(dtype)
            made[id(tensor)] = value.cpu()
        result[name] = made[id(tensor)]
    return result


def _zero_state(tag_dir: Path) -> dict[str, Any]:
    """DeepSpeed's fp32 master weights of a ZeRO 1-3 checkpoint, as lazy (not yet joined) tensors."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # DeepSpeed prints a line per step of the merge; the export prints its own summary.
    with contextlib.redirect_stdout(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name, lazy_mode=True)


def _stage0_file(tag_dir: Path) -> dict[str, Any]:
    """The model-states file of a ZeRO-0 checkpoint (module, and the optimizer with any fp32 master copy)."""
    path = tag_dir / MODEL_STATES_FILE
    if not path.is_file():
        raise UserError(f"checkpoint {tag_dir}: no {MODEL_STATES_FILE}")
    try:
        return load_without_code(path)
    except (pickle.UnpicklingError, RuntimeError) as error:
        raise UserError(f"checkpoint {path}: does not load as plain tensors: {error}") from error


def parameter_shapes(build: ModelBuilder) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the model's parameters, in ``model.parameters()`` order (nothing allocated)."""
    with torch.device("meta"):
        return [(name, tuple(p.shape)) for name, p in build().named_parameters()]


def tied_names(build: ModelBuilder) -> dict[str, str]:
    """Tied parameters of the model: alias -> the name ``named_parameters()`` gives it (nothing allocated)."""
    with torch.device("meta"):
        model = build()
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in first:
            aliases[name] = first[id(parameter)]
        else:
            first[id(parameter)] = name
    return aliases


def _stage0_master_weights(saved: dict[str, Any], build: ModelBuilder) -> dict[str, torch.Tensor] | None:
    """The fp32 master weights a ZeRO-0 16-bit optimizer keeps, by parameter name; None when there are none.

    DeepSpeed's FP16/BF16 wrappers store them by position only (``fp32_groups``: one tensor per parameter;
    ``fp32_groups_flat``: one flat tensor per group), in the order of ``model.parameters()``, which is the
    order the engine received them in (``training.engine.build_engine``). Every shape is checked. Tied
    parameters appear once there; their aliases are added as the same tensors.
    """
    optimizer = saved.get("optimizer") or {}
    named = parameter_shapes(build)
    if "fp32_groups" in optimizer:
        tensors = [tensor for group in optimizer["fp32_groups"] for tensor in group]
    elif "fp32_groups_flat" in optimizer:
        flat = torch.cat([group.reshape(-1) for group in optimizer["fp32_groups_flat"]])
        sizes = [math.prod(shape) for _, shape in named]
        if flat.numel() < sum(sizes):
            return None
        tensors = list(flat[: sum(sizes)].split(sizes))
    else:
        return None
    if len(tensors) != len(named):
        return None
    weights: dict[str, torch.Tensor] = {}
    for (name, shape), tensor in zip(named, tensors):
        if tensor.numel() != math.prod(shape):
            return None
        weights[name] = tensor.reshape(shape)
    for alias, stored in tied_names(build).items():
        weights[alias] = weights[stored]
    return weights


def _stage0_state(tag_dir: Path, build: ModelBuilder) -> tuple[dict[str, torch.Tensor], str | None]:
    """A ZeRO-0 checkpoint's weights, fp32 master copies preferred; and a note when only 16-bit ones exist."""
    saved = _stage0_file(tag_dir)
    module = saved["module"]
    trained = next((t.dtype for t in module.values() if t.is_floating_point()), torch.float32)
    if trained == torch.float32:
        return module, None
    master = _stage0_master_weights(saved, build)
    if master is not None:
        return {**module, **master}, None
    return module, (
        f"ZeRO-0 checkpoint of {trained} training without a readable fp32 master copy: these are its "
        f"{trained} weights"
    )


def consolidate(
    tag_dir: Path, zero_stage: int, build: ModelBuilder, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """One full state_dict (tied aliases included) from a DeepSpeed checkpoint of any ZeRO stage.

    ZeRO 1-3 checkpoints go through DeepSpeed's own consolidation of the fp32 master weights (CPU only, no
    launcher). ZeRO 0 keeps the whole module in one file, and with bf16/fp16 training the fp32 master
    weights in its optimizer state, which are used then.

    Args:
        tag_dir: The checkpoint tag folder (``RUN_DIR/checkpoints/step00000200``).
        zero_stage: The stage it was written with (from the trainer state).
        build: Builds the checkpoint's model (names the positional ZeRO-0 master weights).
        dtype: Floating-point dtype of the result, cast tensor by tensor. Defaults to float32.

    Returns:
        The state_dict, and notes for the model card (a precision caveat), usually none.

    Raises:
        UserError: The folder lacks DeepSpeed's files.
    """
    if zero_stage == 0:
        state, note = _stage0_state(tag_dir, build)
        return _materialise(state.items(), dtype), [note] if note else []
    if not list(tag_dir.glob("*_optim_states.pt")):
        raise UserError(f"checkpoint {tag_dir}: ZeRO-{zero_stage} checkpoint without *_optim_states.pt files")
    try:
        lazy = _zero_state(tag_dir)
    except (FileNotFoundError, ValueError) as error:
        raise UserError(f"checkpoint {tag_dir}: DeepSpeed cannot consolidate it: {error}") from error
    return _materialise(lazy.items(), dtype), []


def final_metrics(run_dir: Path) -> dict[str, Any]:
    """The last logged value of every metric in RUN_DIR/metrics.jsonl (empty when there is no file)."""
    from training.metrics import METRICS_FILE, read_metrics

    if not (run_dir / METRICS_FILE).is_file():
        return {}
    latest: dict[str, Any] = {}
    for record in read_metrics(run_dir / METRICS_FILE):
        latest.update(record)
    return latest
