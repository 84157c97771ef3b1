"""Realised source proportions of the mixture schedule over N global batches, against the weights.

    python benchmarks/mixture_proportions.py            # 1,000 batches for a few weight/batch settings
"""

from __future__ import annotations

import argparse

import numpy as np

from training.order import mixture_boundaries, mixture_step

SETTINGS = (((0.4, 0.6), 256), ((0.4, 0.6), 24), ((0.7, 0.2, 0.1), 64), ((0.05, 0.95), 32))


def realised(weights: tuple[float, ...], global_batch: int, batches: int) -> tuple[list[float], list[tuple[int, int]]]:
    """The share of each source over ``batches`` global batches, and its fewest/most samples in one batch."""
    bounds = mixture_boundaries(weights)
    counts = np.array(
        [np.bincount(mixture_step(bounds, global_batch, step)[0], minlength=len(weights)) for step in range(batches)]
    )
    shares = (counts.sum(axis=0) / counts.sum()).round(6).tolist()
    return shares, list(zip(counts.min(axis=0).tolist(), counts.max(axis=0).tolist()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=1000, help="global batches (default: 1000)")
    args = parser.parse_args()
    print(f"{'weights':<18} {'batch':>5}  {'realised':<28} per batch (min, max)")
    for weights, batch in SETTINGS:
        shares, spread = realised(weights, batch, args.batches)
        print(f"{' / '.join(map(str, weights)):<18} {batch:>5}  {' / '.join(map(str, shares)):<28} {spread}")


if __name__ == "__main__":
    main()
