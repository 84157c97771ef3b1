"""Streaming, exactly resumable BERT pre-training loader with dynamic masking (no Beam).

Every rank runs ``steps_per_epoch = N // global_batch_size`` optimizer steps per epoch; the epoch's
last ``N mod global_batch_size`` samples (a different set each epoch) are dropped. The order and the
rank partition are in :mod:`training.order`, framing and masking in :mod:`training.masking`, chunk
reading in :mod:`training.shards`.

State is ``(epoch, position)`` where ``position`` counts the samples of the epoch consumed by
completed optimizer steps (the trainer calls :meth:`PretrainLoader.step_done`; prefetching never
moves it). Resuming seeks straight to the position: with the same world size the next batches are
identical bit for bit (masks included); with another world size the rest of the epoch is shared out
anew, no sample twice and none skipped. Masks are keyed by each sample's global position, so they
do not depend on world size or worker count either.

Batches are padded to the manifest's ``seq_len`` (a fixed shape). Workers of a torch DataLoader
each build every ``num_workers``-th micro batch of the rank's stream, which the DataLoader returns
round robin, in order. One DataLoader iterator spans all epochs, so there is nothing for persistent
workers to keep; each ``iter(loader)`` starts new workers at the current state (after
:meth:`PretrainLoader.load_state_dict`, or replaying the micro batches of an unfinished step).

Reading cost: every process (rank x worker) decodes the chunks of the shuffle windows its micro
batches fall in, so a window's chunks are decoded up to ``world_size * num_workers`` times in all;
with 4096-sequence chunks and 16384-sample windows that is a few MB per process per window.
"""

from __future__ import annotations

import atexit
import hashlib
import signal
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sentencepiece as spm
import torch
from numpy.typing import NDArray
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.errors import UserError
from training.masking import (
    MaskingConfig,
    frame_examples,
    mask_batch,
    mask_key,
    special_table,
    word_start_table_from_processor,
)
from training.order import (
    DEFAULT_WINDOW_SAMPLES,
    EpochOrder,
    Partition,
    make_partition,
    sequential_ids,
    steps_per_epoch,
)
from training.shards import (
    ShardReader,
    check_manifest,
    join_location,
    open_binary,
    read_manifest,
    split_identity,
)

TRAIN_MASK_STREAM, VALIDATION_MASK_STREAM = 0, 1
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

__all__ = ["MaskingConfig", "PretrainLoader", "validation_batches"]


def load_word_starts(data_dir: str, manifest: dict[str, Any]) -> NDArray[np.bool_]:
    """The word-start table of the manifest's tokenizer, after checking its size and sha256."""
    info = manifest["tokenizer"]
    location = join_location(data_dir, info["path"])
    try:
        with open_binary(location) as stream:
            model = stream.read()
    except OSError as error:
        raise UserError(f"tokenizer {location}: cannot read ({error})") from error
    if info.get("sha256") and hashlib.sha256(model).hexdigest() != info["sha256"]:
        raise UserError(f"tokenizer {location}: sha256 differs from the manifest's {info['sha256']}")
    try:
        processor = spm.SentencePieceProcessor(model_proto=model)
    except RuntimeError as error:
        raise UserError(f"tokenizer {location}: not a SentencePiece model ({error})") from error
    if processor.get_piece_size() != info["vocab_size"]:
        raise UserError(
            f"tokenizer {location}: {processor.get_piece_size()} pieces, manifest vocab_size {info['vocab_size']}"
        )
    return word_start_table_from_processor(processor)


