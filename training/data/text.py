"""Text batches for BERT pre-training: chunks framed and dynamically masked, behind the step loader.

Batches are padded to the manifest's ``seq_len`` (a fixed shape). Masks are keyed by each sample's
global position (:mod:`training.masking`), so they do not depend on world size or worker count.

Reading cost: every process (rank x worker) decodes the chunks of the shuffle windows its micro
batches fall in, so a window's chunks are decoded up to ``world_size * num_workers`` times in all;
with 4096-sequence chunks and 16384-sample windows that is a few MB per process per window.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from data_pipeline.errors import UserError
from data_pipeline.formats.location import join_location, open_binary
from data_pipeline.formats.manifest import (
    check_manifest,
    read_manifest,
    split_identity,
    tokenizer_kind,
    tokenizer_special_ids,
)
from data_pipeline.formats.text import SpecialIds
from data_pipeline.text.tokenizer_kinds import tokenizer_from_copy
from training.data.chunks import ChunkReader
from training.data.files import DEFAULT_VERIFY, require_checksums
from training.data.loader import StepLoader, check_eval_partition, eval_batches
from training.masking import MaskingConfig, frame_examples, mask_batch, mask_key, masking_vocab
from training.order import DEFAULT_WINDOW_SAMPLES, make_partition

TRAIN_MASK_STREAM, VALIDATION_MASK_STREAM = 0, 1


def load_word_starts(
    data_dir: str, manifest: dict[str, Any], verify: str = DEFAULT_VERIFY
) -> NDArray[np.bool_]:
    """The word-start table of the manifest's tokenizer, after checking its size, special ids and sha256.

    The tokenizer is rebuilt from its copy (``tokenizer.path``) as the manifest's ``tokenizer.kind``
    says (SentencePiece when absent).

    Args:
        data_dir: Directory (or URL) holding ``manifest.json``.
        manifest: Its manifest, checked.
        verify: ``full`` refuses a tokenizer entry without ``sha256``. Defaults to ``DEFAULT_VERIFY``.
    """
    info = manifest["tokenizer"]
    location = join_location(data_dir, info["path"])
    if verify == "full" and not info.get("sha256"):
        raise UserError(
            f"tokenizer {location}: the manifest records no sha256; pass --verify-shards size (or none) "
            "to use it unchecked"
        )
    try:
        with open_binary(location) as stream:
            model = stream.read()
    except OSError as error:
        raise UserError(f"tokenizer {location}: cannot read ({error})") from error
    if info.get("sha256") and hashlib.sha256(model).hexdigest() != info["sha256"]:
        raise UserError(f"tokenizer {location}: sha256 differs from the manifest's {info['sha256']}")
    tokenizer = tokenizer_from_copy(tokenizer_kind(manifest, data_dir), model, location)
    if tokenizer.vocab_size != info["vocab_size"]:
        raise UserError(
            f"tokenizer {location}: {tokenizer.vocab_size} pieces, manifest vocab_size {info['vocab_size']}"
        )
    recorded = tokenizer_special_ids(manifest, data_dir)
    if tokenizer.special_ids != recorded:
        raise UserError(
            f"tokenizer {location}: special ids {tokenizer.special_ids.as_tokens()}, manifest "
            f"special_ids {recorded.as_tokens()}"
        )
    return tokenizer.word_starts()


@dataclass
class TextSource:
    """One split of text shards as masked micro batches (a :class:`~training.data.loader.BatchSource`)."""

    data_dir: str
    manifest: dict[str, Any]
    split: str
    word_starts: NDArray[np.bool_]
    special_ids: SpecialIds
    """The tokenizer's special ids (the manifest's ``tokenizer.special_ids``)."""
    masking: MaskingConfig
    seed: int
    window_samples: int
    verify: str = DEFAULT_VERIFY
    shards: list[dict[str, Any]] = field(init=False)
    shard_samples: NDArray[np.int64] = field(init=False)
    identity: str = field(init=False)
    reader: ChunkReader = field(init=False)

    def __post_init__(self) -> None:
        self.shards = self.manifest["splits"][self.split]["shards"]
        self.reader = ChunkReader(self.data_dir, self.shards, self.window_samples, self.verify)
        self.vocab = masking_vocab(self.word_starts, self.special_ids)
        self.shard_samples = np.array([shard["samples"] for shard in self.shards], dtype=np.int64)
        self.identity = split_identity(self.manifest, self.split)

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size."""
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def seq_len(self) -> int:
        """Padded sequence length, framing included."""
        return int(self.manifest["seq_len"])

    @property
    def objective(self) -> str:
        """The sentence task of the data: ``nsp``, ``sop`` or ``none``."""
        return str(self.manifest["objective"])

    def train_batch(
        self, epoch: int, positions: NDArray[np.int64], shards: NDArray[np.int64], samples: NDArray[np.int64]
    ) -> dict[str, Any]:
        """Masked micro batch of the given samples, masks keyed by ``(seed, epoch, position)``."""
        return self.build(positions, shards, samples, mask_key(self.seed, epoch, TRAIN_MASK_STREAM))

    def validation_batch(
        self, positions: NDArray[np.int64], shards: NDArray[np.int64], samples: NDArray[np.int64]
    ) -> dict[str, Any]:
        """Masked batch of validation samples with the fixed validation mask key."""
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
            framed = frame_examples(
                chunk.tokens, chunk.offsets[local], seqs[:, 0], seqs[:, 1], self.seq_len, self.special_ids
            )
            input_ids[rows], token_types[rows], attention[rows] = (
                framed.input_ids,
                framed.token_type_ids,
                framed.attention_mask,
            )
            labels[rows] = seqs[:, 2]
        self._check_ids(input_ids, shards, samples)
        masked, mlm_labels = mask_batch(input_ids, positions, key, self.vocab, self.masking)
        batch: dict[str, Any] = {
            "input_ids": torch.from_numpy(masked),
            "token_type_ids": torch.from_numpy(token_types),
            "attention_mask": torch.from_numpy(attention),
            "labels": torch.from_numpy(mlm_labels),
        }
        if self.objective != "none":
            batch["next_sentence_label"] = torch.from_numpy(labels)
        batch["sample_ids"] = [f"{self.shards[s]['path']}:{i}" for s, i in zip(shards.tolist(), samples.tolist())]
        return batch

    def _check_lengths(self, seqs: NDArray[np.int64], shard: int, chunk_key: str) -> None:
        framed = seqs[:, 0] + seqs[:, 1] + np.where(seqs[:, 1] > 0, 3, 2)
        if framed.max() > self.seq_len:
            raise UserError(
                f"shard {self.shards[shard]['path']} chunk {chunk_key}: a sequence of {int(framed.max())} tokens "
                f"with framing exceeds the manifest seq_len {self.seq_len}"
            )

    def _check_ids(self, input_ids: NDArray[np.int64], shards: NDArray[np.int64], samples: NDArray[np.int64]) -> None:
        if input_ids.max() >= len(self.word_starts):
            row = int(np.argmax(input_ids.max(axis=1) >= len(self.word_starts)))
            raise UserError(
                f"sample {self.shards[shards[row]]['path']}:{samples[row]} holds token id {int(input_ids[row].max())}, "
                f"outside the tokenizer's vocabulary of {len(self.word_starts)}"
            )


