"""Fault injection around the real trainer, loader and exporter: refused resumes, damaged checkpoints,
hostile manifests, corrupted shards, planted pickles, signals and small corpora. Each test drives the
`pretrain` command line as a user would and checks that nothing is lost and the message says why."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from shard_fixtures import make_shard_dir

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 600
TINY = [
    "model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
    "model.intermediate_size=64", "deepspeed.train_batch_size=16", "deepspeed.train_micro_batch_size_per_gpu=8",
    "deepspeed.scheduler.params.warmup_num_steps=5", "train.val_every=0", "train.total_steps=200",
    "data.num_workers=0", "train.keep_last=5",
]


def child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def train_command(data: Path | str, run_dir: Path, *extra: str, sets: tuple[str, ...] = ()) -> list[str]:
    command = [sys.executable, "-m", "launch.cli", "train", "--config", "configs/bert-tiny.yaml", "--data",
               str(data), "--run-dir", str(run_dir), "--log-every", "1", *extra]
    for item in [*TINY, *sets]:
        command += ["--set", item]
    return command


def run(command: list[str], expect: int = 0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=TIMEOUT_S,
                          check=False)
    assert done.returncode == expect, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def loss_steps(run_dir: Path) -> list[int]:
    return [row["step"] for row in metric_rows(run_dir) if "loss" in row]


def tags(run_dir: Path) -> list[str]:
    return sorted(path.name for path in (run_dir / "checkpoints").glob("step*") if path.is_dir())


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shard_dir(tmp_path_factory.mktemp("faults"), n_train=256, n_val=32, seq_len=64)


@pytest.fixture(scope="module")
def finished_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with complete checkpoints at steps 10, 20 and 30."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run(train_command(data, run_dir, "--max-steps", "30", "--save-every", "10"))
    assert tags(run_dir) == ["step00000010", "step00000020", "step00000030"]
    return run_dir


@pytest.fixture()
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


@pytest.fixture()
def data_copy(data: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    return copy


def edit_manifest(data_dir: Path, edit) -> None:
    path = data_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


# 1. A refused resume destroys nothing; an accepted one moves the abandoned timeline aside.


@pytest.mark.slow
def test_refused_resume_keeps_every_checkpoint_and_the_config(data: Path, run_copy: Path) -> None:
    config_before = (run_copy / "config.yaml").read_bytes()
    older = run_copy / "checkpoints" / "step00000010"
    refused = run(train_command(data, run_copy, "--resume", str(older), sets=("model.hidden_size=48",)), expect=2)
    assert "hidden_size" in refused.stderr and "Traceback" not in refused.stderr
    assert tags(run_copy) == ["step00000010", "step00000020", "step00000030"]
    assert latest(run_copy) == "step00000030"
    assert (run_copy / "config.yaml").read_bytes() == config_before

    run(train_command(data, run_copy, "--resume", str(older), "--max-steps", "12"))
    assert latest(run_copy) == "step00000012"
    abandoned = run_copy / "checkpoints" / "abandoned"
    assert sorted(path.name for path in abandoned.iterdir()) == ["step00000020", "step00000030"]
    assert (abandoned / "step00000030" / "COMPLETE").is_file()


# 2. A damaged newest checkpoint falls back to the newest one that loads, naming the damaged file.


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "rng"])
def test_damaged_newest_checkpoint_falls_back_to_the_older_tag(data: Path, run_copy: Path, victim: str) -> None:
    newest = run_copy / "checkpoints" / "step00000030"
    files = [path for path in newest.iterdir() if path.is_file() and victim in path.name]
    assert files, sorted(path.name for path in newest.iterdir())
    damaged = files[0]
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    done = run(train_command(data, run_copy, "--max-steps", "22"))
    output = done.stdout + done.stderr
    assert damaged.name in output and "step00000020" in output
    assert latest(run_copy) == "step00000022"


@pytest.mark.slow
def test_export_of_a_run_with_a_damaged_newest_tag_uses_the_older_one(run_copy: Path, tmp_path: Path) -> None:
    model = run_copy / "checkpoints" / "step00000030" / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:100])
    done = run([sys.executable, "-m", "launch.cli", "export", str(run_copy), "--out", str(tmp_path / "export")])
    assert "step00000020" in done.stdout + done.stderr and "mp_rank_00_model_states.pt" in done.stdout + done.stderr
    assert (tmp_path / "export" / "model.safetensors").is_file()


# 3. Manifest text never becomes a command or a path outside the dataset.


@pytest.mark.parametrize("path", ["train-000000.tar; touch {marker}", "../outside.tar", "/etc/passwd"])
def test_hostile_shard_paths_are_refused(data_copy: Path, tmp_path: Path, path: str) -> None:
    marker = tmp_path / "planted"
    hostile = path.format(marker=marker)
    edit_manifest(data_copy, lambda m: m["splits"]["train"]["shards"][0].__setitem__("path", hostile))
    done = run(train_command(f"pipe:cat {data_copy}", tmp_path / "run", "--max-steps", "2"), expect=2)
    assert hostile in done.stderr and "Traceback" not in done.stderr
    assert not marker.exists()


@pytest.mark.parametrize("path", ["/etc/hostname", "{outside}", "../outside.model"])
def test_hostile_tokenizer_path_is_refused_by_inspect(data_copy: Path, tmp_path: Path, path: str) -> None:
    # A real tokenizer outside the dataset, which inspect would read without complaint.
    outside = tmp_path / "outside.model"
    shutil.copy(data_copy / "tokenizer" / "spm.model", outside)
    hostile = path.format(outside=outside)
    edit_manifest(data_copy, lambda m: m["tokenizer"].__setitem__("path", hostile))
    done = run([sys.executable, "-m", "launch.cli", "inspect", str(data_copy)], expect=2)
    assert hostile in done.stderr and "Traceback" not in done.stderr


def test_checkpoint_trace_keys_outside_the_run_are_refused(tmp_path: Path) -> None:
    from data_pipeline.errors import UserError
    from training import checkpoint as ckpt

    outside = tmp_path / "outside.txt"
    outside.write_text("keep me\n")
    (tmp_path / "run" / "trace").mkdir(parents=True)
    with pytest.raises(UserError, match=r"\.\./\.\./outside\.txt"):
        ckpt.truncate_traces(tmp_path / "run", {"../../outside.txt": 0})
    assert outside.read_text() == "keep me\n"


# 4. Corrupt data does not train silently.


def flip_last_token_byte(shard: Path) -> None:
    payload = bytearray(shard.read_bytes())
    # The last member's data ends before the two 512-byte end-of-archive blocks and its own padding;
    # flip a byte well inside the first tokens.npy instead: after its 512-byte tar header and npy header.
    payload[512 + 200] ^= 0xFF
    shard.write_bytes(bytes(payload))


@pytest.mark.slow
def test_a_flipped_byte_is_caught_by_the_sha256(data_copy: Path, tmp_path: Path) -> None:
    shard = data_copy / "train-000000.tar"
    flip_last_token_byte(shard)
    done = run(train_command(data_copy, tmp_path / "run", "--max-steps", "4"), expect=2)
    assert "train-000000.tar" in done.stderr and "sha256" in done.stderr and "Traceback" not in done.stderr
    run(train_command(data_copy, tmp_path / "unverified", "--max-steps", "2", "--verify-shards", "size"))


def test_a_shard_of_the_wrong_size_is_refused_at_start(data_copy: Path, tmp_path: Path) -> None:
    shard = data_copy / "train-000001.tar"
    shard.write_bytes(shard.read_bytes() + b"\0" * 512)
    done = run(train_command(data_copy, tmp_path / "run", "--max-steps", "2", "--verify-shards", "size"),
               expect=2)
    assert "train-000001.tar" in done.stderr and "bytes" in done.stderr and "Traceback" not in done.stderr


def test_a_manifest_without_checksums_is_refused_unless_asked(data_copy: Path, tmp_path: Path) -> None:
    def drop(manifest: dict) -> None:
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                shard["sha256"] = None

    edit_manifest(data_copy, drop)
    done = run(train_command(data_copy, tmp_path / "run", "--max-steps", "2"), expect=2)
    assert "sha256" in done.stderr and "--verify-shards" in done.stderr and "Traceback" not in done.stderr
    run(train_command(data_copy, tmp_path / "run", "--max-steps", "2", "--verify-shards", "none"))


def test_a_pickled_npy_member_is_a_clear_error(tmp_path: Path) -> None:
    import io
    import tarfile

    from data_pipeline.errors import UserError

    shard = tmp_path / "bad.tar"
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with tarfile.open(shard, "w") as tar:
        for name, payload in (("k-000000.tokens.npy", buffer.getvalue()), ("k-000000.seqs.npy", buffer.getvalue())):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    from training.data.chunks import ChunkReader

    reader = ChunkReader(str(tmp_path), [{"path": "bad.tar", "samples": 1}], window_samples=4)
    with pytest.raises(UserError, match=r"bad\.tar"):
        reader.chunk(0, 0)


@pytest.mark.slow
def test_a_shard_that_breaks_mid_run_saves_a_checkpoint_first(data_copy: Path, tmp_path: Path) -> None:
    # One train shard's bytes are replaced by a same-size file that is not a tar: the size check passes,
    # and the first read of that shard (some steps in) fails. The run saves before it exits.
    shard = data_copy / "train-000003.tar"
    shard.write_bytes(b"\x01" * shard.stat().st_size)
    run_dir = tmp_path / "run"
    done = run(train_command(data_copy, run_dir, "--max-steps", "40", "--verify-shards", "size"), expect=2)
    assert "train-000003.tar" in done.stderr and "Traceback" not in done.stderr
    steps = loss_steps(run_dir)
    if steps:  # the broken shard was first needed after step 0: that progress is kept
        assert latest(run_dir) == f"step{max(steps):08d}"


@pytest.mark.slow
def test_the_checkpoint_saved_on_a_data_error_resumes_bit_exact(data_copy: Path, tmp_path: Path) -> None:
    # The failed step already drew dropout masks; the saved generator states must be those before it.
    shard = data_copy / "train-000003.tar"
    original = shard.read_bytes()
    shard.write_bytes(b"\x01" * len(original))
    broken, reference = tmp_path / "broken", tmp_path / "reference"
    run(train_command(data_copy, broken, "--max-steps", "40", "--verify-shards", "size"), expect=2)
    saved = max(loss_steps(broken))
    assert saved > 0 and latest(broken) == f"step{saved:08d}"
    shard.write_bytes(original)
    run(train_command(data_copy, broken, "--max-steps", str(saved + 3), "--verify-shards", "size"))
    run(train_command(data_copy, reference, "--max-steps", str(saved + 3), "--verify-shards", "size"))
    resumed = {row["step"]: row["loss"] for row in metric_rows(broken) if "loss" in row}
    expected = {row["step"]: row["loss"] for row in metric_rows(reference) if "loss" in row}
    assert resumed == expected


# 5. The project's own checkpoint files need no pickle; planted pickles are not run.


@pytest.mark.slow
def test_planted_pickle_in_model_states_is_not_executed(run_copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import torch

    model = run_copy / "checkpoints" / "step00000030" / "mp_rank_00_model_states.pt"
    state = torch.load(model, map_location="cpu", weights_only=False)
    state["planted"] = Planted()
    torch.save(state, model)
    done = subprocess.run([sys.executable, "-m", "launch.cli", "export", str(run_copy), "--out",
                           str(tmp_path / "export")], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S, check=False)
    assert not marker.exists(), "a pickle planted in the checkpoint ran"
    assert "Traceback" not in done.stderr


def test_rng_state_files_are_not_pickles(finished_run: Path) -> None:
    tag = finished_run / "checkpoints" / "step00000030"
    rng_files = [path for path in tag.iterdir() if "rng" in path.name]
    assert rng_files
    for path in rng_files:
        assert path.read_bytes()[:1] != b"\x80" and not path.name.endswith((".pt", ".pkl")), path.name


# 7. Ctrl-C saves and exits cleanly.


@pytest.mark.slow
def test_sigint_saves_and_exits_cleanly(data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    process = subprocess.Popen(train_command(data, run_dir, "--save-every", "1000"), cwd=REPO, env=child_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if (run_dir / "metrics.jsonl").exists() and max(loss_steps(run_dir), default=0) > 2:
                process.send_signal(signal.SIGINT)
                break
            time.sleep(0.05)
        _, stderr = process.communicate(timeout=TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    assert latest(run_dir) == f"step{max(loss_steps(run_dir)):08d}"


# 8. One metrics row per step after a resume.


@pytest.mark.slow
def test_resume_keeps_one_metrics_row_per_step(data: Path, run_copy: Path) -> None:
    older = run_copy / "checkpoints" / "step00000020"
    run(train_command(data, run_copy, "--resume", str(older), "--max-steps", "33"))
    steps = loss_steps(run_copy)
    assert steps == sorted(set(steps)) == list(range(1, 34))


# 9. An empty validation split skips validation with a warning, decided at start.


@pytest.mark.slow
def test_empty_val_split_skips_validation_with_a_warning(data_copy: Path, tmp_path: Path) -> None:
    def empty_val(manifest: dict) -> None:
        manifest["splits"]["val"] = {"samples": 0, "tokens": 0, "shards": []}

    edit_manifest(data_copy, empty_val)
    done = run(train_command(data_copy, tmp_path / "run", "--max-steps", "6",
                             sets=("train.val_every=3", "train.val_batches=2")))
    assert "validation" in (done.stdout + done.stderr).lower()
    assert loss_steps(tmp_path / "run") == list(range(1, 7))


# 10. Continuing a finished run is refused, naming the setting.


@pytest.mark.slow
def test_total_steps_below_the_checkpoint_step_is_refused(data: Path, run_copy: Path) -> None:
    config_before = (run_copy / "config.yaml").read_bytes()
    done = run(train_command(data, run_copy, sets=("train.total_steps=20",)), expect=2)
    assert "--set train.total_steps" in done.stderr and "Traceback" not in done.stderr
    assert (run_copy / "config.yaml").read_bytes() == config_before


# 11. On CPU, Adam resolves to the torch optimizer (no compile of a fused op); the decision is printed once.

FINETUNE_CONFIGS = sorted(path.name for path in (REPO / "configs").glob("finetune-*.yaml"))


def resolved_as_the_trainers_do(name: str, cuda: bool) -> dict:
    from training.config import load_config
    from training.deepspeed_config import resolve_deepspeed, resolve_deepspeed_config
    from training.finetune.config import load_finetune_config

    if name.startswith("finetune-"):
        return resolve_deepspeed(load_finetune_config(REPO / "configs" / name).deepspeed, 1, 100, 10, cuda=cuda)
    return resolve_deepspeed_config(load_config(REPO / "configs" / name), 1, cuda=cuda)


@pytest.mark.parametrize("name", [*FINETUNE_CONFIGS, "bert-tiny.yaml"])
def test_cpu_runs_resolve_adam_to_the_torch_optimizer(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert FINETUNE_CONFIGS
    on_cpu = resolved_as_the_trainers_do(name, cuda=False)
    assert on_cpu["optimizer"]["type"].lower() in ("adam", "adamw")
    assert on_cpu["optimizer"]["params"]["torch_adam"] is True
    on_gpu = resolved_as_the_trainers_do(name, cuda=True)
    assert on_gpu["optimizer"]["params"].get("torch_adam") == (True if name == "bert-tiny.yaml" else None)
    printed = capsys.readouterr().out
    # bert-tiny asks for torch_adam itself: nothing was decided for it.
    assert printed.count("torch_adam: true") == (0 if name == "bert-tiny.yaml" else 1), printed


def test_a_first_compile_of_a_deepspeed_op_is_announced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    from training.engine import announce_op_compile

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or installed_ops.get(builder.NAME) or not deepspeed.ops.__compatible_ops__.get(builder.NAME):
        pytest.skip("DeepSpeed builds no shared-memory comm op here")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("RANK", raising=False)
    capsys.readouterr()
    announce_op_compile("ShareMemCommBuilder", "CPU shared-memory communication")
    printed = capsys.readouterr().out
    assert printed.count("\n") == 1 and "compiling DeepSpeed's" in printed and str(tmp_path) in printed, printed
    built = tmp_path / builder.NAME / f"{builder.NAME}.so"
    built.parent.mkdir()
    built.write_bytes(b"")
    announce_op_compile("ShareMemCommBuilder", "CPU shared-memory communication")
    assert capsys.readouterr().out == ""


def test_an_explicit_torch_adam_choice_is_kept() -> None:
    from training.deepspeed_config import resolve_deepspeed

    section = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8,
               "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": False}}}
    assert resolve_deepspeed(section, 1, 10, cuda=False)["optimizer"]["params"]["torch_adam"] is False


# 12. A two-process CPU run removes the shared-memory buffers it created.


@pytest.mark.slow
def test_two_process_run_leaves_no_shared_memory_buffers(data: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Another run's buffer (same address, another port) must survive this run.
    stranger = Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port + 1}_0")
    stranger.write_bytes(b"another run")
    try:
        before = set(os.listdir("/dev/shm"))
        command = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), "--module", "training",
                   *train_command(data, tmp_path / "run", "--max-steps", "2")[4:]]
        run(command)
        left = sorted(set(os.listdir("/dev/shm")) - before)
        assert not [name for name in left if "deepspeed" in name], left
        assert stranger.read_bytes() == b"another run"
    finally:
        stranger.unlink(missing_ok=True)


# 6 and 7 under the `deepspeed` launcher: a stopped rank is named, and the command's own signals save.


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_deepspeed(data: Path, run_dir: Path, log: Path, *extra: str, sets: tuple[str, ...] = ()) -> subprocess.Popen:
    """Two CPU ranks under the `deepspeed` command, in a session of their own (as a terminal would)."""
    command = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", "training",
               *train_command(data, run_dir, *extra, sets=sets)[4:]]
    with log.open("w") as out:
        return subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, command line) of every process, from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        table[int(entry.name)] = (int(fields[1]), fields[0], command)
    return table


def descendants(pid: int) -> list[int]:
    table, found = process_table(), [pid]
    for candidate in found:
        found += [child for child, (parent, _, _) in table.items() if parent == candidate]
    return found


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the ranks below a `deepspeed` command (its launcher appends --local_rank=N)."""
    table = process_table()
    ranks = {}
    for pid in descendants(launcher_pid):
        for word in table.get(pid, (0, "", ""))[2].split():
            if word.startswith("--local_rank="):
                ranks[int(word.split("=")[1])] = pid
    return ranks


