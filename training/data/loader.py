"""The step loader: micro batches of one rank from any batch source, resumable at optimizer steps.

Every rank runs ``steps_per_epoch = N // global_batch_size`` optimizer steps per epoch; the epoch's
last ``N mod global_batch_size`` samples (a different set each epoch) are dropped. The order and the
rank partition are in :mod:`training.order`; what a sample becomes (masked text, image crops) is
the source's business (:class:`BatchSource`).

State is ``(epoch, position)`` where ``position`` counts the samples of the epoch consumed by
completed optimizer steps (the trainer calls :meth:`StepLoader.step_done`; prefetching never moves
it). Resuming seeks straight to the position: with the same world size the next batches are
identical bit for bit; with another world size the rest of the epoch is shared out anew, no sample
twice and none skipped. Sources key their randomness by each sample's global position, so batches
do not depend on world size or worker count either.

Workers of a torch DataLoader each build every ``num_workers``-th micro batch of the rank's stream,
which the DataLoader returns round robin, in order. One DataLoader iterator spans all epochs, so
there is nothing for persistent workers to keep; each ``iter(loader)`` starts new workers at the
current state (after :meth:`StepLoader.load_state_dict`, or replaying the micro batches of an
unfinished step).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
from numpy.typing import NDArray
from torch.utils.data import IterableDataset, get_worker_info

from data_pipeline.errors import UserError
from training.data.workers import iterate_batches, user_error_marker
from training.order import EpochOrder, Partition, make_partition, sequential_ids, steps_per_epoch

STATE_KEYS = (
    "epoch",
    "position",
    "seed",
    "global_batch_size",
    "world_size_at_save",
    "split",
    "data_identity",
    "window_samples",
)
"""Keys of :meth:`StepLoader.state_dict` (the loader part of a checkpoint)."""


class BatchSource(Protocol):
    """What the step loader needs of one split of prepared data (picklable: sent to workers)."""

    @property
    def shard_samples(self) -> NDArray[np.int64]:
        """Samples of each shard of the split, in manifest order."""

    @property
    def window_samples(self) -> int:
        """Shuffle window within a shard, in samples."""

    @property
    def identity(self) -> str:
        """What the order depends on (:func:`split_identity` of the split): a resume must match it."""

    def train_batch(
        self, epoch: int, positions: NDArray[np.int64], shards: NDArray[np.int64], samples: NDArray[np.int64]
    ) -> dict[str, Any]:
        """The training micro batch of samples ``(shards[i], samples[i])`` at epoch ``positions[i]``."""

    def validation_batch(
        self, positions: NDArray[np.int64], shards: NDArray[np.int64], samples: NDArray[np.int64]
    ) -> dict[str, Any]:
        """The evaluation batch of samples ``(shards[i], samples[i])``, ``positions`` in manifest order."""


SourceT = TypeVar("SourceT", bound=BatchSource)


@dataclass
class SplitOrder:
    """Epoch orders of one split, the latest kept (picklable: each worker builds its own)."""

    shard_samples: NDArray[np.int64]
    seed: int
    window_samples: int
    _latest: dict[int, EpochOrder] = field(default_factory=dict, init=False, repr=False)

    def epoch(self, epoch: int) -> EpochOrder:
        """The epoch's order (the previous epoch's is dropped)."""
        if epoch not in self._latest:
            self._latest = {epoch: EpochOrder(self.shard_samples, self.seed, epoch, self.window_samples)}
        return self._latest[epoch]


class TrainStream(IterableDataset):
    """Endless micro batches of one rank from ``(epoch, step)`` on; worker ``w`` makes every ``nw``-th."""

    def __init__(
        self, source: BatchSource, order: SplitOrder, partition: Partition, steps: int, epoch: int, step: int
    ) -> None:
        self.source, self.order, self.partition = source, order, partition
        self.steps, self.epoch, self.step = steps, epoch, step

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        made, epoch, step = 0, self.epoch, self.step
        size = self.partition.micro_batch_size
        while True:
            for micro_step in range(self.partition.grad_accum):
                if made % workers == worker:
                    first = self.partition.micro_batch_start(step, micro_step)
                    positions = np.arange(first, first + size, dtype=np.int64)
                    try:
                        shards, samples = self.order.epoch(epoch).sample_ids(positions)
                        yield self.source.train_batch(epoch, positions, shards, samples)
                    except UserError as error:
                        yield user_error_marker(error)
                        return
                made += 1
            step += 1
            if step == self.steps:
                epoch, step = epoch + 1, 0


class EvalStream(IterableDataset):
    """One pass over a contiguous slice of a split in manifest order, in batches of ``micro_batch_size``."""

    def __init__(self, source: BatchSource, first: int, count: int, micro_batch_size: int) -> None:
        self.source, self.first, self.count, self.micro_batch_size = source, first, count, micro_batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        end = self.first + self.count
        for number, start in enumerate(range(self.first, end, self.micro_batch_size)):
            if number % workers == worker:
                positions = np.arange(start, min(start + self.micro_batch_size, end), dtype=np.int64)
                try:
                    shards, samples = sequential_ids(self.source.shard_samples, positions)
                    yield self.source.validation_batch(positions, shards, samples)
                except UserError as error:
                    yield user_error_marker(error)
                    return


def eval_batches(
    source: BatchSource,
    *,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    max_batches: int | None,
    num_workers: int,
    too_few: str,
) -> Iterator[dict[str, Any]]:
    """One pass over a split, each rank an equal contiguous slice of ``samples // world_size``.

    The remainder (fewer than ``world_size`` samples) is left out, so every rank gets the same
    number of batches; the last may be smaller than ``micro_batch_size``.

    Args:
        source: The split.
        micro_batch_size: Samples per batch.
        rank: This rank.
        world_size: Number of ranks.
        max_batches: Stop after this many batches (None: the whole slice).
        num_workers: DataLoader worker processes.
        too_few: Error message for a split with fewer samples than ranks.
    """
    per_rank = int(source.shard_samples.sum()) // world_size
    if per_rank < 1:
        raise UserError(too_few)
    stream = EvalStream(source, rank * per_rank, per_rank, micro_batch_size)
    for number, batch in enumerate(iterate_batches(stream, num_workers)):
        if max_batches is not None and number >= max_batches:
            return
        yield batch


def check_eval_partition(micro_batch_size: int, rank: int, world_size: int) -> None:
    """Check an evaluation pass's sizes as a training partition of one micro batch per rank would."""
    make_partition(micro_batch_size * world_size, micro_batch_size, world_size, rank)


