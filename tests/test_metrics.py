"""The metrics writer: JSONL append and read-back at full precision, TensorBoard, rank gating."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.errors import UserError
from training.metrics import (
    METRICS_FILE,
    TENSORBOARD_DIR,
    MetricsWriter,
    format_progress,
    metrics_by_step,
    read_metrics,
)


def test_records_read_back_with_every_float_bit(tmp_path: Path) -> None:
    values = [0.1 + 0.2, 1 / 3, 2.220446049250313e-16, 123456789.12345679, -7.000000000000001]
    with MetricsWriter(tmp_path, enabled=True, tensorboard=False) as writer:
        for step, value in enumerate(values, start=1):
            writer.log(step, {"loss": value, "lr": value / 10})
    records = read_metrics(tmp_path)
    assert [record["step"] for record in records] == [1, 2, 3, 4, 5]
    assert [record["loss"] for record in records] == values  # exact equality, not approx
    assert [record["lr"] for record in records] == [value / 10 for value in values]


def test_numpy_and_tensor_scalars_are_written_as_numbers(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, enabled=True, tensorboard=False) as writer:
        writer.log(3, {"loss": torch.tensor(2.5), "tokens": np.int64(4096), "acc": np.float32(0.25)})
    assert read_metrics(tmp_path / METRICS_FILE) == [{"step": 3, "loss": 2.5, "tokens": 4096, "acc": 0.25}]


def test_a_resumed_run_appends_and_later_records_win(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, enabled=True, tensorboard=False) as writer:
        writer.log(1, {"loss": 3.0})
        writer.log(2, {"loss": 2.9})
    with MetricsWriter(tmp_path, enabled=True, tensorboard=False) as writer:  # resumed from step 1
        writer.log(2, {"loss": 2.8})
        writer.log(2, {"val_loss": 2.7})
    records = read_metrics(tmp_path)
    assert len(records) == 4
    assert metrics_by_step(records, "loss") == {1: 3.0, 2: 2.8}
    assert metrics_by_step(records, "val_loss") == {2: 2.7}


def test_a_line_cut_by_a_crash_is_ended_before_appending(tmp_path: Path) -> None:
    (tmp_path / METRICS_FILE).write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo')
    with MetricsWriter(tmp_path, enabled=True, tensorboard=False) as writer:
        writer.log(2, {"loss": 2.5})
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert lines[1:] == ['{"step": 2, "lo', '{"step": 2, "loss": 2.5}']
    with pytest.raises(UserError, match=rf"{METRICS_FILE}:2: not valid JSON"):
        read_metrics(tmp_path)


def test_disabled_writer_on_other_ranks_writes_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    writer = MetricsWriter(run_dir, enabled=False)
    writer.log(1, {"loss": 1.0})
    writer.close()
    assert not run_dir.exists()


def test_tensorboard_events_are_written(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, enabled=True) as writer:
        writer.log(1, {"loss": 1.5, "phase": "train"})
    events = list((tmp_path / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.5, "phase": "train"}]


def test_bad_metric_values_and_keys_are_refused(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, enabled=True, tensorboard=False) as writer:
        with pytest.raises(ValueError, match="metric 'loss': expected a scalar, got Tensor"):
            writer.log(1, {"loss": torch.ones(2)})
        with pytest.raises(ValueError, match="must not contain 'step'"):
            writer.log(1, {"step": 1})


def test_missing_metrics_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=f"metrics file {tmp_path / METRICS_FILE} does not exist"):
        read_metrics(tmp_path)


def test_progress_line() -> None:
    line = format_progress(
        120, 600, {"loss": 3.456789, "lr": 1e-4, "samples_per_s": 12345.6, "tokens": 4096, "mfu": 0.0}
    )
    assert (
        line
        == "step 120/600 (20.0%) | loss 3.4568 | lr 1.000e-04 | samples_per_s 12,346 | tokens 4,096 | mfu 0.0"
    )


def test_a_resume_cuts_the_rows_of_later_steps_atomically(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, enabled=True, tensorboard=False) as writer:
        for step in (1, 2, 3, 4):
            writer.log(step, {"loss": float(step)})
    with open(tmp_path / METRICS_FILE, "a", encoding="utf-8") as file:
        file.write('{"step": 5, "lo')  # cut short by a crash
    with MetricsWriter(tmp_path, enabled=True, tensorboard=False) as writer:  # resumed from step 2
        assert writer.keep_until(2) == 3
        writer.log(3, {"loss": 30.0})
    assert [(row["step"], row["loss"]) for row in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert sorted(path.name for path in tmp_path.iterdir()) == [METRICS_FILE]  # no temporary file left
