"""Per-epoch sample order and rank partitioning: pure numpy functions of (seed, epoch, counts), no I/O.

The epoch's global order G is a block shuffle: the shards are permuted; each shard is cut into
windows of ``window_samples`` consecutive samples (a few chunks), the windows of a shard are
permuted, and the samples inside a window are permuted. Reading G therefore touches one window of
chunks at a time (bounded read amplification) while mixing well across shards. Position ``p`` maps
to a sample id through cumulative counts and the permutation of the one window that holds it, so a
seek costs the same at any position.

Optimizer step ``s`` consumes ``G[s*B : (s+1)*B]``; micro-step ``k`` of rank ``r`` takes the ``m``
samples starting at ``s*B + k*m*world + r*m``. The last ``N mod B`` samples of G (less than one
global batch, different ones every epoch as G is re-permuted) are dropped so that every rank runs
the same number of steps.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from data_pipeline.errors import UserError

DEFAULT_WINDOW_SAMPLES = 16384  # four chunks of the default 4096 sequences
_SHARD_STREAM, _WINDOW_STREAM, _SAMPLE_STREAM = 0, 1, 2
_CACHED_WINDOWS = 64


def order_rng(seed: int, epoch: int, *path: int) -> np.random.Generator:
    """A generator that depends only on ``(seed, epoch, *path)``."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, *path]))


@dataclass(frozen=True)
class Partition:
    """How one global batch splits over ranks, micro batches and accumulation steps."""

    global_batch_size: int
    micro_batch_size: int
    world_size: int
    rank: int

    @property
    def grad_accum(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.world_size)

    def micro_batch_start(self, step: int, micro_step: int) -> int:
        """Global position (within the epoch) of the first sample of a micro batch of this rank."""
        return (
            step * self.global_batch_size
            + micro_step * self.micro_batch_size * self.world_size
            + self.rank * self.micro_batch_size
        )


def make_partition(global_batch_size: int, micro_batch_size: int, world_size: int, rank: int) -> Partition:
    """Check the batch arithmetic and build a :class:`Partition`.

    Raises:
        UserError: When a size is not positive, the rank is out of range, or the global batch is not
            a whole number of ``micro_batch_size * world_size``.
    """
    for name, value in (
        ("global_batch_size", global_batch_size),
        ("micro_batch_size", micro_batch_size),
        ("world_size", world_size),
    ):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise UserError(f"{name} must be a positive integer, got {value!r}")
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside world size {world_size}")
    per_pass = micro_batch_size * world_size
    if global_batch_size % per_pass:
        raise UserError(
            f"global_batch_size {global_batch_size} is not divisible by micro_batch_size {micro_batch_size} "
            f"x world_size {world_size} = {per_pass}"
        )
    return Partition(int(global_batch_size), int(micro_batch_size), int(world_size), int(rank))


def steps_per_epoch(total_samples: int, global_batch_size: int, split: str = "train") -> int:
    """Whole global batches in an epoch; the tail of fewer than one batch is dropped."""
    steps = total_samples // global_batch_size
    if steps < 1:
        raise UserError(
            f"split {split!r} holds {total_samples} samples, fewer than one global batch of {global_batch_size}"
        )
    return steps


class EpochOrder:
    """The global order G of one epoch, evaluated lazily position by position.

    Args:
        shard_samples: Samples of each shard, in manifest order.
        seed: Order seed.
        epoch: Epoch number (each epoch has its own order).
        window_samples: Samples per shuffle window. Defaults to 16384.
    """

    def __init__(
        self,
        shard_samples: NDArray[np.int64],
        seed: int,
        epoch: int,
        window_samples: int = DEFAULT_WINDOW_SAMPLES,
    ) -> None:
        self.shard_samples = np.asarray(shard_samples, dtype=np.int64)
        self.seed, self.epoch, self.window_samples = seed, epoch, window_samples
        self.shard_order = order_rng(seed, epoch, _SHARD_STREAM).permutation(len(self.shard_samples))
        self.shard_first = np.concatenate([[0], np.cumsum(self.shard_samples[self.shard_order])])
        self._windows: dict[int, tuple[NDArray[np.int64], NDArray[np.int64]]] = {}
        self._window_perms: OrderedDict[tuple[int, int], NDArray[np.int64]] = OrderedDict()

    @property
    def total(self) -> int:
        return int(self.shard_first[-1])

    def _shard_windows(self, shard: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """Window order of a shard and the first in-shard offset of each window in that order."""
        if shard not in self._windows:
            samples, size = int(self.shard_samples[shard]), self.window_samples
            count = -(-samples // size)
            order = order_rng(self.seed, self.epoch, _WINDOW_STREAM, shard).permutation(count)
            lengths = np.minimum(size, samples - order * size)
            self._windows[shard] = (order, np.concatenate([[0], np.cumsum(lengths)]))
        return self._windows[shard]

    def _window_permutation(self, shard: int, window: int) -> NDArray[np.int64]:
        key = (shard, window)
        perm = self._window_perms.get(key)
        if perm is None:
            length = min(self.window_samples, int(self.shard_samples[shard]) - window * self.window_samples)
            perm = order_rng(self.seed, self.epoch, _SAMPLE_STREAM, shard, window).permutation(length)
            self._window_perms[key] = perm
            if len(self._window_perms) > _CACHED_WINDOWS:
                self._window_perms.popitem(last=False)
        else:
            self._window_perms.move_to_end(key)
        return perm

    def sample_ids(self, positions: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """``(shard index, sample index within the shard)`` of each global position."""
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) and (positions.min() < 0 or positions.max() >= self.total):
            raise IndexError(f"positions outside the epoch of {self.total} samples")
        slots = np.searchsorted(self.shard_first, positions, side="right") - 1
        shards = self.shard_order[slots]
        offsets = positions - self.shard_first[slots]
        samples = np.empty_like(positions)
        for shard in np.unique(shards):
            in_shard = shards == shard
            window_order, window_first = self._shard_windows(int(shard))
            window_slots = np.searchsorted(window_first, offsets[in_shard], side="right") - 1
            within = offsets[in_shard] - window_first[window_slots]
            windows = window_order[window_slots]
            found = np.empty(len(within), dtype=np.int64)
            for window in np.unique(windows):
                here = windows == window
                perm = self._window_permutation(int(shard), int(window))
                found[here] = window * self.window_samples + perm[within[here]]
            samples[in_shard] = found
        return shards, samples


def sequential_ids(
    shard_samples: NDArray[np.int64], positions: NDArray[np.int64]
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """``(shard index, sample index)`` of positions in manifest order (the unshuffled validation order)."""
    first = np.concatenate([[0], np.cumsum(shard_samples)])
    shards = np.searchsorted(first, positions, side="right") - 1
    return shards, positions - first[shards]
