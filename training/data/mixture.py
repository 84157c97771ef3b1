"""Weighted mixtures: batch sources behind one resumable loader, each global batch drawn by a fixed schedule.

Global batch ``s`` holds, from source ``i``, the stream samples ``drawn_i(s B) .. drawn_i((s + 1) B) - 1``
(:func:`training.order.mixture_step`: a pure function of the weights, the global batch and ``s``).
Stream sample ``p`` of a source of ``N`` samples is position ``p mod N`` of that source's epoch
``p // N``, in the source's own ``(seed, epoch)`` order, so a small source repeats, each pass a new
permutation of all its samples, and every epoch of every source is read exactly once.

The whole state is the number of completed steps: the content of a global batch does not depend on
world size or worker count (ranks and micro steps slice it as :class:`training.order.Partition`
says), so a resume with the same world size continues bit for bit and one with another world size
continues the same per-source streams, no sample twice and none skipped. The state also lists each
source's path, weight, data identity, epoch and position, which a resume checks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Generic

import numpy as np
import torch
from numpy.typing import NDArray
from torch.utils.data import IterableDataset, get_worker_info

from data_pipeline.errors import UserError
from data_pipeline.formats.location import is_local
from training.data.files import DEFAULT_VERIFY
from training.data.loader import SourceT, SplitOrder
from training.data.text import TextSource, text_source
from training.data.workers import iterate_batches, user_error_marker
from training.masking import MaskingConfig
from training.order import (
    DEFAULT_WINDOW_SAMPLES,
    Partition,
    check_mixture_batch,
    make_partition,
    mixture_boundaries,
    mixture_drawn,
    mixture_step,
    source_seed,
    steps_to_cover,
)

MIXTURE_STATE_KEYS = (
    "step",
    "seed",
    "global_batch_size",
    "world_size_at_save",
    "split",
    "window_samples",
    "sources",
)
"""Keys of :meth:`MixtureLoader.state_dict`; ``sources`` holds one entry per source."""
SOURCE_STATE_KEYS = ("path", "weight", "data_identity", "epoch", "position")
"""Keys of each entry of the state's ``sources``."""


def merge_rows(parts: Sequence[tuple[NDArray[np.int64], dict[str, Any]]]) -> dict[str, Any]:
    """One batch from parts ``(rows, batch)``: row ``rows[j]`` of the result is row ``j`` of the part's batch.

    Tensors are concatenated along their first dimension, lists (``sample_ids``) item by item.

    Raises:
        ValueError: The parts' batches have different keys (sources of different kinds).
    """
    keys = set(parts[0][1])
    if any(set(batch) != keys for _, batch in parts):
        raise ValueError(f"mixture parts have different fields: {[sorted(batch) for _, batch in parts]}")
    order = torch.from_numpy(np.argsort(np.concatenate([rows for rows, _ in parts]), kind="stable"))
    merged: dict[str, Any] = {}
    for key in parts[0][1]:
        values = [batch[key] for _, batch in parts]
        if isinstance(values[0], torch.Tensor):
            merged[key] = torch.cat(values)[order]
        else:
            flat = [item for value in values for item in value]
            merged[key] = [flat[index] for index in order.tolist()]
    return merged