def alive(pid: int) -> bool:
    entry = process_table().get(pid)
    return entry is not None and entry[1] not in ("Z", "X")


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def wait_for_ranks_training(process: subprocess.Popen, run_dir: Path) -> dict[int, int]:
    trained = wait_until(lambda: process.poll() is not None or ((run_dir / "metrics.jsonl").exists()
                                                                and max(loss_steps(run_dir), default=0) > 2), TIMEOUT_S)
    assert trained and process.poll() is None, "the run ended before it could be signalled"
    ranks = rank_pids(process.pid)
    assert sorted(ranks) == [0, 1], ranks
    return ranks


def kill_what_is_left(pids: list[int]) -> None:
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_stopped_rank_is_named_and_the_others_exit(data: Path, tmp_path: Path) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "output.txt"
    process = start_deepspeed(data, run_dir, log, sets=("train.collective_timeout_s=15", "train.total_steps=100000"))
    pids = [process.pid]
    try:
        ranks = wait_for_ranks_training(process, run_dir)
        pids = descendants(process.pid)
        os.kill(ranks[1], signal.SIGSTOP)
        # 15 s for the collective, up to 15 s more for the check that names the rank; a bound, not a timing.
        assert wait_until(lambda: not alive(ranks[0]), 90), "rank 0 still waits for the stopped rank"
        os.kill(ranks[1], signal.SIGKILL)
        process.wait(timeout=120)
    finally:
        kill_what_is_left(pids)
    output = log.read_text()
    assert process.returncode != 0
    assert "pretrain train: error: rank 1 stopped answering" in output, output[-3000:]
    assert "Traceback" not in output, output[-5000:]
    assert wait_until(lambda: not any(alive(pid) for pid in pids), 30)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["command", "session"])