@dataclass
class BatchBuilder:
    """Everything a worker needs to turn global positions into a masked micro batch (picklable)."""

    data_dir: str
    shards: list[dict[str, Any]]
    seq_len: int
    objective: str
    word_starts: NDArray[np.bool_]
    masking: MaskingConfig
    seed: int
    window_samples: int
    reader: ShardReader = field(init=False)
    _orders: dict[int, EpochOrder] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.reader = ShardReader(self.data_dir, self.shards, self.window_samples)
        self.never_masked = special_table(len(self.word_starts))
        self.shard_samples = np.array([shard["samples"] for shard in self.shards], dtype=np.int64)

    def order(self, epoch: int) -> EpochOrder:
        """The epoch's order (the previous epoch's is dropped)."""
        if epoch not in self._orders:
            self._orders = {epoch: EpochOrder(self.shard_samples, self.seed, epoch, self.window_samples)}
        return self._orders[epoch]

    def train_batch(self, epoch: int, first: int, count: int) -> dict[str, Any]:
        """Micro batch of the ``count`` samples at positions ``first...`` of the epoch's order."""
        positions = np.arange(first, first + count, dtype=np.int64)
        shards, samples = self.order(epoch).sample_ids(positions)
        return self.build(positions, shards, samples, mask_key(self.seed, epoch, TRAIN_MASK_STREAM))

    def validation_batch(self, first: int, count: int) -> dict[str, Any]:
        """Micro batch of validation samples ``first...`` in manifest order, with the fixed mask key."""
        positions = np.arange(first, first + count, dtype=np.int64)
        shards, samples = sequential_ids(self.shard_samples, positions)
        return self.build(positions, shards, samples, mask_key(self.seed, 0, VALIDATION_MASK_STREAM))

    def build(
        self,
        positions: NDArray[np.int64],
        shards: NDArray[np.int64],
        samples: NDArray[np.int64],
        key: np.uint64,
    ) -> dict[str, Any]:
        """Read, frame, check, mask and convert to tensors."""
        count = len(positions)
        input_ids = np.empty((count, self.seq_len), dtype=np.int64)
        token_types, attention = np.empty_like(input_ids), np.empty_like(input_ids)
        labels = np.empty(count, dtype=np.int64)
        for rows, chunk, local in self.reader.locate(shards, samples):
            seqs = chunk.seqs[local].astype(np.int64)  # (rows, 3): len_a, len_b, label
            self._check_lengths(seqs, shards[rows[0]], chunk.key)
            framed = frame_examples(chunk.tokens, chunk.offsets[local], seqs[:, 0], seqs[:, 1], self.seq_len)
            input_ids[rows], token_types[rows], attention[rows] = (
                framed.input_ids,
                framed.token_type_ids,
                framed.attention_mask,
            )
            labels[rows] = seqs[:, 2]
        self._check_ids(input_ids, shards, samples)
        masked, mlm_labels = mask_batch(
            input_ids, positions, key, self.word_starts, self.never_masked, self.masking
        )
        batch: dict[str, Any] = {
            "input_ids": torch.from_numpy(masked),
            "token_type_ids": torch.from_numpy(token_types),
            "attention_mask": torch.from_numpy(attention),
            "labels": torch.from_numpy(mlm_labels),
        }
        if self.objective != "none":
            batch["next_sentence_label"] = torch.from_numpy(labels)
        batch["sample_ids"] = [
            f"{self.shards[s]['path']}:{i}" for s, i in zip(shards.tolist(), samples.tolist())
        ]
        return batch

    def _check_lengths(self, seqs: NDArray[np.int64], shard: int, chunk_key: str) -> None:
        framed = seqs[:, 0] + seqs[:, 1] + np.where(seqs[:, 1] > 0, 3, 2)
        if framed.max() > self.seq_len:
            raise UserError(
                f"shard {self.shards[shard]['path']} chunk {chunk_key}: a sequence of {int(framed.max())} tokens "
                f"with framing exceeds the manifest seq_len {self.seq_len}"
            )

    def _check_ids(
        self, input_ids: NDArray[np.int64], shards: NDArray[np.int64], samples: NDArray[np.int64]
    ) -> None:
        if input_ids.max() >= len(self.word_starts):
            row = int(np.argmax(input_ids.max(axis=1) >= len(self.word_starts)))
            raise UserError(
                f"sample {self.shards[shards[row]]['path']}:{samples[row]} holds token id {int(input_ids[row].max())}, "
                f"outside the tokenizer's vocabulary of {len(self.word_starts)}"
            )


