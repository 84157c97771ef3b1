"""The checkpoint manager's protocol in one process: the files a save leaves, the keys of its JSON state,
and a plan → load round trip over the parts. The multi-process and kill -9 runs are in test_trainer.py."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from data_pipeline.errors import UserError
from training import checkpoint as ckpt
from training.checkpoint_manager import CheckpointManager, LoaderPart, RunIdentity, TraceLog
from training.engine import DistEnv
from training.trainer import Progress

# The keys of trainer_state.json: the on-disk contract that `pretrain export` and resumes read.
STATE_KEYS = {
    "step", "tokens_seen", "samples_seen", "epoch", "loader", "config_hash", "objective", "model_config",
    "tokenizer_sha256", "data_dir", "world_size", "zero_stage", "trace_lengths",
}


class FakeEngine:
    """What the manager asks of a DeepSpeed engine: save and load a tag folder."""

    def save_checkpoint(
        self, save_dir: str, tag: str, client_state: dict[str, Any], save_latest: bool
    ) -> None:
        assert not save_latest  # the manager writes the pointer itself, after the commit
        Path(save_dir, tag).mkdir(parents=True, exist_ok=True)
        torch.save(client_state, Path(save_dir, tag, "mp_rank_00_model_states.pt"))

    def load_checkpoint(self, load_dir: str, tag: str, **kwargs: Any) -> tuple[str, dict[str, Any]]:
        path = Path(load_dir, tag, "mp_rank_00_model_states.pt")
        return str(path), torch.load(path, weights_only=False)


class FakeLoader:
    """A loader position: the manager stores its state under ``loader`` and its epoch beside it."""

    def __init__(self) -> None:
        self.epoch, self.position = 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


@pytest.fixture(scope="module", autouse=True)
def process_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A one-process gloo group (the manager's barriers and gathers run on it)."""
    if dist.is_initialized():
        yield
        return
    store = tmp_path_factory.mktemp("rendezvous") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def identity(method: str = "bert", hidden_size: int = 32) -> RunIdentity:
    model = {"hidden_size": hidden_size}
    return RunIdentity(method, model, "abc", "hash", "/data", world_size=1, zero_stage=0)


def manager(run_dir: Path, method: str = "bert") -> tuple[CheckpointManager, Progress, FakeLoader]:
    """A manager of ``run_dir/checkpoints`` keeping two tags, with its progress and loader parts."""
    progress, loader = Progress(), FakeLoader()
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    traces = TraceLog(run_dir, True, ckpt.SampleTrace.for_rank(run_dir, 0))
    parts = [progress, LoaderPart(loader)]
    checkpoint_dir = run_dir / "checkpoints"
    checkpoints = CheckpointManager(checkpoint_dir, env, identity(method), parts, traces, keep_last=2)
    return checkpoints, progress, loader


def test_a_save_commits_the_layout_and_a_resume_restores_every_part(tmp_path: Path) -> None:
    checkpoints, progress, loader = manager(tmp_path)
    engine = FakeEngine()
    for step in (1, 2, 3):
        progress.step, progress.samples_seen, loader.position = step, 16 * step, 16 * step
        checkpoints.traces.add([f"a.tar:{step}"])
        checkpoints.save(engine, step)
    tag_dir = tmp_path / "checkpoints" / "step00000003"
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step00000003"
    assert ckpt.complete_tags(tmp_path / "checkpoints") == ["step00000002", "step00000003"]  # keep_last=2
    assert (tag_dir / "rng_state_rank00000.json").is_file()
    state = json.loads((tag_dir / "trainer_state.json").read_text())
    assert set(state) == STATE_KEYS and state["objective"] == "bert" and state["loader"]["position"] == 48
    assert state["trace_lengths"] == {"rank00000.txt": len("a.tar:1\na.tar:2\na.tar:3\n")}
    # An uncommitted line (a save that never finished) is cut off by the resume.
    with open(tmp_path / "trace" / "rank00000.txt", "a", encoding="utf-8") as trace:
        trace.write("a.tar:4\n")

    resumed, progress, loader = manager(tmp_path)
    plan = resumed.plan("auto")
    assert plan is not None and plan.source == tag_dir and not plan.universal and plan.own_run
    resumed.load(engine, plan)
    assert (progress.step, progress.samples_seen, loader.position) == (3, 48, 48)
    assert resumed.last_step == 3 and resumed.restore_rng(plan)
    assert (tmp_path / "trace" / "rank00000.txt").read_text() == "a.tar:1\na.tar:2\na.tar:3\n"


def test_a_checkpoint_of_another_method_or_architecture_is_refused(tmp_path: Path) -> None:
    checkpoints, _, _ = manager(tmp_path)
    checkpoints.save(FakeEngine(), 0)
    other, _, _ = manager(tmp_path, method="simclr")
    with pytest.raises(UserError, match="trained with method 'bert', this config trains 'simclr'"):
        other.plan("auto")
    wider = CheckpointManager(
        other.checkpoint_dir, other.env, identity(hidden_size=48), other.parts, other.traces, keep_last=2
    )
    with pytest.raises(UserError, match="model config hidden_size differs: checkpoint 32, now 48"):
        wider.plan(os.fspath(tmp_path / "checkpoints" / "step00000000"))
    assert checkpoints.plan("never") is None


