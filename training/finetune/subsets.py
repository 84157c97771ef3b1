"""Deterministic, class-balanced subsets of labelled training rows (the 1% / 10% label protocols)."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from data_pipeline.errors import UserError


def class_balanced_subset(labels: NDArray[np.int64], fraction: float, seed: int) -> NDArray[np.int64]:
    """Indices of a ``fraction`` of the rows, the same share of every class, in ascending order.

    Each class keeps ``ceil(fraction * its count)`` rows (at least one; 0.1 of 40 is 4, not 5), chosen
    by a permutation seeded with ``(seed, class)``: the subset depends on the labels, the fraction and
    the seed only, and a smaller fraction's subset is contained in a larger one's.

    Args:
        labels: (rows,) class index of each row (>= 0).
        fraction: Share of each class to keep, in (0, 1].
        seed: Seed of the choice.

    Raises:
        UserError: A fraction outside (0, 1].
    """
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"--label-fraction {fraction}: expected a value in (0, 1], e.g. 0.01, 0.1 or 1.0")
    kept: list[NDArray[np.int64]] = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        order = np.random.default_rng([seed, int(label)]).permutation(len(rows))
        kept.append(rows[order[: max(1, math.ceil(fraction * len(rows) - 1e-9))]])
    return np.sort(np.concatenate(kept)) if kept else np.zeros(0, dtype=np.int64)
