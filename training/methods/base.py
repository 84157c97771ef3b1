"""What the trainer asks of a pre-training method: loader, model, micro-batch step, evaluation."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from training.config import Config
from training.data.files import DEFAULT_VERIFY
from training.engine import DistEnv


@dataclass(frozen=True)
class MethodContext:
    """Everything a method builder reads: the config, this rank, the resolved DeepSpeed config, the data."""

    config: Config
    env: DistEnv
    ds_config: dict[str, Any]
    data_dir: str
    verify_shards: str = DEFAULT_VERIFY
    """How shards are checked against the manifest: ``full``, ``size`` or ``none`` (``--verify-shards``)."""
    init_from: str | None = None
    """``--init-from PATH``: the initial weights (and architecture) of a BERT run; None: random init."""

    def warn(self, message: str) -> None:
        """Print a warning on rank 0 (the only rank that logs); builders warn once, at start."""
        if self.env.is_main:
            print(f"warning: {message}", flush=True)


def val_split_problem(manifest: Mapping[str, Any], world_size: int, noun: str) -> str | None:
    """Why the ``val`` split cannot be evaluated on every rank (absent, empty, too few samples), or None.

    Args:
        manifest: The data's manifest.
        world_size: Ranks that each evaluate an equal slice.
        noun: What a sample is, for the message ("samples", "images").
    """
    splits = manifest.get("splits")
    val = splits.get("val") if isinstance(splits, Mapping) else None
    samples = val.get("samples") if isinstance(val, Mapping) else None
    if not isinstance(samples, int) or samples <= 0:
        return f"split 'val' of the data holds no {noun}"
    if samples < world_size:
        return f"split 'val' holds {samples} {noun}, fewer than the {world_size} ranks that evaluate it"
    return None


@dataclass
class MicroStep:
    """One micro-batch's forward pass."""

    loss: torch.Tensor
    """Scalar loss to back-propagate."""
    sums: torch.Tensor
    """(len(sum_names),) float64 values on the device, summed over micro-batches and ranks."""
    tokens: int
    """Tokens the micro-batch held (0 for images)."""
    samples: int
    """Samples (sequences, images) the micro-batch held."""


def stack_sums(names: tuple[str, ...], values: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The named per-micro-batch values as one (len(names),) float64 tensor, in the order of ``names``.

    One tensor, so that a step needs a single all-reduce; the names say what each entry is.

    Raises:
        KeyError: ``values`` lacks one of ``names`` (or has one more).
    """
    if set(values) != set(names):
        raise KeyError(f"sums {sorted(values)} do not match the declared names {sorted(names)}")
    return torch.stack([values[name].detach().double() for name in names])


class Method(Protocol):
    """A pre-training method (BERT, SimCLR) as the trainer uses it (see :mod:`training.methods`)."""

    name: str
    """Registry name, recorded in checkpoints under the key ``objective`` (``bert``, ``simclr``)."""
    loader: Any
    """The resumable training loader (``__iter__``, ``step_done``, ``state_dict``, ``grad_accum``...)."""
    model: nn.Module
    """The model for one device (the engine wraps it)."""
    optimizer: torch.optim.Optimizer | None
    """A client optimizer for DeepSpeed, or None for the ``deepspeed.optimizer`` section."""
    model_config: dict[str, Any]
    """The architecture, saved in checkpoints and compared on resume."""
    data_fingerprint: str | None
    """sha256 of what the data's meaning depends on (the tokenizer), compared on resume; None for images."""
    progress_keys: tuple[str, ...]
    """Metrics shown on the progress line."""
    sum_names: tuple[str, ...]
    """What each entry of :attr:`MicroStep.sums` holds, in order."""

    def forward(self, engine: Any, batch: dict[str, Any], step: int, micro: int) -> MicroStep:
        """Forward one micro-batch (``micro`` of optimizer step ``step``) through the engine."""
        ...

    def step_metrics(self, sums: Mapping[str, float], micro_batches: int) -> dict[str, float]:
        """Step metrics from the named sums over ``micro_batches`` (micro-batches of all ranks)."""
        ...

    def evaluate(self, engine: Any) -> dict[str, float]:
        """Validation metrics (collective: every rank calls it); empty when there is nothing to measure."""
        ...

    def rates(self, samples_per_s: float, tokens_per_s: float) -> dict[str, float]:
        """Throughput metrics from the raw rates over all ranks."""
        ...
