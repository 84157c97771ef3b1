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

A weighted mixture (:func:`mixture_step`) fills global batch ``s`` from each source by a fixed
schedule, a pure function of (weights, global batch, ``s``); each source keeps its own epoch orders.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

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


# ------------------------------------------------------------------------------------------ mixtures
#
# A mixture of sources with weights w_i (normalised to sum to 1) has cumulative boundaries
# C_0 = 0, C_j = w_0 + ... + w_{j-1}, C_k = 1. Among the first N samples of the mixture, source i
# supplies floor(C_{i+1} N) - floor(C_i N): the counts add up to N exactly (the sum telescopes), each
# is within one sample of w_i N at every N, and with N = step * global_batch the count of a step is
# never negative when w_i * global_batch >= 1 (floor(a + b) - floor(a) lies in {floor(b), floor(b) + 1}).
# The boundaries are exact fractions, so the schedule is the same on every machine.

_SOURCE_SEED_TAG = 0x6D6978  # "mix": keeps source seeds apart from any (seed, epoch) order stream


def source_seed(seed: int, source: int) -> int:
    """The order and masking seed of source ``source`` of a mixture run with seed ``seed``.

    Each source runs its own epochs; a seed of its own keeps two sources' shuffles and masks apart.
    """
    state = np.random.SeedSequence([seed, _SOURCE_SEED_TAG, source]).generate_state(1, dtype=np.uint32)
    return int(state[0] >> 1)  # a non-negative int31, as a config seed would be


def mixture_boundaries(weights: Sequence[float]) -> list[Fraction]:
    """Exact cumulative boundaries ``[0, C_1, ..., 1]`` of normalised weights.

    Raises:
        UserError: Fewer than two weights, or a weight that is not a finite number > 0.
    """
    if len(weights) < 2:
        raise UserError(f"a mixture needs at least 2 sources, got {len(weights)}")
    for index, weight in enumerate(weights):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
            raise UserError(f"weight of source {index}: expected a number > 0, got {weight!r}")
    parts = [Fraction(weight) for weight in weights]
    total = sum(parts, Fraction(0))
    return [sum(parts[:index], Fraction(0)) / total for index in range(len(parts) + 1)]


def mixture_drawn(boundaries: Sequence[Fraction], samples: int) -> NDArray[np.int64]:
    """Samples of each source among the first ``N = samples`` of the mixture.

    Source ``i`` supplies ``floor(C_{i+1} N) - floor(C_i N)`` (exact integer arithmetic).
    """
    edges = [bound.numerator * samples // bound.denominator for bound in boundaries]
    return np.diff(np.array(edges, dtype=np.int64))


def check_mixture_batch(boundaries: Sequence[Fraction], global_batch_size: int) -> None:
    """Refuse weights that give a source less than one sample per global batch (its count could go negative).

    Raises:
        UserError: Naming the source, its share and the global batch.
    """
    for index, (low, high) in enumerate(itertools.pairwise(boundaries)):
        if (high - low) * global_batch_size < 1:
            raise UserError(
                f"source {index} has a share {float(high - low):.6g} of the mixture, "
                f"{float((high - low) * global_batch_size):.3g} samples of a global batch of "
                f"{global_batch_size}; every source needs at least one sample per global batch"
            )


def mixture_step(
    boundaries: Sequence[Fraction], global_batch_size: int, step: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Which source fills each slot of global batch ``step``, and that sample's index in the source's stream.

    Source ``i`` fills ``c_i = drawn_i((step + 1) B) - drawn_i(step B)`` slots, spread evenly over the
    batch (its ``j``-th sample at time ``(j + 1/2) / c_i``), so every micro batch and rank gets about
    the weights' shares. Its ``j``-th slot holds stream sample ``drawn_i(step B) + j``; stream sample
    ``p`` of a source of ``N`` samples is position ``p mod N`` of the source's epoch ``p // N``.

    Returns:
        ``(source, stream_index)``, each of shape ``(global_batch_size,)``, in slot order.
    """
    before = mixture_drawn(boundaries, step * global_batch_size)
    counts = mixture_drawn(boundaries, (step + 1) * global_batch_size) - before
    sources = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    within = np.concatenate([np.arange(count, dtype=np.int64) for count in counts])
    times = (within + 0.5) / counts[sources]
    slots = np.argsort(times, kind="stable")  # ties go to the earlier source
    return sources[slots], before[sources[slots]] + within[slots]


def steps_to_cover(
    boundaries: Sequence[Fraction], global_batch_size: int, source_samples: Sequence[int]
) -> int:
    """The first step count after which every source has supplied at least one epoch of its samples."""
    shares = [float(high - low) for low, high in itertools.pairwise(boundaries)]
    estimates = [int(count / (share * global_batch_size)) - 1 for count, share in zip(source_samples, shares)]
    step = max(0, *estimates)  # just under the answer: the counts are within one sample of the shares
    while (mixture_drawn(boundaries, step * global_batch_size) < np.asarray(source_samples)).any():
        step += 1
    return step
