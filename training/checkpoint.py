"""Checkpoint bookkeeping around DeepSpeed's files: tags, COMPLETE markers, the pointer, pruning, traces.

A checkpoint directory ``RUN_DIR/checkpoints`` holds one folder per tag (``step00000200``). The commit
protocol makes a crash at any moment harmless:

1. every rank writes its DeepSpeed files and its RNG state into the tag folder;
2. barrier; each rank appends its buffered trace lines (see :class:`SampleTrace`);
3. barrier; rank 0 writes ``COMPLETE`` into the tag folder, then atomically replaces the ``latest``
   pointer file (write a temporary file, ``os.replace``).

Resume only ever uses tags that hold ``COMPLETE``; folders without it are leftovers of an interrupted save
and are deleted. ``COMPLETE`` records each file's size and sha256 (:mod:`training.checkpoint_files`), so a
damaged tag is passed over for the newest sound one. Tags of an abandoned timeline (a resume from an
older tag) are moved to ``checkpoints/abandoned/``, never deleted. The pointer has the name and content
(the tag) DeepSpeed's own tools expect.
:class:`training.checkpoint_manager.CheckpointManager` runs these steps; this module holds the files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_pipeline.errors import UserError
from training import checkpoint_files

COMPLETE_MARKER = "COMPLETE"
POINTER_NAME = "latest"
TRAINER_STATE_NAME = "trainer_state.json"
UNIVERSAL_SUFFIX = "_universal"
ABANDONED_DIR = "abandoned"
"""Where the tags of an abandoned timeline go, inside the checkpoint folder."""
TAG_PATTERN = re.compile(r"^step(\d{8})$")
TRACE_NAME_PATTERN = re.compile(r"^rank\d{5}\.txt$")
# BertConfig fields that do not change the parameters or what they compute; they may differ on resume.
RESUMABLE_MODEL_FIELDS = frozenset(
    {"hidden_dropout_prob", "attention_probs_dropout_prob", "activation_checkpointing", "initializer_range"}
)


def tag_for_step(step: int) -> str:
    """The checkpoint tag of optimizer step ``step``: ``step00000200``."""
    return f"step{step:08d}"


def step_of_tag(tag: str) -> int | None:
    """The step a tag names, or None for folders that are not step tags."""
    match = TAG_PATTERN.match(tag)
    return int(match.group(1)) if match else None


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new content, never a part."""
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def is_complete(tag_dir: Path) -> bool:
    """Whether every rank finished writing this tag (rank 0 wrote the marker after a barrier)."""
    return (tag_dir / COMPLETE_MARKER).is_file()


def mark_complete(checkpoint_dir: Path, tag: str) -> None:
    """Commit a tag: the COMPLETE marker (every file's size and sha256) first, then the ``latest`` pointer.

    Rank 0 calls it after a barrier, when every rank's files are written.
    """
    files = checkpoint_files.file_records(checkpoint_dir / tag, skip=frozenset({COMPLETE_MARKER}))
    marker = {"tag": tag, "files": files}
    write_atomic(checkpoint_dir / tag / COMPLETE_MARKER, json.dumps(marker, indent=1, sort_keys=True) + "\n")
    write_atomic(checkpoint_dir / POINTER_NAME, tag)


