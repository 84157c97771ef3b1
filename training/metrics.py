"""The one metrics writer of a training run: RUN_DIR/metrics.jsonl plus TensorBoard, on rank 0 only."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from data_pipeline.errors import UserError

if TYPE_CHECKING:
    from typing_extensions import Self

METRICS_FILE = "metrics.jsonl"
"""Name of the JSONL file inside the run directory: one object per ``log`` call."""
TENSORBOARD_DIR = "tb"
"""Name of the TensorBoard event directory inside the run directory."""

Scalar = int | float | str | bool | None


class MetricsWriter:
    """Appends ``{"step": ..., **metrics}`` lines to RUN_DIR/metrics.jsonl and the scalars to TensorBoard.

    Floats are written by ``json.dumps``, i.e. at full precision (shortest repr that reads back to the
    same float), never rounded; NaN and infinity are written as ``NaN``/``Infinity``, which Python's
    ``json`` reads back. The file is opened for appending, so a resumed run continues it; a resume first
    cuts it back to the checkpoint's step (:meth:`keep_until`), so each step has its rows once. Every
    ``log`` flushes, so a killed process loses nothing it logged.

    Args:
        run_dir: The run directory; created if missing (when enabled).
        enabled: Whether this process writes at all: True on rank 0 only, so other ranks pass False and
            touch no file.
        tensorboard: Also write TensorBoard events under RUN_DIR/tb/. Defaults to True.
    """

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self._file = None
        self._tensorboard = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _terminate_partial_line(self.path)
        self._file = self.path.open("a", encoding="utf-8")
        if tensorboard:
            # Imported here: TensorBoard takes a while to import and non-zero ranks never need it.
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Write one record for ``step``; a no-op when disabled.

        Args:
            step: The optimizer step the metrics belong to.
            metrics: Name -> value; values may be Python or numpy scalars or 0-d tensors (read here).

        Raises:
            ValueError: if ``metrics`` has a "step" key or a value that is not a scalar.
        """
        if self._file is None:
            return
        if "step" in metrics:
            raise ValueError("metrics must not contain 'step'; it is the separate argument")
        record = {"step": int(step), **{name: _plain_scalar(name, value) for name, value in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            for name, value in record.items():
                if name != "step" and _is_number(value):
                    self._tensorboard.add_scalar(name, value, global_step=record["step"])
            self._tensorboard.flush()

    def keep_until(self, step: int) -> int:
        """Drop the rows of steps after ``step`` (redone after a resume from it); a no-op when disabled.

        The file is rewritten to a temporary name and renamed over the old one, so a crash leaves the old
        or the new content. A line that is not JSON was cut short by a crash while it was written, which
        is after the last checkpoint the run committed, so it goes too.

        Returns:
            The number of rows dropped.
        """
        if self._file is None:
            return 0
        self._file.close()
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if not _step_after(line, step)]
        if len(kept) < len(lines):
            temporary = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
            with temporary.open("w", encoding="utf-8") as handle:
                handle.writelines(kept)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        self._file = self.path.open("a", encoding="utf-8")
        return len(lines) - len(kept)

    def close(self) -> None:
        """Close the file and the TensorBoard writer; later ``log`` calls do nothing."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _terminate_partial_line(path: Path) -> None:
    """End a last line cut short by a crash, so records appended after it stay on lines of their own."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as file:
        file.seek(-1, 2)
        if file.read(1) != b"\n":
            file.write(b"\n")


def _step_after(line: str, step: int) -> bool:
    """Whether a metrics.jsonl line is a record of a step after ``step`` (or a line cut short by a crash)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return bool(line.strip())
    return isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step


def _plain_scalar(name: str, value: Any) -> Scalar:
    """A JSON-ready Python scalar from a Python, numpy or 0-d torch value."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    item = getattr(value, "item", None)  # numpy scalars and one-element tensors
    if callable(item):
        try:
            return _plain_scalar(name, item())
        except (ValueError, RuntimeError) as error:
            raise ValueError(f"metric {name!r}: expected a scalar, got {type(value).__name__}") from error
    raise ValueError(f"metric {name!r}: expected a scalar, got {type(value).__name__}")


def _is_number(value: Scalar) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, in file order.

    Args:
        path: The file, or the run directory holding it.

    Raises:
        UserError: naming the file and line of a line that is not a JSON object, or a missing file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise UserError(f"metrics file {path} does not exist")
    records = []
    with path.open(encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(
                    f"{path}:{line_number}: not valid JSON ({error.msg}): {line[:80]!r}"
                ) from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{line_number}: expected a JSON object, got {line[:80]!r}")
            records.append(record)
    return records


def metrics_by_step(records: Iterable[Mapping[str, Any]], name: str) -> dict[int, Any]:
    """Step -> value of metric ``name`` over the records that have it; for a step logged more than once
    (redone after a resume) the last record wins, which is the one of the run that continued."""
    return {int(record["step"]): record[name] for record in records if name in record}


def format_progress(step: int, total_steps: int, metrics: Mapping[str, Any]) -> str:
    """The console progress line, e.g. ``step 120/600 (20.0%) | loss 3.4568 | lr 1.000e-04``.

    Args:
        step: Steps done.
        total_steps: Steps of the whole run (the schedule length).
        metrics: Name -> value, shown in the given order.
    """
    percent = 100.0 * step / total_steps if total_steps > 0 else 0.0
    parts = [f"step {step}/{total_steps} ({percent:.1f}%)"]
    parts += [f"{name} {_format_value(_plain_scalar(name, value))}" for name, value in metrics.items()]
    return " | ".join(parts)


def _format_value(value: Scalar) -> str:
    """Four decimals for values of order one, thousands separators for rates, exponents for tiny ones."""
    if not _is_number(value):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value) or value == 0.0:
        return str(value)
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) < 1e-2:
        return f"{value:.3e}"
    return f"{value:.4f}"
