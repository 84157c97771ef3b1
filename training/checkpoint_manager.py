"""The checkpoint commit protocol over a run's parts: plan a resume, load, save, commit, prune.

A checkpoint is DeepSpeed's files (model, optimizer, scheduler), one RNG file per rank and
``trainer_state.json``: the run's :class:`RunIdentity` merged with the ``state_dict()`` of each part
(progress counters, loader position, sample trace lengths). :mod:`training.checkpoint` names the files
and argues why a crash at any moment is harmless; :class:`CheckpointManager` runs the steps in that order,
with the barriers between them, so that the trainer only says *save* and *resume*.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch.distributed as dist

from data_pipeline.errors import UserError
from training import checkpoint as ckpt
from training import engine as ds


class Stateful(Protocol):
    """A part of a checkpoint: its entries of ``trainer_state.json`` (plain JSON values, keys of its own)."""

    def state_dict(self) -> dict[str, Any]:
        """This part's entries, written into the checkpoint's JSON state."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take this part's entries back from a checkpoint's whole JSON state."""
        ...


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint records about the run that wrote it; a resume checks the run still fits it."""

    method: str
    """The pre-training method (``bert``, ``simclr``)."""
    model_config: dict[str, Any]
    """The architecture; a resume must match it (dropout and similar fields may change)."""
    data_fingerprint: str | None
    """sha256 of the tokenizer the data was made with; None for images."""
    config_hash: str
    data_dir: str
    """The resolved data directory: `pretrain export` copies the tokenizer and summarises the data from it."""
    world_size: int
    zero_stage: int

    def state_dict(self) -> dict[str, Any]:
        """The identity's entries; the method goes under ``objective``, the key checkpoints always had."""
        return {
            "config_hash": self.config_hash,
            "objective": self.method,
            "model_config": self.model_config,
            "tokenizer_sha256": self.data_fingerprint,
            "data_dir": self.data_dir,
            "world_size": self.world_size,
            "zero_stage": self.zero_stage,
        }

    def check(self, tag_dir: Path, saved: dict[str, Any]) -> None:
        """Refuse a checkpoint of another method, architecture or tokenizer.

        Raises:
            UserError: Naming the checkpoint, what it was trained with and what this run has.
        """
        saved_method = saved.get("objective", "bert")  # checkpoints from before SimCLR are BERT's
        if saved_method != self.method:
            raise UserError(
                f"checkpoint {tag_dir}: trained with method {saved_method!r}, "
                f"this config trains {self.method!r}"
            )
        ckpt.check_compatible(tag_dir, saved, self.model_config, self.data_fingerprint)


@dataclass
class LoaderPart:
    """The training loader as a checkpoint part: its own JSON state under ``loader``, its epoch beside it."""

    loader: Any
    """A resumable loader: ``epoch``, ``state_dict()`` and ``load_state_dict()``."""

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.loader.epoch, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])