def make_builder(
    data_dir: str, split: str, seed: int, masking: MaskingConfig, window_samples: int
) -> tuple[dict[str, Any], BatchBuilder]:
    """Read and check the manifest and tokenizer; return the manifest and a batch builder."""
    masking.validate()
    if not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(window_samples, int) or window_samples < 1:
        raise UserError(f"window_samples must be a positive integer, got {window_samples!r}")
    data_dir = str(data_dir)
    manifest = read_manifest(data_dir)
    check_manifest(manifest, data_dir, split)
    builder = BatchBuilder(
        data_dir,
        manifest["splits"][split]["shards"],
        manifest["seq_len"],
        manifest["objective"],
        load_word_starts(data_dir, manifest),
        masking,
        seed,
        window_samples,
    )
    return manifest, builder


_USER_ERROR = "__user_error__"


def _reraise_user_errors(batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Turn a worker's error marker back into a :class:`UserError` (its message only, no traceback)."""
    for batch in batches:
        if _USER_ERROR in batch:
            message = batch[_USER_ERROR]
            # Stop the workers now: the raised error's traceback would keep them alive (and block
            # interpreter exit) for as long as it is referenced.
            getattr(batches, "_shutdown_workers", lambda: None)()
            raise UserError(message)
        yield batch


class _TrainStream(IterableDataset):
    """Endless micro batches of one rank from ``(epoch, step)`` on; worker ``w`` makes every ``nw``-th."""

    def __init__(
        self, builder: BatchBuilder, partition: Partition, steps: int, epoch: int, step: int
    ) -> None:
        self.builder, self.partition, self.steps, self.epoch, self.step = (
            builder,
            partition,
            steps,
            epoch,
            step,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        made, epoch, step = 0, self.epoch, self.step
        while True:
            for micro_step in range(self.partition.grad_accum):
                if made % workers == worker:
                    first = self.partition.micro_batch_start(step, micro_step)
                    try:
                        yield self.builder.train_batch(epoch, first, self.partition.micro_batch_size)
                    except UserError as error:
                        # torch would wrap the exception with the worker's traceback: pass the message.
                        yield {_USER_ERROR: str(error)}
                        return
                made += 1
            step += 1
            if step == self.steps:
                epoch, step = epoch + 1, 0


class _ValidationStream(IterableDataset):
    """One pass over this rank's contiguous, equal-size slice of the validation split."""

    def __init__(self, builder: BatchBuilder, first: int, count: int, micro_batch_size: int) -> None:
        self.builder, self.first, self.count, self.micro_batch_size = builder, first, count, micro_batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        starts = range(self.first, self.first + self.count, self.micro_batch_size)
        for number, start in enumerate(starts):
            if number % workers == worker:
                size = min(self.micro_batch_size, self.first + self.count - start)
                try:
                    yield self.builder.validation_batch(start, size)
                except UserError as error:
                    yield {_USER_ERROR: str(error)}
                    return


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers ignore SIGTERM/SIGUSR1: launchers and SLURM signal every process of a job, but the main
    process must finish its step (with these workers' batches) and save before it ends them itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


# Live multi-worker iterators. Their workers ignore SIGTERM, which is what multiprocessing's own exit
# hook sends them; this hook (registered later, so run earlier) stops them the orderly way first, so a
# program that ends with an unfinished iterator still exits.
_LIVE_ITERATORS: weakref.WeakSet[Any] = weakref.WeakSet()


@atexit.register
def _stop_live_workers() -> None:
    for iterator in list(_LIVE_ITERATORS):
        getattr(iterator, "_shutdown_workers", lambda: None)()


def _iterate(dataset: IterableDataset, num_workers: int) -> Iterator[dict[str, Any]]:
    """Batches of ``dataset`` through a DataLoader, with worker errors turned back into UserError."""
    iterator = iter(_data_loader(dataset, num_workers))
    if num_workers:
        _LIVE_ITERATORS.add(iterator)
    return _reraise_user_errors(iterator)


def _data_loader(dataset: IterableDataset, num_workers: int) -> DataLoader:
    if not isinstance(num_workers, int) or num_workers < 0:
        raise UserError(f"num_workers must be a non-negative integer, got {num_workers!r}")
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        prefetch_factor=2 if num_workers else None,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_ignore_stop_signals if num_workers else None,
    )


class PretrainLoader:
    """Micro batches of one rank, epoch after epoch, resumable exactly at optimizer-step boundaries.

    Args:
        data_dir: Directory (or URL) holding ``manifest.json``.
        split: Manifest split. Defaults to "train".
        global_batch_size: Samples per optimizer step over all ranks (kept fixed across resumes).
        micro_batch_size: Samples per forward pass of one rank.
        rank: This rank. Defaults to 0.
        world_size: Number of ranks. Defaults to 1.
        seed: Order and masking seed. Defaults to 0.
        masking: Masking probabilities. Defaults to ``MaskingConfig()``.
        num_workers: DataLoader worker processes (0: build batches in this process). Defaults to 2.
        window_samples: Shuffle window within a shard, in samples. Defaults to 16384.
    """

    def __init__(
        self,
        data_dir: str,
        *,
        split: str = "train",
        global_batch_size: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        masking: MaskingConfig | None = None,
        num_workers: int = 2,
        window_samples: int = DEFAULT_WINDOW_SAMPLES,
    ) -> None:
        self._partition = make_partition(global_batch_size, micro_batch_size, world_size, rank)
        self.manifest, self._builder = make_builder(
            data_dir, split, seed, masking or MaskingConfig(), window_samples
        )
        self.split, self.seed, self.num_workers = split, seed, num_workers
        self.vocab_size: int = self.manifest["tokenizer"]["vocab_size"]
        self.seq_len: int = self.manifest["seq_len"]
        self.objective: str = self.manifest["objective"]
        self.grad_accum: int = self._partition.grad_accum
        self.samples_per_epoch: int = self.manifest["splits"][split]["samples"]
        self.steps_per_epoch: int = steps_per_epoch(self.samples_per_epoch, global_batch_size, split)
        self._identity = split_identity(self.manifest, split)
        self._epoch, self._step = 0, 0

    @property
    def epoch(self) -> int:
        """The epoch of the next optimizer step."""
        return self._epoch

    @property
    def reader(self) -> ShardReader:
        """The shard reader of this process (used when ``num_workers`` is 0)."""
        return self._builder.reader

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stream = _TrainStream(self._builder, self._partition, self.steps_per_epoch, self._epoch, self._step)
        return _iterate(stream, self.num_workers)

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
            "data_identity": self._identity,
            "window_samples": self._builder.window_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Seek to a saved state (no replay); the next ``iter()`` starts there.

        Raises:
            UserError: When the state lacks a key, or was saved with another global batch, seed,
                split, shuffle window or data.
        """
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


def validation_batches(
    data_dir: str,
    *,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    masking: MaskingConfig | None = None,
    max_batches: int | None = None,
    num_workers: int = 0,
) -> Iterator[dict[str, Any]]:
    """The ``val`` split once, in manifest order with a fixed mask seed; each rank its own slice.

    Every rank gets ``samples // world_size`` samples (the remainder, fewer than ``world_size``, is
    left out) and so the same number of micro batches; the last may be smaller than
    ``micro_batch_size``.

    Args:
        data_dir: Directory (or URL) holding ``manifest.json``.
        micro_batch_size: Samples per batch.
        rank: This rank. Defaults to 0.
        world_size: Number of ranks. Defaults to 1.
        seed: Masking seed. Defaults to 0.
        masking: Masking probabilities. Defaults to ``MaskingConfig()``.
        max_batches: Stop after this many batches. Defaults to None (the whole slice).
        num_workers: DataLoader worker processes. Defaults to 0.
    """
    make_partition(micro_batch_size * world_size, micro_batch_size, world_size, rank)
    manifest, builder = make_builder(
        data_dir, "val", seed, masking or MaskingConfig(), DEFAULT_WINDOW_SAMPLES
    )
    per_rank = manifest["splits"]["val"]["samples"] // world_size
    if per_rank < 1:
        raise UserError(
            f"split 'val' of {data_dir} holds {manifest['splits']['val']['samples']} samples, "
            f"fewer than world size {world_size}"
        )
    stream = _ValidationStream(builder, rank * per_rank, per_rank, micro_batch_size)
    for number, batch in enumerate(_iterate(stream, num_workers)):
        if max_batches is not None and number >= max_batches:
            return
        yield batch
