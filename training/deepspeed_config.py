"""The ``deepspeed:`` section resolved for a run: global batch, accumulation, schedule length, optimizer."""

from __future__ import annotations

import copy
import os
from typing import Any

from data_pipeline.errors import UserError
from training.config import Config

# Schedulers whose length DeepSpeed reads from ``params.total_num_steps``.
SCHEDULERS_WITH_LENGTH = ("WarmupDecayLR", "WarmupCosineLR")

ADAM_TYPES = ("adam", "adamw")
"""DeepSpeed optimizer types (any case) that build DeepSpeed's own Adam unless ``torch_adam`` is set."""


def _positive_int(deepspeed: dict[str, Any], key: str) -> int:
    value = deepspeed.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"deepspeed.{key}: expected a positive int, got {value!r}")
    return value


def gradient_accumulation_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    """``global_batch / (micro_batch * world_size)``, which must be a whole number.

    Raises:
        UserError: The global batch is not a multiple of micro batch times world size (with the numbers).
    """
    per_step = micro_batch * world_size
    if global_batch % per_step:
        raise UserError(
            f"deepspeed.train_batch_size={global_batch} is not divisible by "
            f"train_micro_batch_size_per_gpu={micro_batch} x world size {world_size} = {per_step}"
        )
    return global_batch // per_step


def zero_stage(deepspeed: dict[str, Any]) -> int:
    """The ZeRO stage of a DeepSpeed config (0 when absent)."""
    stage = (deepspeed.get("zero_optimization") or {}).get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in (0, 1, 2, 3):
        raise UserError(f"deepspeed.zero_optimization.stage: expected 0, 1, 2 or 3, got {stage!r}")
    return stage


def prefer_torch_adam(deepspeed: dict[str, Any], cuda: bool) -> bool:
    """Without CUDA, make an Adam/AdamW optimizer section use torch's optimizer: set ``torch_adam: true``.

    DeepSpeed's fused Adam is a C++ op compiled on first use: minutes of silence and over a GB of memory
    per compiler on a CPU machine, for no gain there. A ``torch_adam`` the config sets itself is kept.

    Args:
        deepspeed: A literal DeepSpeed config, changed in place.
        cuda: Whether the run has a CUDA device.

    Returns:
        Whether ``torch_adam`` was set.
    """
    optimizer = deepspeed.get("optimizer")
    if cuda or not isinstance(optimizer, dict) or str(optimizer.get("type", "")).lower() not in ADAM_TYPES:
        return False
    if optimizer.get("params") is None:
        optimizer["params"] = {}
    params = optimizer["params"]
    if not isinstance(params, dict) or "torch_adam" in params:
        return False
    params["torch_adam"] = True
    return True


def _cuda_available() -> bool:
    import torch  # here, so that reading a config stays fast

    return torch.cuda.is_available()


def resolve_deepspeed(
    deepspeed: dict[str, Any],
    world_size: int,
    total_steps: int,
    warmup_steps: int | None = None,
    cuda: bool | None = None,
) -> dict[str, Any]:
    """A literal DeepSpeed config made ready for a run: gradient accumulation and scheduler lengths set.

    A WarmupDecayLR/WarmupCosineLR scheduler gets ``total_num_steps`` and, when ``warmup_steps`` is given,
    ``warmup_num_steps``; values the config sets itself are kept. Without CUDA an Adam/AdamW optimizer
    uses torch's implementation (:func:`prefer_torch_adam`); that decision is printed once, by rank 0.

    Args:
        deepspeed: The ``deepspeed:`` section; ``train_batch_size`` is the fixed global batch. Not changed.
        world_size: Number of data-parallel ranks.
        total_steps: Optimizer steps of the whole run (the schedule's length).
        warmup_steps: Warm-up steps of the schedule. Defaults to None (the scheduler's own default).
        cuda: Whether the run has a CUDA device. Defaults to None (ask torch).

    Raises:
        UserError: Batch sizes missing or not divisible, or a given gradient_accumulation_steps disagrees.
    """
    resolved = copy.deepcopy(deepspeed)
    global_batch = _positive_int(resolved, "train_batch_size")
    micro_batch = _positive_int(resolved, "train_micro_batch_size_per_gpu")
    accumulation = gradient_accumulation_steps(global_batch, micro_batch, world_size)
    given = resolved.get("gradient_accumulation_steps")
    if given is not None and given != accumulation:
        raise UserError(
            f"deepspeed.gradient_accumulation_steps={given!r} disagrees with train_batch_size={global_batch} / "
            f"(micro {micro_batch} x world size {world_size}) = {accumulation}; leave it out, it is computed"
        )
    resolved["gradient_accumulation_steps"] = accumulation
    zero_stage(resolved)
    scheduler = resolved.get("scheduler")
    if isinstance(scheduler, dict) and scheduler.get("type") in SCHEDULERS_WITH_LENGTH:
        params = scheduler.setdefault("params", {})
        params.setdefault("total_num_steps", total_steps)
        if warmup_steps is not None:
            params.setdefault("warmup_num_steps", warmup_steps)
    cuda = _cuda_available() if cuda is None else cuda
    # RANK is set by then: every launcher sets it, and a single process's setup sets it to 0.
    if prefer_torch_adam(resolved, cuda) and os.environ.get("RANK", "0") == "0":
        print(
            "deepspeed.optimizer: no CUDA device, so params.torch_adam: true "
            "(torch's Adam instead of compiling DeepSpeed's fused Adam for the CPU)",
            flush=True,
        )
    return resolved


def resolve_deepspeed_config(config: Config, world_size: int, cuda: bool | None = None) -> dict[str, Any]:
    """The DeepSpeed config of a pre-training run: :func:`resolve_deepspeed` over ``train.total_steps``.

    Args:
        config: The training config; ``deepspeed.train_batch_size`` is the fixed global batch.
        world_size: Number of data-parallel ranks.
        cuda: Whether the run has a CUDA device. Defaults to None (ask torch).

    Raises:
        UserError: As :func:`resolve_deepspeed`.
    """
    return resolve_deepspeed(config.deepspeed, world_size, config.train.total_steps, cuda=cuda)