def test_signals_to_the_deepspeed_command_save_and_stop_every_rank(data: Path, tmp_path: Path, target: str) -> None:
    # SIGTERM to the `deepspeed` command alone (DeepSpeed's runner passes nothing on), or SIGINT to the whole
    # session, as Ctrl-C in a terminal sends it.
    run_dir, log = tmp_path / "run", tmp_path / "output.txt"
    process = start_deepspeed(data, run_dir, log, "--save-every", "1000", sets=("train.total_steps=100000",))
    pids = [process.pid]
    try:
        wait_for_ranks_training(process, run_dir)
        pids = descendants(process.pid)
        if target == "command":
            process.send_signal(signal.SIGTERM)
        else:
            os.killpg(process.pid, signal.SIGINT)
        assert wait_until(lambda: not any(alive(pid) for pid in pids[1:]), 120), "ranks left running"
    finally:
        kill_what_is_left(pids)
    output = log.read_text()
    assert latest(run_dir) == f"step{max(loss_steps(run_dir)):08d}", output[-3000:]
    # Rank 0 logs the reason it saw first: its own (the command ended, SIGINT, the launcher's SIGTERM) or,
    # when another rank noticed first, "on another rank".
    reasons = ("the deepspeed command ended", "on another rank") if target == "command" else ("SIG", "on another rank")
    assert any(f"stop requested ({reason}" in output for reason in reasons), output[-3000:]
    # The ranks print no traceback (DeepSpeed's own runner may print its KeyboardInterrupt).
    assert 'File "' + str(REPO) not in output, output[-5000:]