@dataclass
class TraceLog:
    """The run directory's sample traces as a checkpoint part: every rank file's committed length.

    The lengths are kept (and truncated back to on resume) even by a run that does not trace itself, so a
    later traced resume finds the files consistent. See :class:`training.checkpoint.SampleTrace`.
    """

    run_dir: Path
    is_main: bool
    trace: ckpt.SampleTrace | None = None
    """This rank's trace when the run traces samples (``--trace-samples``)."""
    lengths: dict[str, int] = field(default_factory=dict)
    """Trace file name -> length in bytes at the last commit."""

    def add(self, sample_ids: Iterable[str]) -> None:
        """Buffer the ids of the samples the current step consumed (a no-op without a trace)."""
        if self.trace is not None:
            self.trace.add(sample_ids)

    def state_dict(self) -> dict[str, Any]:
        """The lengths every rank's trace will have once committed (collective: every rank calls it)."""
        if self.trace is not None:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (self.trace.path.name, self.trace.committed_length()))
            self.lengths.update(dict(gathered))
        return {"trace_lengths": dict(self.lengths)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the committed lengths and cut the files back to them (rank 0), dropping uncommitted lines."""
        self.lengths = dict(state.get("trace_lengths", {}))
        if self.is_main:
            ckpt.truncate_traces(self.run_dir, self.lengths)

    def append_pending(self) -> None:
        """Append this rank's buffered ids to its file (between the barriers of a commit)."""
        if self.trace is not None:
            self.trace.append_pending()


@dataclass
class ResumePlan:
    """A checkpoint to continue from, read before the engine exists (it decides the DeepSpeed config)."""

    load_dir: Path
    """Folder holding the tag folder DeepSpeed loads (the original tag or its universal conversion)."""
    tag: str
    state: dict[str, Any]
    source: Path
    """The original tag folder (its per-rank RNG files)."""
    universal: bool
    own_run: bool
    """Whether the checkpoint belongs to this run directory (else its trace lengths are another run's)."""


class CheckpointManager:
    """Saves, finds and loads the checkpoints of ``RUN_DIR/checkpoints`` (every rank calls every verb).

    Args:
        checkpoint_dir: ``RUN_DIR/checkpoints``.
        env: This rank.
        identity: What the checkpoints record about the run, and what a resume must match.
        parts: The parts in the JSON state besides the identity (progress, loader); no two share a key.
        traces: The run directory's sample traces: saved like a part, committed between the barriers,
            and loaded only from a checkpoint of this run directory.
        keep_last: How many complete checkpoints to keep.
    """

    def __init__(
        self,
        checkpoint_dir: Path,
        env: ds.DistEnv,
        identity: RunIdentity,
        parts: Sequence[Stateful],
        traces: TraceLog,
        keep_last: int,
    ) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.env = env
        self.identity = identity
        self.parts = parts
        self.traces = traces
        self.keep_last = keep_last
        self.last_step: int | None = None
        """The step of the checkpoint saved or resumed from last (None before either)."""

    def tag_dir(self, step: int) -> Path:
        """The tag folder of ``step``'s checkpoint."""
        return self.checkpoint_dir / ckpt.tag_for_step(step)

    def plan(self, resume: str) -> ResumePlan | None:
        """Clear interrupted saves, find the checkpoint ``--resume`` selects and check it fits this run.

        A checkpoint of another world size with ZeRO 1-3 is converted to a universal one (rank 0, once).

        Args:
            resume: ``auto``, ``never`` or a tag folder (see ``RunOptions.resume``).

        Raises:
            UserError: A PATH that is not a complete checkpoint, or one of another method, architecture
                or tokenizer.
        """
        if self.env.is_main:
            removed = ckpt.remove_incomplete(self.checkpoint_dir)
            if removed:
                print(f"removed incomplete checkpoints {removed}", flush=True)
        dist.barrier()
        tag_dir = ckpt.find_resume_tag(resume, self.checkpoint_dir)
        if tag_dir is None:
            return None
        own_run = tag_dir.parent.resolve() == self.checkpoint_dir.resolve()
        if own_run and self.env.is_main:
            # Resuming from an older tag abandons the newer ones: `--resume auto` must not pick them later.
            dropped = ckpt.remove_newer(self.checkpoint_dir, ckpt.step_of_tag(tag_dir.name) or 0)
            if dropped:
                print(f"removed checkpoints newer than {tag_dir.name}: {dropped}", flush=True)
        state = ckpt.read_trainer_state(tag_dir)
        self.identity.check(tag_dir, state)
        if not ds.needs_universal_conversion(state["world_size"], self.env.world_size, state["zero_stage"]):
            return ResumePlan(tag_dir.parent, tag_dir.name, state, tag_dir, universal=False, own_run=own_run)
        universal = self.convert_to_universal(tag_dir, state)
        return ResumePlan(tag_dir.parent, universal.name, state, tag_dir, universal=True, own_run=own_run)

    def convert_to_universal(self, tag_dir: Path, state: dict[str, Any]) -> Path:
        """The universal conversion of ``tag_dir``, made by rank 0 unless it exists (collective)."""
        universal = tag_dir.with_name(tag_dir.name + ckpt.UNIVERSAL_SUFFIX)
        if self.env.is_main and not universal.is_dir():
            print(
                f"converting {tag_dir} (world size {state['world_size']}, ZeRO-{state['zero_stage']}) "
                f"to a universal checkpoint for world size {self.env.world_size}",
                flush=True,
            )
            ds.convert_to_universal(tag_dir, universal)
        dist.barrier()
        return universal

    def load(self, engine: Any, plan: ResumePlan | None) -> None:
        """Load the planned checkpoint into the engine and the parts; a fresh start only resets the traces.

        Every rank reads the parts from the same JSON copy of the state, whatever the ZeRO stage. Traces of
        another run directory (``--resume OTHER_RUN/checkpoints/TAG``) stay there: this run's traces start
        empty at the resumed step.
        """
        if plan is not None:
            ds.load_checkpoint(engine, plan.load_dir, plan.tag)
            for part in self.parts:
                part.load_state_dict(plan.state)
            self.last_step = int(plan.state["step"])
        self.traces.load_state_dict(plan.state if plan is not None and plan.own_run else {})
        dist.barrier()

    def restore_rng(self, plan: ResumePlan) -> bool:
        """Put back this rank's generator states from the checkpoint; False when it has none (a new rank).

        Call it after the data iterator exists: creating one draws from torch's generator, which an
        uninterrupted run did once at its very start.
        """
        return ckpt.load_rng(plan.source, self.env.rank)

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's JSON state: the identity, then every part (collective: the traces gather).

        Raises:
            ValueError: Two parts write the same key (a programming error).
        """
        state = self.identity.state_dict()
        for part in [*self.parts, self.traces]:
            entries = part.state_dict()
            clash = sorted(state.keys() & entries.keys())
            if clash:
                raise ValueError(f"checkpoint parts write the same keys {clash}")
            state.update(entries)
        return state

    def save(self, engine: Any, step: int) -> Path:
        """Write the checkpoint of ``step``, commit it and prune old ones; returns its tag folder.

        1. every rank writes its files (:meth:`write`); barrier;
        2. every rank appends its buffered trace lines; barrier;
        3. rank 0 commits the tag (:meth:`commit`) and prunes old ones; barrier.

        A crash before 3 leaves a folder without COMPLETE, which the next start deletes, and trace lines
        past the lengths the last committed checkpoint recorded, which the next start cuts off.
        """
        tag = ckpt.tag_for_step(step)
        self.write(engine, tag)
        dist.barrier()
        self.traces.append_pending()
        dist.barrier()
        if self.env.is_main:
            self.commit(tag)
            self.prune()
        dist.barrier()
        self.last_step = step
        return self.checkpoint_dir / tag

    def write(self, engine: Any, tag: str) -> None:
        """This rank's DeepSpeed files and RNG states, and on rank 0 the JSON state, into the tag folder."""
        tag_dir = self.checkpoint_dir / tag
        if self.env.is_main and tag_dir.exists():
            # A tag of an abandoned timeline (resumed from an older one): never let its marker vouch for it.
            # DeepSpeed's save starts with a barrier, so no rank writes into the folder before it is gone.
            ckpt.remove_tag(self.checkpoint_dir, tag)
        state = self.state_dict()
        ds.save_checkpoint(engine, self.checkpoint_dir, tag, state)
        ckpt.save_rng(tag_dir, self.env.rank)
        if self.env.is_main:
            ckpt.write_trainer_state(tag_dir, state)

    def commit(self, tag: str) -> None:
        """Vouch for a written tag: COMPLETE in its folder, then the ``latest`` pointer (rank 0)."""
        ckpt.mark_complete(self.checkpoint_dir, tag)

    def prune(self) -> list[str]:
        """Delete all but the newest ``keep_last`` complete tags (rank 0); returns the deleted tags."""
        return ckpt.prune(self.checkpoint_dir, self.keep_last)