def saved_steps(tmp_path: Path, steps: tuple[int, ...]) -> CheckpointManager:
    """A manager keeping every tag, with checkpoints saved at ``steps``."""
    checkpoints, progress, _ = manager(tmp_path)
    checkpoints.keep_last = len(steps)
    for step in steps:
        progress.step = step
        checkpoints.save(FakeEngine(), step)
    return checkpoints


def test_complete_records_every_file_and_damage_falls_back_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoints = saved_steps(tmp_path, (1, 2))
    newest = tmp_path / "checkpoints" / "step00000002"
    marker = json.loads((newest / ckpt.COMPLETE_MARKER).read_text())
    assert set(marker["files"]) == {"mp_rank_00_model_states.pt", "rng_state_rank00000.json", "trainer_state.json"}
    assert ckpt.damage(newest) is None
    model = newest / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:50])
    assert "mp_rank_00_model_states.pt has 50 bytes" in (ckpt.damage(newest) or "")

    plan = checkpoints.plan("auto")
    assert plan is not None and plan.source.name == "step00000001"
    assert "step00000002 is damaged: mp_rank_00_model_states.pt" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"--resume .*step00000002: damaged checkpoint: mp_rank_00_model_states"):
        checkpoints.plan(os.fspath(newest))  # named explicitly: refused, never replaced by another tag
    # A flipped byte keeps the size: the sha256 finds it.
    rng = tmp_path / "checkpoints" / "step00000001" / "rng_state_rank00000.json"
    rng.write_text(rng.read_text().replace('"version": 3', '"version": 4'))
    assert "rng_state_rank00000.json does not match the sha256" in (ckpt.damage(rng.parent) or "")
    with pytest.raises(UserError, match="no checkpoint loads: checkpoint step00000002 is damaged"):
        checkpoints.plan("auto")


def test_a_planted_pickle_is_refused_even_under_an_old_marker(tmp_path: Path) -> None:
    saved_steps(tmp_path, (1,))
    tag_dir = tmp_path / "checkpoints" / "step00000001"
    (tag_dir / ckpt.COMPLETE_MARKER).write_text(json.dumps({"tag": tag_dir.name}))  # before sizes were recorded
    assert ckpt.damage(tag_dir) is None
    marker = tmp_path / "planted"
    torch.save({"module": {}, "planted": Planted(str(marker))}, tag_dir / "mp_rank_00_model_states.pt")
    problem = ckpt.damage(tag_dir) or ""
    assert "mp_rank_00_model_states.pt is refused: it needs posix.system" in problem
    assert not marker.exists()


class Planted:
    """Runs ``touch PATH`` when unpickled by a full unpickler."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.path}",))


def test_rng_states_round_trip_as_json_and_old_pickled_files_still_load(tmp_path: Path) -> None:
    import random

    import numpy as np

    from training import rng_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    rng_state.save_rng(tmp_path, 0)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    assert rng_state.load_rng(tmp_path, 0)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    # A checkpoint from before the JSON file: its pickle is read with weights_only=True.
    (tmp_path / "old").mkdir()
    torch.save(rng_state.capture_rng(), rng_state.legacy_rng_path(tmp_path / "old", 0))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    assert rng_state.load_rng(tmp_path / "old", 0)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert not rng_state.load_rng(tmp_path / "old", 1)


def test_abandoned_tags_move_aside_and_a_name_clash_gets_a_suffix(tmp_path: Path) -> None:
    saved_steps(tmp_path, (1, 2, 3))
    checkpoint_dir = tmp_path / "checkpoints"
    (checkpoint_dir / ckpt.ABANDONED_DIR / "step00000003").mkdir(parents=True)  # an earlier abandoned one
    assert ckpt.set_aside_newer(checkpoint_dir, 1) == ["step00000002", "step00000003"]
    assert ckpt.complete_tags(checkpoint_dir) == ["step00000001"]
    abandoned = sorted(path.name for path in (checkpoint_dir / ckpt.ABANDONED_DIR).iterdir())
    assert abandoned == ["step00000002", "step00000003", "step00000003.1"]
    assert ckpt.is_complete(checkpoint_dir / ckpt.ABANDONED_DIR / "step00000003.1")



def test_newer_tags_move_aside_only_once_the_resume_is_adopted(tmp_path: Path) -> None:
    checkpoints = saved_steps(tmp_path, (1, 2, 3))
    checkpoint_dir, older = tmp_path / "checkpoints", os.fspath(tmp_path / "checkpoints" / "step00000001")
    wider = CheckpointManager(
        checkpoint_dir, checkpoints.env, identity(hidden_size=48), checkpoints.parts, checkpoints.traces, 3
    )
    with pytest.raises(UserError, match="hidden_size differs"):
        wider.plan(older)
    with pytest.raises(UserError, match=r"step 3, past train.total_steps 2.*--set train.total_steps"):
        checkpoints.plan("auto", total_steps=2)
    plan = checkpoints.plan(older)
    assert ckpt.complete_tags(checkpoint_dir) == ["step00000001", "step00000002", "step00000003"]
    checkpoints.load(FakeEngine(), plan)
    checkpoints.adopt(plan)
    assert ckpt.complete_tags(checkpoint_dir) == ["step00000001"]
    assert (checkpoint_dir / "latest").read_text() == "step00000001"
    assert sorted(path.name for path in (checkpoint_dir / ckpt.ABANDONED_DIR).iterdir()) == [
        "step00000002", "step00000003",
    ]
