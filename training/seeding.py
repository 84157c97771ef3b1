"""One seed for every random source of a process: python, numpy and torch."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; on CPU also demand deterministic kernels (bit-exact resume)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if not torch.cuda.is_available():
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Deterministic mode would also NaN-fill every torch.empty; DeepSpeed allocates gradient buckets
        # of hundreds of MB per step that it overwrites anyway, and the fill made steps 20x slower.
        torch.utils.deterministic.fill_uninitialized_memory = False
