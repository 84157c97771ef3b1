"""End-to-end training runs with the real DeepSpeed launcher on CPU (gloo): learning, elastic resume,
bit-exact resume after kill -9, SIGTERM, and refusals. Slow (multi-process) but run by default."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from shard_fixtures import make_shard_dir

from data_pipeline.errors import UserError
from training import checkpoint as ckpt
from training.checkpoint import read_trainer_state
from training.metrics import metrics_by_step, read_metrics

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 600  # the first DeepSpeed start JIT-compiles a CPU op (~70 s); later starts reuse the cache
# A very small model and batch so that every step takes milliseconds on two busy cores.
TINY = [
    "model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
    "model.intermediate_size=64", "deepspeed.train_batch_size=16", "deepspeed.train_micro_batch_size_per_gpu=4",
    "deepspeed.scheduler.params.warmup_num_steps=5", "deepspeed.scheduler.params.warmup_max_lr=0.003",
    "deepspeed.optimizer.params.lr=0.003", "train.val_every=0", "train.total_steps=200", "data.num_workers=0",
]


def child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def train_args(data: Path, run_dir: Path, *extra: str, sets: tuple[str, ...] = ()) -> list[str]:
    args = ["--config", str(REPO / "configs" / "bert-tiny.yaml"), "--data", str(data), "--run-dir", str(run_dir),
            "--log-every", "1", *extra]
    for item in [*TINY, *sets]:
        args += ["--set", item]
    return args


def single(*args: str) -> list[str]:
    """One process, no launcher, through the ``pretrain`` CLI."""
    return [sys.executable, "-m", "launch.cli", "train", *args]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launched(processes: int, *args: str) -> list[str]:
    """``processes`` ranks on this machine through the DeepSpeed launcher."""
    return ["deepspeed", "--num_gpus", str(processes), "--master_port", str(free_port()), "--module", "training", *args]


def run(command: list[str], expect: int = 0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=TIMEOUT_S,
                          check=False)
    assert done.returncode == expect, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def losses(run_dir: Path) -> dict[int, float]:
    return metrics_by_step(read_metrics(run_dir / "metrics.jsonl"), "loss")


def latest_tag(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def state_of(run_dir: Path, tag: str) -> dict[str, Any]:
    return read_trainer_state(run_dir / "checkpoints" / tag)


def start_and_signal(command: list[str], run_dir: Path, after_step: int, signum: int) -> tuple[int, int]:
    """Start a run, send ``signum`` once metrics show a step past ``after_step``; (exit code, last logged step)."""
    process = subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + TIMEOUT_S
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if metrics.exists() and max(losses(run_dir), default=0) > after_step:
                process.send_signal(signum)
                break
            time.sleep(0.02)
        process.communicate(timeout=TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode is not None
    return process.returncode, max(losses(run_dir), default=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 512 train samples / global batch 16 = 32 steps per epoch.
    return make_shard_dir(tmp_path_factory.mktemp("trainer"), n_train=512, n_val=64, seq_len=64)


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "first_steps", "more_steps"), [(2, 30, 10), (3, 4, 2)])
def test_two_ranks_learn_then_resume_on_one(data: Path, tmp_path: Path, stage: int, first_steps: int,
                                            more_steps: int) -> None:
    run_dir = tmp_path / "run"
    zero = (f"deepspeed.zero_optimization.stage={stage}",)
    validation = ("train.val_every=10", "train.val_batches=2")
    run(launched(2, *train_args(data, run_dir, "--max-steps", str(first_steps), "--save-every", "10",
                                sets=zero + validation)))
    first = losses(run_dir)
    val_loss = metrics_by_step(read_metrics(run_dir / "metrics.jsonl"), "val_loss")
    assert sorted(val_loss) == list(range(10, first_steps + 1, 10))
    assert sorted(first) == list(range(1, first_steps + 1))
    if stage == 2:
        head, tail = [first[s] for s in range(1, 6)], [first[s] for s in range(first_steps - 4, first_steps + 1)]
        assert sum(tail) / 5 < sum(head) / 5 - 0.3, f"loss did not fall: {head} -> {tail}"
    tag = latest_tag(run_dir)
    assert tag == f"step{first_steps:08d}" and state_of(run_dir, tag)["world_size"] == 2

    total = first_steps + more_steps
    done = run(single(*train_args(data, run_dir, "--max-steps", str(total), "--save-every", "10", sets=zero)))
    assert "universal" in done.stdout
    assert (run_dir / "checkpoints" / f"{tag}_universal").is_dir()
    resumed = losses(run_dir)
    assert sorted(resumed) == list(range(1, total + 1))
    assert all(resumed[s] == first[s] for s in first)  # earlier records untouched (appended, not rewritten)
    final = state_of(run_dir, latest_tag(run_dir))
    assert (final["step"], final["world_size"], final["samples_seen"]) == (total, 1, total * 16)
    # The loader position is global: 32 steps per epoch, so step `total` sits in epoch total // 32.
    assert (final["loader"]["epoch"], final["loader"]["position"]) == (total // 32, (total % 32) * 16)


@pytest.mark.slow
def test_kill_9_then_resume_is_bit_exact_with_exact_traces(data: Path, tmp_path: Path) -> None:
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    # Dropout on and a worker process for the batches: resume must restore generators exactly.
    common = ("--save-every", "8", "--trace-samples")
    sets = ("data.num_workers=1", "model.dropout=0.1")
    run(single(*train_args(data, reference, "--max-steps", "40", *common, sets=sets)))

    code, last = start_and_signal(single(*train_args(data, killed, *common, sets=sets)), killed, 9, signal.SIGKILL)
    assert code == -signal.SIGKILL and 9 < last < 200
    checkpoint_step = state_of(killed, latest_tag(killed))["step"]
    run(single(*train_args(data, killed, "--max-steps", "40", *common, sets=sets)))

    expected, got = losses(reference), losses(killed)
    assert checkpoint_step >= 8 and sorted(got) == list(range(1, 41))
    for step in range(checkpoint_step + 1, 41):
        assert got[step] == expected[step], f"step {step}: {got[step]!r} != {expected[step]!r}"
    # Lines of the redone steps were cut back, so the trace is exactly the uninterrupted one.
    trace = "trace/rank00000.txt"
    assert (killed / trace).read_text() == (reference / trace).read_text()
    assert len((reference / trace).read_text().splitlines()) == 40 * 16


@pytest.mark.slow
def test_sigterm_saves_and_exits_0_then_resume_and_refusals(data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code, last = start_and_signal(single(*train_args(data, run_dir, "--save-every", "100")), run_dir, 2,
                                  signal.SIGTERM)
    assert code == 0 and 2 < last < 200
    tag = latest_tag(run_dir)
    assert tag == f"step{last:08d}" and (run_dir / "checkpoints" / tag / "COMPLETE").is_file()

    run(single(*train_args(data, run_dir, "--max-steps", str(last + 2))))
    assert max(losses(run_dir)) == last + 2 and latest_tag(run_dir) == f"step{last + 2:08d}"

    wider = run(single(*train_args(data, run_dir, sets=("model.hidden_size=48",))), expect=2)
    assert "model config hidden_size differs: checkpoint 32, now 48" in wider.stderr
    other = make_shard_dir(tmp_path, n_train=64, n_val=16, seq_len=64, seed=7, name="other")
    retokenised = run(single(*train_args(other, run_dir)), expect=2)
    assert "tokenizer sha256 differs" in retokenised.stderr
    assert "Traceback" not in wider.stderr + retokenised.stderr


# Fast checks of the commit protocol on plain folders (what a crash at each point leaves behind).


def fake_tag(checkpoint_dir: Path, step: int, complete: bool) -> Path:
    tag_dir = checkpoint_dir / ckpt.tag_for_step(step)
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"x")
    ckpt.write_trainer_state(tag_dir, {"step": step})
    if complete:
        ckpt.mark_complete(checkpoint_dir, tag_dir.name)
    return tag_dir


def test_only_complete_tags_are_resumed_and_incomplete_ones_removed(tmp_path: Path) -> None:
    fake_tag(tmp_path, 100, complete=True)
    fake_tag(tmp_path, 200, complete=True)
    fake_tag(tmp_path, 300, complete=False)  # killed during the save
    (tmp_path / "step00000200_universal.partial").mkdir()  # killed during a conversion
    assert (tmp_path / "latest").read_text() == "step00000200"
    assert ckpt.latest_complete(tmp_path) == tmp_path / "step00000200"
    assert sorted(ckpt.remove_incomplete(tmp_path)) == ["step00000200_universal.partial", "step00000300"]
    with pytest.raises(UserError, match=r"step00000300: not a complete checkpoint"):
        read_trainer_state(tmp_path / "step00000300")
    # Killed between the marker and the pointer: the newer complete tag is as good and wins.
    fake_tag(tmp_path, 400, complete=False)
    (tmp_path / "step00000400" / ckpt.COMPLETE_MARKER).write_text("{}")
    assert ckpt.latest_complete(tmp_path) == tmp_path / "step00000400"
    assert ckpt.prune(tmp_path, keep_last=2) == ["step00000100"]
    assert ckpt.complete_tags(tmp_path) == ["step00000200", "step00000400"]
    assert ckpt.set_aside_newer(tmp_path, 200) == ["step00000400"]
    assert ckpt.is_complete(tmp_path / ckpt.ABANDONED_DIR / "step00000400")  # moved aside, not deleted


def test_traces_are_cut_back_to_the_committed_length(tmp_path: Path) -> None:
    trace = ckpt.SampleTrace.for_rank(tmp_path, 0)
    trace.add(["a.tar:1", "a.tar:2"])
    committed = trace.committed_length()
    trace.append_pending()
    trace.add(["a.tar:3"])
    trace.append_pending()  # a later save that never completed
    stray = tmp_path / "trace" / "rank00001.txt"
    stray.write_text("b.tar:9\n")  # a rank the checkpoint does not know
    ckpt.truncate_traces(tmp_path, {"rank00000.txt": committed})
    assert trace.path.read_text() == "a.tar:1\na.tar:2\n" and stray.read_text() == ""
    with pytest.raises(UserError, match=r"rank00000\.txt: 16 bytes, but the checkpoint committed 99"):
        ckpt.truncate_traces(tmp_path, {"rank00000.txt": 99})


def test_incompatible_checkpoints_are_refused_naming_the_field(tmp_path: Path) -> None:
    saved = {"tokenizer_sha256": "aaa", "model_config": {"hidden_size": 32, "hidden_dropout_prob": 0.1}}
    ckpt.check_compatible(tmp_path, saved, {"hidden_size": 32, "hidden_dropout_prob": 0.0}, "aaa")  # dropout may change
    with pytest.raises(UserError, match=r"model config hidden_size differs: checkpoint 32, now 64"):
        ckpt.check_compatible(tmp_path, saved, {"hidden_size": 64, "hidden_dropout_prob": 0.1}, "aaa")
    with pytest.raises(UserError, match=r"tokenizer sha256 differs: checkpoint aaa, data bbb"):
        ckpt.check_compatible(tmp_path, saved, saved["model_config"], "bbb")