@dataclass
class MixtureSource(Generic[SourceT]):
    """Batch sources mixed by weights, each with its own epoch orders (picklable: sent to workers).

    Args:
        sources: The sources' training splits, in ``data.sources`` order.
        paths: Where each source lives (recorded in the state and named in messages).
        weights: The sources' weights as configured (normalised here).
        seed: The run's seed; source ``i`` orders its epochs with :func:`training.order.source_seed`.
    """

    sources: list[SourceT]
    paths: list[str]
    weights: list[float]
    seed: int
    boundaries: list[Fraction] = field(init=False)
    orders: list[SplitOrder] = field(init=False)
    samples: NDArray[np.int64] = field(init=False)
    """Samples of one epoch of each source."""

    def __post_init__(self) -> None:
        self.boundaries = mixture_boundaries(self.weights)
        self.orders = [
            SplitOrder(source.shard_samples, source_seed(self.seed, index), source.window_samples)
            for index, source in enumerate(self.sources)
        ]
        self.samples = np.array([int(source.shard_samples.sum()) for source in self.sources], dtype=np.int64)

    def drawn(self, step: int, global_batch_size: int) -> NDArray[np.int64]:
        """Samples each source has supplied to the first ``step`` global batches."""
        return mixture_drawn(self.boundaries, step * global_batch_size)

    def layout(self, step: int, global_batch_size: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """``(source, stream index)`` of each slot of global batch ``step`` (:func:`mixture_step`)."""
        return mixture_step(self.boundaries, global_batch_size, step)

    def train_batch(self, slot_sources: NDArray[np.int64], slot_stream: NDArray[np.int64]) -> dict[str, Any]:
        """The micro batch of the given slots; sample ids become ``SOURCE:id`` (``1:train-000000.tar:47``)."""
        parts: list[tuple[NDArray[np.int64], dict[str, Any]]] = []
        for index in np.unique(slot_sources).tolist():
            rows = np.flatnonzero(slot_sources == index)
            epochs, positions = np.divmod(slot_stream[rows], self.samples[index])
            for epoch in np.unique(epochs).tolist():  # two epochs where a source wraps within the batch
                here = epochs == epoch
                shards, samples = self.orders[index].epoch(epoch).sample_ids(positions[here])
                batch = self.sources[index].train_batch(epoch, positions[here], shards, samples)
                batch["sample_ids"] = [f"{index}:{sample}" for sample in batch["sample_ids"]]
                parts.append((rows[here], batch))
        return merge_rows(parts)


class MixtureStream(IterableDataset):
    """Endless micro batches of one rank from global batch ``step`` on; worker ``w`` makes every ``nw``-th."""

    def __init__(self, mixture: MixtureSource[Any], partition: Partition, step: int) -> None:
        self.mixture, self.partition, self.step = mixture, partition, step

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        made, step = 0, self.step
        size, batch = self.partition.micro_batch_size, self.partition.global_batch_size
        while True:
            layout: tuple[NDArray[np.int64], NDArray[np.int64]] | None = None
            for micro_step in range(self.partition.grad_accum):
                if made % workers == worker:
                    if layout is None:  # once per step, in workers that build part of it
                        layout = self.mixture.layout(step, batch)
                    first = self.partition.micro_batch_start(0, micro_step)  # slot within the global batch
                    try:
                        slots = slice(first, first + size)
                        yield self.mixture.train_batch(layout[0][slots], layout[1][slots])
                    except UserError as error:
                        yield user_error_marker(error)
                        return
                made += 1
            step += 1


class MixtureLoader(Generic[SourceT]):
    """Micro batches of one rank from a weighted mixture, resumable exactly at optimizer-step boundaries.

    The same surface as :class:`training.data.loader.StepLoader`. ``source`` is the first source's
    split: the builder has checked that the sources agree on what a model needs of its data.

    Args:
        mixture: The sources and their weights.
        partition: How a global batch splits over ranks and micro steps (:func:`make_partition`).
        num_workers: DataLoader worker processes (0: build batches in this process).

    Raises:
        UserError: A source's share is under one sample per global batch.
    """

    split = "train"

    def __init__(self, mixture: MixtureSource[SourceT], partition: Partition, *, num_workers: int) -> None:
        check_mixture_batch(mixture.boundaries, partition.global_batch_size)
        self.mixture, self.num_workers, self._partition = mixture, num_workers, partition
        self.source: SourceT = mixture.sources[0]
        self.seed = mixture.seed
        self.grad_accum: int = partition.grad_accum
        self.steps_per_epoch: int = steps_to_cover(
            mixture.boundaries, partition.global_batch_size, mixture.samples.tolist()
        )
        """Steps until every source has been read once (sources of different sizes have different epochs)."""
        self._step = 0

    def describe(self) -> str:
        """One line for the start of a run: each source's path, share of a global batch and epoch size."""
        batch, bounds = self._partition.global_batch_size, self.mixture.boundaries
        parts = [
            f"{index}: {path} ({float(high - low):.1%}, ~{float((high - low) * batch):.1f} of {batch} "
            f"per step, {samples:,} samples per epoch)"
            for index, (path, low, high, samples) in enumerate(
                zip(self.mixture.paths, bounds[:-1], bounds[1:], self.mixture.samples.tolist())
            )
        ]
        return f"mixture of {len(parts)} sources | " + " | ".join(parts)

    def source_epochs(self) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
        """``(samples drawn, epoch, position)`` of each source before the next optimizer step."""
        drawn = self.mixture.drawn(self._step, self._partition.global_batch_size)  # (sources,)
        epochs, positions = np.divmod(drawn, self.mixture.samples)
        return drawn, epochs, positions

    @property
    def epoch(self) -> int:
        """Completed passes over the source that has had fewest (each source's own are in the metrics)."""
        return int(self.source_epochs()[1].min())

    def progress_metrics(self) -> dict[str, int]:
        """``epoch`` and per source ``i``: ``samples/i`` (drawn over the run), ``epoch/i`` (passes done)."""
        drawn, epochs, _ = self.source_epochs()
        metrics = {"epoch": int(epochs.min())}
        for index, (samples, epoch) in enumerate(zip(drawn.tolist(), epochs.tolist())):
            metrics[f"samples/{index}"], metrics[f"epoch/{index}"] = samples, epoch
        return metrics

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iterate_batches(MixtureStream(self.mixture, self._partition, self._step), self.num_workers)

    def step_done(self) -> None:
        """Record one completed optimizer step (``grad_accum`` micro batches of every rank)."""
        self._step += 1

    def state_dict(self) -> dict[str, Any]:
        """Small JSON-able state: the steps done, and each source's identity, epoch and position."""
        _, epochs, positions = self.source_epochs()
        mixture = self.mixture
        entries = [
            {
                "path": path,
                "weight": weight,
                "data_identity": source.identity,
                "epoch": epoch,
                "position": position,
            }
            for path, weight, source, epoch, position in zip(
                mixture.paths, mixture.weights, mixture.sources, epochs.tolist(), positions.tolist()
            )
        ]
        return {
            "step": self._step,
            "seed": self.seed,
            "global_batch_size": self._partition.global_batch_size,
            "world_size_at_save": self._partition.world_size,
            "split": self.split,
            "window_samples": self.source.window_samples,
            "sources": entries,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Seek to a saved state (no replay); the next ``iter()`` starts there.

        Raises:
            UserError: A state of a single-dataset run, a missing key, another global batch, seed or
                shuffle window, another mixture (sources, weights, data), or positions this schedule
                does not give at the saved step; each naming the key and both values.
        """
        if "sources" not in state:
            raise UserError(
                f"loader state is of a run on one dataset (data_identity {state.get('data_identity')!r}), "
                f"but this run mixes {len(self.mixture.sources)} sources (data.sources)"
            )
        missing = [key for key in MIXTURE_STATE_KEYS if key not in state]
        if missing:
            raise UserError(f"loader state lacks keys {missing}")
        own = self.state_dict()
        for key in ("global_batch_size", "seed", "split", "window_samples"):
            if state[key] != own[key]:
                raise UserError(
                    f"loader state has {key}={state[key]!r} but this run has {own[key]!r}; "
                    "resuming would not continue the same sample order"
                )
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise UserError(f"loader state step {step!r} is not a non-negative integer")
        self.check_same_mixture(state["sources"], own["sources"])
        self.check_positions(step, state["sources"])
        self._step = step

    def check_same_mixture(self, saved: list[dict[str, Any]], own: list[dict[str, Any]]) -> None:
        """Refuse another number of sources, other data or other weights (a moved source is fine)."""
        if not isinstance(saved, list) or len(saved) != len(own):
            count = len(saved) if isinstance(saved, list) else saved
            raise UserError(
                f"loader state has {count} sources but this run has {len(own)} (data.sources); "
                "resuming would not continue the same mixture"
            )
        for index, (old, new) in enumerate(zip(saved, own)):
            missing = [key for key in SOURCE_STATE_KEYS if key not in old]
            if missing:
                raise UserError(f"loader state sources[{index}] lacks keys {missing}")
            if old["data_identity"] != new["data_identity"]:
                raise UserError(
                    f"loader state has sources[{index}].data_identity={old['data_identity']!r} "
                    f"({old['path']}) but this run has {new['data_identity']!r} ({new['path']}); "
                    "resuming would not continue the same mixture"
                )
        weights = [old["weight"] for old in saved]
        if mixture_boundaries(weights) != self.mixture.boundaries:
            index = next(i for i, (old, new) in enumerate(zip(saved, own)) if old["weight"] != new["weight"])
            raise UserError(
                f"loader state has sources[{index}].weight={saved[index]['weight']!r} but this run has "
                f"{own[index]['weight']!r} (weights {weights} before, {[new['weight'] for new in own]} now); "
                "resuming would not continue the same mixture"
            )

    def check_positions(self, step: int, saved: list[dict[str, Any]]) -> None:
        """Refuse per-source positions that this schedule does not give at the saved step."""
        drawn = self.mixture.drawn(step, self._partition.global_batch_size)
        epochs, positions = np.divmod(drawn, self.mixture.samples)
        for index, (old, epoch, position) in enumerate(zip(saved, epochs.tolist(), positions.tolist())):
            for key, value in (("epoch", epoch), ("position", position)):
                if old[key] != value:
                    raise UserError(
                        f"loader state has sources[{index}].{key}={old[key]!r} but step {step} of this "
                        f"mixture gives {value}; the state was not written by this schedule"
                    )


def check_same_data(sources: Sequence[TextSource], paths: Sequence[str]) -> None:
    """Refuse text sources that differ in tokenizer, ``seq_len`` or sentence task.

    Raises:
        UserError: Naming both sources (``data.sources[i]`` and its path) and both values.
    """
    fields = (
        ("tokenizer sha256", lambda source: source.manifest["tokenizer"].get("sha256")),
        ("vocab_size", lambda source: source.vocab_size),
        ("special ids", lambda source: source.special_ids),
        ("seq_len", lambda source: source.seq_len),
        ("sentence task (objective)", lambda source: source.objective),
    )
    for name, value_of in fields:
        first = value_of(sources[0])
        for index, source in enumerate(sources[1:], start=1):
            if value_of(source) != first:
                raise UserError(
                    f"data.sources[{index}] ({paths[index]}) has {name} {value_of(source)!r}, but "
                    f"data.sources[0] ({paths[0]}) has {first!r}; the sources of a mixture must share "
                    "tokenizer, seq_len and sentence task"
                )


def check_source_paths(paths: Sequence[str]) -> None:
    """Refuse a local source path that is not a directory, naming its ``data.sources[i].path`` key."""
    for index, path in enumerate(paths):
        if is_local(path) and not Path(path).is_dir():
            raise UserError(f"data.sources[{index}].path: no directory {path!r}")


def text_mixture_loader(
    sources: Sequence[tuple[str, float]],
    *,
    global_batch_size: int,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    masking: MaskingConfig | None = None,
    num_workers: int = 2,
    window_samples: int = DEFAULT_WINDOW_SAMPLES,
    verify: str = DEFAULT_VERIFY,
) -> MixtureLoader[TextSource]:
    """The resumable loader of masked text micro batches of one rank from a weighted mixture of data sets.

    Args:
        sources: ``(data directory or URL, weight)`` of each source, in ``data.sources`` order.
        global_batch_size: Samples per optimizer step over all ranks (kept fixed across resumes).
        micro_batch_size: Samples per forward pass of one rank.
        rank: This rank. Defaults to 0.
        world_size: Number of ranks. Defaults to 1.
        seed: The run's seed (each source's order and masks take :func:`source_seed` of it). Defaults to 0.
        masking: Masking probabilities. Defaults to ``MaskingConfig()``.
        num_workers: DataLoader worker processes (0: build batches in this process). Defaults to 2.
        window_samples: Shuffle window within a shard, in samples. Defaults to 16384.
        verify: Shard checks, ``full``, ``size`` or ``none`` (:mod:`training.data.files`). Defaults to full.

    Raises:
        UserError: Fewer than two sources, a bad weight or path, sources that differ in tokenizer,
            ``seq_len`` or sentence task, or a source's share under one sample per global batch.
    """
    partition = make_partition(global_batch_size, micro_batch_size, world_size, rank)
    paths, weights = [str(path) for path, _ in sources], [weight for _, weight in sources]
    mixture_boundaries(weights)
    check_source_paths(paths)
    masking = masking or MaskingConfig()
    texts = [
        text_source(path, "train", source_seed(seed, index), masking, window_samples, verify)
        for index, path in enumerate(paths)
    ]
    check_same_data(texts, paths)
    return MixtureLoader(MixtureSource(texts, paths, weights, seed), partition, num_workers=num_workers)