def damage(tag_dir: Path) -> str | None:
    """Why a complete tag cannot be loaded safely (naming the file), or None when it is sound.

    Checks the sizes and sha256 ``COMPLETE`` recorded (skipped for markers written before they were
    recorded), that the JSON state parses, and that every ``.pt`` file loads without running code.
    """
    try:
        marker = json.loads((tag_dir / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{COMPLETE_MARKER} is unreadable ({error})"
    records = marker.get("files") if isinstance(marker, dict) else None
    problem = checkpoint_files.record_mismatch(tag_dir, records) if isinstance(records, dict) else None
    if problem is None:
        try:
            json.loads((tag_dir / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            problem = f"{TRAINER_STATE_NAME} is unreadable ({error})"
    return problem or checkpoint_files.unsafe_pickle(tag_dir)


def newest_sound(tag_dirs: list[Path]) -> tuple[Path | None, list[str]]:
    """The newest of ``tag_dirs`` (oldest first) that :func:`damage` passes, and a note per damaged one.

    Raises:
        UserError: Every one is damaged (the notes name each damaged file).
    """
    notes: list[str] = []
    for tag_dir in reversed(tag_dirs):
        problem = damage(tag_dir)
        if problem is None:
            return tag_dir, notes
        notes.append(f"checkpoint {tag_dir.name} is damaged: {problem}")
    if notes:
        raise UserError("no checkpoint loads: " + "; ".join(notes))
    return None, notes


def complete_tags(checkpoint_dir: Path) -> list[str]:
    """Complete step tags in step order, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    tags = [p.name for p in checkpoint_dir.iterdir() if step_of_tag(p.name) is not None and is_complete(p)]
    return sorted(tags, key=lambda tag: step_of_tag(tag) or 0)


def latest_complete(checkpoint_dir: Path) -> Path | None:
    """The newest complete tag folder, or None.

    The pointer names it after a clean commit; a crash between the marker and the pointer update leaves
    a newer complete tag than the pointer says, which is just as valid, so the newest complete tag wins.
    """
    tags = complete_tags(checkpoint_dir)
    return checkpoint_dir / tags[-1] if tags else None


def find_resume_tag(resume: str, checkpoint_dir: Path) -> tuple[Path | None, list[str]]:
    """The tag folder ``--resume`` selects (None to start fresh), and a note per damaged tag passed over.

    Args:
        resume: ``auto`` (the newest sound complete tag of ``checkpoint_dir``, if any), ``never``, or a
            tag folder (used as named: damage is refused, never replaced by another tag).
        checkpoint_dir: This run's checkpoint folder.

    Raises:
        UserError: A PATH that is not a complete checkpoint, a damaged PATH, or only damaged tags.
    """
    if resume == "never":
        return None, []
    if resume == "auto":
        return newest_sound([checkpoint_dir / tag for tag in complete_tags(checkpoint_dir)])
    path = Path(resume)
    if not is_complete(path):
        raise UserError(f"--resume {resume}: not a complete checkpoint tag folder (no {COMPLETE_MARKER})")
    problem = damage(path)
    if problem is not None:
        raise UserError(f"--resume {resume}: damaged checkpoint: {problem}")
    return path, []


def remove_incomplete(checkpoint_dir: Path) -> list[str]:
    """Delete tag folders without COMPLETE (interrupted saves) and half-done conversions; return their names."""
    removed: list[str] = []
    if not checkpoint_dir.is_dir():
        return removed
    for path in checkpoint_dir.iterdir():
        stale_tag = step_of_tag(path.name) is not None and not is_complete(path)
        if path.is_dir() and (stale_tag or path.name.endswith(".partial")):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def prune(checkpoint_dir: Path, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` complete tags (and their universal conversions)."""
    tags = complete_tags(checkpoint_dir)
    doomed = tags[: max(0, len(tags) - keep_last)]
    for tag in doomed:
        remove_tag(checkpoint_dir, tag)
    return doomed


def remove_tag(checkpoint_dir: Path, tag: str) -> None:
    """Delete a tag folder and its universal conversion, the marker first (so it is never half-trusted)."""
    (checkpoint_dir / tag / COMPLETE_MARKER).unlink(missing_ok=True)
    shutil.rmtree(checkpoint_dir / (tag + UNIVERSAL_SUFFIX), ignore_errors=True)
    shutil.rmtree(checkpoint_dir / tag, ignore_errors=True)


def set_aside(checkpoint_dir: Path, tag: str) -> Path:
    """Move a tag folder (and its universal conversion) into ``abandoned/``; returns where it went.

    A name already taken there gets a numeric suffix (``step00000200.1``): nothing is overwritten.
    """
    abandoned = checkpoint_dir / ABANDONED_DIR
    abandoned.mkdir(exist_ok=True)
    target, suffix = abandoned / tag, 0
    while target.exists() or target.with_name(target.name + UNIVERSAL_SUFFIX).exists():
        suffix += 1
        target = abandoned / f"{tag}.{suffix}"
    universal = checkpoint_dir / (tag + UNIVERSAL_SUFFIX)
    if universal.is_dir():
        os.replace(universal, target.with_name(target.name + UNIVERSAL_SUFFIX))
    os.replace(checkpoint_dir / tag, target)
    return target


def set_aside_newer(checkpoint_dir: Path, step: int) -> list[str]:
    """Move the complete tags after ``step`` into ``abandoned/`` (a resume from an older tag abandons them).

    Returns:
        The moved tags, oldest first.
    """
    newer = [tag for tag in complete_tags(checkpoint_dir) if (step_of_tag(tag) or 0) > step]
    for tag in newer:
        set_aside(checkpoint_dir, tag)
    return newer


def write_trainer_state(tag_dir: Path, state: dict[str, Any]) -> None:
    """The JSON client state beside DeepSpeed's files, readable before an engine exists."""
    write_atomic(tag_dir / TRAINER_STATE_NAME, json.dumps(state, indent=1, sort_keys=True) + "\n")


def read_trainer_state(tag_dir: Path) -> dict[str, Any]:
    """Read a tag's JSON client state.

    Raises:
        UserError: The folder is not a complete checkpoint of this trainer.
    """
    path = tag_dir / TRAINER_STATE_NAME
    if not is_complete(tag_dir) or not path.is_file():
        raise UserError(
            f"checkpoint {tag_dir}: not a complete checkpoint (no {COMPLETE_MARKER} or {path.name})"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"checkpoint {path}: not valid JSON: {error}") from error


def check_compatible(
    tag_dir: Path, saved: dict[str, Any], model_config: dict[str, Any], tokenizer_sha256: str
) -> None:
    """Refuse to resume with another architecture or tokenizer than the checkpoint was trained with.

    Raises:
        UserError: Naming the first differing field, the checkpoint's value and the current one.
    """
    old_tokenizer = saved.get("tokenizer_sha256")
    if old_tokenizer != tokenizer_sha256:
        raise UserError(
            f"checkpoint {tag_dir}: tokenizer sha256 differs: checkpoint {old_tokenizer}, data {tokenizer_sha256}"
        )
    old_model = saved.get("model_config", {})
    for key in sorted(set(old_model) | set(model_config)):
        if key in RESUMABLE_MODEL_FIELDS:
            continue
        if old_model.get(key) != model_config.get(key):
            raise UserError(
                f"checkpoint {tag_dir}: model config {key} differs: checkpoint {old_model.get(key)!r}, "
                f"now {model_config.get(key)!r}"
            )


@dataclass
class SampleTrace:
    """The ids of the samples this rank consumed, one ``shard:index`` per line in ``trace/rankNNNNN.txt``.

    Exact even across ``kill -9``: ids are buffered in memory and appended only when a checkpoint
    commits (after its DeepSpeed files are written, before its COMPLETE marker). The checkpoint records
    the length in bytes of every rank's trace file as it will be after that append; resuming from it
    truncates each file back to its recorded length, which removes the lines of steps that are redone
    (appended by a later, uncommitted save). The file therefore lists each sample of each committed step
    once, in order, and resume appends, never overwrites.
    """

    path: Path
    pending: list[str]

    @classmethod
    def for_rank(cls, run_dir: Path, rank: int) -> SampleTrace:
        """The trace of ``rank`` under ``run_dir/trace/``."""
        return cls(run_dir / "trace" / f"rank{rank:05d}.txt", [])

    def add(self, sample_ids: Iterable[str]) -> None:
        """Buffer the ids of samples consumed by the current step."""
        self.pending.extend(sample_ids)

    def committed_length(self) -> int:
        """File length in bytes once the pending ids are appended."""
        current = self.path.stat().st_size if self.path.exists() else 0
        return current + sum(len(sample_id.encode("utf-8")) + 1 for sample_id in self.pending)

    def append_pending(self) -> None:
        """Append the buffered ids to the file (durably) and clear the buffer."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.writelines(sample_id + "\n" for sample_id in self.pending)
            handle.flush()
            os.fsync(handle.fileno())
        self.pending.clear()


def truncate_traces(run_dir: Path, lengths: dict[str, int]) -> None:
    """Cut each trace file back to the length the resumed checkpoint recorded (rank 0, at start).

    Files the checkpoint does not name (or every file, on a fresh start with ``lengths={}``) hold only
    lines of uncommitted steps and are cut to zero.

    Raises:
        UserError: A name that is not ``rankNNNNN.txt`` (the checkpoint would point outside the trace
            folder), or a trace file shorter than the checkpoint says (lines of committed steps are lost).
    """
    for name, length in lengths.items():
        if not TRACE_NAME_PATTERN.match(name) or not isinstance(length, int) or length < 0:
            raise UserError(
                f"checkpoint trace_lengths entry {name!r}: {length!r}: "
                "expected a trace file name rankNNNNN.txt and a byte count"
            )
    trace_dir = run_dir / "trace"
    present = {path.name for path in trace_dir.glob("rank*.txt")} if trace_dir.is_dir() else set()
    for name in sorted(present | set(lengths)):
        path, length = trace_dir / name, lengths.get(name, 0)
        size = path.stat().st_size if path.exists() else 0
        if size == length:
            continue
        if size < length:
            raise UserError(f"trace {path}: {size} bytes, but the checkpoint committed {length}")
        with open(path, "r+b") as handle:
            handle.truncate(length)