class StepLoader(Generic[SourceT]):
    """Micro batches of one rank, epoch after epoch, resumable exactly at optimizer-step boundaries.

    Args:
        source: The split's batch source.
        partition: How a global batch splits over ranks and micro steps (:func:`make_partition`).
        split: Manifest split name (kept in the state).
        seed: Order seed (the source's own randomness takes the same seed).
        num_workers: DataLoader worker processes (0: build batches in this process).
    """

    def __init__(self, source: SourceT, partition: Partition, *, split: str, seed: int, num_workers: int) -> None:
        self.source = source
        self.split, self.seed, self.num_workers = split, seed, num_workers
        self._partition = partition
        self._order = SplitOrder(source.shard_samples, seed, source.window_samples)
        self.grad_accum: int = partition.grad_accum
        self.samples_per_epoch: int = int(source.shard_samples.sum())
        self.steps_per_epoch: int = steps_per_epoch(self.samples_per_epoch, partition.global_batch_size, split)
        self._epoch, self._step = 0, 0

    @property
    def epoch(self) -> int:
        """The epoch of the next optimizer step."""
        return self._epoch

    def order(self, epoch: int) -> EpochOrder:
        """The epoch's sample order (the object batches of this process are built from)."""
        return self._order.epoch(epoch)

    def progress_metrics(self) -> dict[str, int]:
        """What the metrics report of the loader's progress: ``epoch``, the epoch of the next step."""
        return {"epoch": self._epoch}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stream = TrainStream(
            self.source, self._order, self._partition, self.steps_per_epoch, self._epoch, self._step
        )
        return iterate_batches(stream, self.num_workers)

    def step_done(self) -> None:
        """Record one completed optimizer step (``grad_accum`` micro batches of every rank)."""
        self._step += 1
        if self._step == self.steps_per_epoch:
            self._epoch, self._step = self._epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        """Small JSON-able state: the position is a global sample count within the epoch."""
        return {
            "epoch": self._epoch,
            "position": self._step * self._partition.global_batch_size,
            "seed": self.seed,
            "global_batch_size": self._partition.global_batch_size,
            "world_size_at_save": self._partition.world_size,
            "split": self.split,
            "data_identity": self.source.identity,
            "window_samples": self.source.window_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Seek to a saved state (no replay); the next ``iter()`` starts there.

        Raises:
            UserError: When the state is a mixture's, lacks a key, or was saved with another global
                batch, seed, split, shuffle window or data.
        """
        if "sources" in state:
            raise UserError(
                f"loader state is of a mixture of {len(state['sources'])} sources (data.sources), "
                f"but this run reads one dataset (data_identity {self.source.identity!r})"
            )
        missing = [key for key in STATE_KEYS if key not in state]
        if missing:
            raise UserError(f"loader state lacks keys {missing}")
        own = self.state_dict()
        for key in ("global_batch_size", "seed", "split", "window_samples", "data_identity"):
            if state[key] != own[key]:
                raise UserError(
                    f"loader state has {key}={state[key]!r} but this run has {own[key]!r}; "
                    "resuming would not continue the same sample order"
                )
        position, batch = state["position"], self._partition.global_batch_size
        if (
            not isinstance(position, int)
            or position % batch
            or not 0 <= position < self.steps_per_epoch * batch
        ):
            raise UserError(
                f"loader state position {position!r} is not a step boundary of global batch {batch} "
                f"within an epoch of {self.steps_per_epoch} steps"
            )
        if not isinstance(state["epoch"], int) or state["epoch"] < 0:
            raise UserError(f"loader state epoch {state['epoch']!r} is not a non-negative integer")
        self._epoch, self._step = state["epoch"], position // batch
