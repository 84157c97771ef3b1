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
from training import checkpoint_files, rng_state
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


def check_schedule(tag_dir: Path, state: dict[str, Any], total_steps: int | None) -> None:
    """Refuse a checkpoint past the end of this run's schedule (a finished run continued with fewer steps).

    Raises:
        UserError: Naming the checkpoint's step, ``total_steps`` and the setting that extends the run.
    """
    step = state.get("step")
    if total_steps is not None and isinstance(step, int) and step > total_steps:
        raise UserError(
            f"checkpoint {tag_dir} is at step {step}, past train.total_steps {total_steps}: nothing to "
            f"train. To continue the run, lengthen it with --set train.total_steps=N (N > {step}); to start "
            "afresh, use another --run-dir or --resume never"
        )


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

    def plan(self, resume: str, total_steps: int | None = None) -> ResumePlan | None:
        """Clear interrupted saves, find the checkpoint ``--resume`` selects and check it fits this run.

        Only checks and additions happen here: no checkpoint is moved and no file rewritten until
        :meth:`adopt`, after the checkpoint has loaded. A damaged newest tag is passed over (``auto``) with
        a line naming the damaged file. A checkpoint of another world size with ZeRO 1-3 is converted to a
        universal one beside it (rank 0, once).

        Args:
            resume: ``auto``, ``never`` or a tag folder (see ``RunOptions.resume``).
            total_steps: The schedule length of this run; a checkpoint past it is refused. Defaults to None
                (not checked).

        Raises:
            UserError: A PATH that is not a complete checkpoint, a damaged PATH (or only damaged tags), a
                checkpoint of another method, architecture or tokenizer, or one past ``total_steps``.
        """
        if self.env.is_main:
            removed = ckpt.remove_incomplete(self.checkpoint_dir)
            if removed:
                print(f"removed incomplete checkpoints {removed}", flush=True)
        dist.barrier()
        tag_dir = self.select(resume)
        if tag_dir is None:
            return None
        own_run = tag_dir.parent.resolve() == self.checkpoint_dir.resolve()
        state = ckpt.read_trainer_state(tag_dir)
        self.identity.check(tag_dir, state)
        check_schedule(tag_dir, state, total_steps)
        if not ds.needs_universal_conversion(state["world_size"], self.env.world_size, state["zero_stage"]):
            return ResumePlan(tag_dir.parent, tag_dir.name, state, tag_dir, universal=False, own_run=own_run)
        universal = self.convert_to_universal(tag_dir, state)
        return ResumePlan(tag_dir.parent, universal.name, state, tag_dir, universal=True, own_run=own_run)

    def select(self, resume: str) -> Path | None:
        """The tag folder to resume from, verified by rank 0 and agreed by every rank (collective).

        Raises:
            UserError: As :func:`training.checkpoint.find_resume_tag` (on every rank).
        """
        choice: list[Any] = [None]
        if self.env.is_main:
            try:
                tag_dir, notes = ckpt.find_resume_tag(resume, self.checkpoint_dir)
                for note in notes:
                    print(f"{note}; passing over it", flush=True)
                if notes and tag_dir is not None:
                    print(f"resuming from {tag_dir.name}, the newest checkpoint that is sound", flush=True)
                choice[0] = ("tag", None if tag_dir is None else str(tag_dir))
            except UserError as error:
                choice[0] = ("error", str(error))
        dist.broadcast_object_list(choice, src=0)
        kind, value = choice[0]
        if kind == "error":
            raise UserError(value)
        return None if value is None else Path(value)

    def adopt(self, plan: ResumePlan | None) -> None:
        """Commit to the loaded checkpoint: newer tags in this run's folder are an abandoned timeline.

        They move to ``checkpoints/abandoned/`` (never deleted), so ``--resume auto`` cannot pick them
        later (also when the checkpoint came from another run directory), and ``latest`` names the
        newest tag left until the next save (collective).
        """
        if plan is not None and self.env.is_main:
            moved = ckpt.set_aside_newer(self.checkpoint_dir, int(plan.state["step"]))
            if moved:
                remaining = ckpt.complete_tags(self.checkpoint_dir)
                if remaining:
                    ckpt.write_atomic(self.checkpoint_dir / ckpt.POINTER_NAME, remaining[-1])
                print(
                    f"moved checkpoints newer than step {plan.state['step']} to "
                    f"{self.checkpoint_dir / ckpt.ABANDONED_DIR}: {moved}",
                    flush=True,
                )
        dist.barrier()

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
            if plan.universal:
                # The conversion is not covered by the original tag's COMPLETE record: scan it too.
                problem = checkpoint_files.unsafe_pickle(plan.load_dir / plan.tag)
                if problem is not None:
                    raise UserError(f"checkpoint {plan.load_dir / plan.tag}: {problem}")
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
        return rng_state.load_rng(plan.source, self.env.rank)

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
            # A tag of another timeline (resumed from another run's checkpoint): never let its marker vouch
            # for new files. DeepSpeed's save starts with a barrier, so no rank writes before it is moved.
            ckpt.set_aside(self.checkpoint_dir, tag)
        state = self.state_dict()
        ds.save_checkpoint(engine, self.checkpoint_dir, tag, state)
        rng_state.save_rng(tag_dir, self.env.rank)
        if self.env.is_main:
            ckpt.write_trainer_state(tag_dir, state)

    def commit(self, tag: str) -> None:
        """Vouch for a written tag: COMPLETE in its folder, then the ``latest`` pointer (rank 0)."""
        ckpt.mark_complete(self.checkpoint_dir, tag)

    def prune(self) -> list[str]:
        """Delete all but the newest ``keep_last`` complete tags (rank 0); returns the deleted tags."""
        return ckpt.prune(self.checkpoint_dir, self.keep_last)