def text_source(
    data_dir: str,
    split: str,
    seed: int,
    masking: MaskingConfig,
    window_samples: int,
    verify: str = DEFAULT_VERIFY,
) -> TextSource:
    """Read and check the manifest and tokenizer of a text data directory; return the split's source.

    The split's shards are checked as ``verify`` says (:mod:`training.data.files`): their sizes now,
    each sha256 when a process first opens the shard.
    """
    masking.validate()
    if not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(window_samples, int) or window_samples < 1:
        raise UserError(f"window_samples must be a positive integer, got {window_samples!r}")
    data_dir = str(data_dir)
    manifest = read_manifest(data_dir)
    check_manifest(manifest, data_dir, split)
    require_checksums(data_dir, manifest["splits"][split]["shards"], verify)
    word_starts = load_word_starts(data_dir, manifest, verify)
    special = tokenizer_special_ids(manifest, data_dir)
    return TextSource(data_dir, manifest, split, word_starts, special, masking, seed, window_samples, verify)


def text_loader(
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
    verify: str = DEFAULT_VERIFY,
) -> StepLoader[TextSource]:
    """The resumable loader of masked text micro batches of one rank.

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
        verify: Shard checks, ``full``, ``size`` or ``none`` (:mod:`training.data.files`). Defaults to full.
    """
    partition = make_partition(global_batch_size, micro_batch_size, world_size, rank)
    source = text_source(data_dir, split, seed, masking or MaskingConfig(), window_samples, verify)
    return StepLoader(source, partition, split=split, seed=seed, num_workers=num_workers)


def validation_source(
    data_dir: str, *, seed: int = 0, masking: MaskingConfig | None = None, verify: str = DEFAULT_VERIFY
) -> TextSource:
    """The ``val`` split as a source of evaluation batches (manifest, tokenizer and shard sizes checked now).

    Args:
        data_dir: Directory (or URL) holding ``manifest.json``.
        seed: Masking seed. Defaults to 0.
        masking: Masking probabilities. Defaults to ``MaskingConfig()``.
        verify: Shard checks, ``full``, ``size`` or ``none``. Defaults to full.
    """
    return text_source(data_dir, "val", seed, masking or MaskingConfig(), DEFAULT_WINDOW_SAMPLES, verify)


def source_validation_batches(
    source: TextSource,
    *,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    max_batches: int | None = None,
    num_workers: int = 0,
) -> Iterator[dict[str, Any]]:
    """One pass over the split of ``source`` with its fixed mask key; see :func:`validation_batches`."""
    check_eval_partition(micro_batch_size, rank, world_size)
    total = int(source.shard_samples.sum())
    yield from eval_batches(
        source,
        micro_batch_size=micro_batch_size,
        rank=rank,
        world_size=world_size,
        max_batches=max_batches,
        num_workers=num_workers,
        too_few=(
            f"split {source.split!r} of {source.data_dir} holds {total} samples, "
            f"fewer than world size {world_size}"
        ),
    )


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
    verify: str = DEFAULT_VERIFY,
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
        verify: Shard checks, ``full``, ``size`` or ``none``. Defaults to full.
    """
    check_eval_partition(micro_batch_size, rank, world_size)
    yield from source_validation_batches(
        validation_source(data_dir, seed=seed, masking=masking, verify=verify),
        micro_batch_size=micro_batch_size,
        rank=rank,
        world_size=world_size,
        max_batches=max_batches,
        num_workers=num_workers,
    )
