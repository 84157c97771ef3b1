"""Hostfile building, and two "nodes" on one machine through the real DeepSpeed launcher (--no_ssh)."""

from __future__ import annotations

import itertools
import os
import subprocess
from pathlib import Path

import pytest
from shard_fixtures import make_shard_dir
from test_trainer import REPO, TIMEOUT_S, child_env, free_port, train_args

from data_pipeline.errors import UserError
from launch.hostfile import hostfile_lines, main, parse_host_list, slurm_hosts_and_slots
from training.data.text import text_loader


def test_hostfile_lines_from_a_host_list() -> None:
    assert hostfile_lines(parse_host_list("node1, node2,,node3"), 8) == [
        "node1 slots=8", "node2 slots=8", "node3 slots=8"]
    with pytest.raises(UserError, match=r"host 'node1' listed twice"):
        hostfile_lines(["node1", "node1"], 8)
    with pytest.raises(UserError, match=r"--slots must be at least 1, got 0"):
        hostfile_lines(["node1"], 0)
    with pytest.raises(UserError, match=r"host 'a b' is not a valid host name"):
        hostfile_lines(["a b"], 1)


def test_slurm_allocation_expands_the_node_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An `scontrol` on PATH that answers `show hostnames` as SLURM does (no SLURM on test machines).
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[01-02]" ] && printf "gpu01\\ngpu02\\n"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    env = {"SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_GPUS_ON_NODE": "4"}
    assert slurm_hosts_and_slots(env, None) == (["gpu01", "gpu02"], 4)
    assert slurm_hosts_and_slots(env, 2) == (["gpu01", "gpu02"], 2)  # --slots wins
    assert slurm_hosts_and_slots({**env, "SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "h100:8"}, None)[1] == 8
    with pytest.raises(UserError, match=r"scontrol show hostnames 'bad\[' failed"):
        slurm_hosts_and_slots({"SLURM_JOB_NODELIST": "bad[", "SLURM_GPUS_ON_NODE": "1"}, None)
    with pytest.raises(UserError, match=r"SLURM_JOB_NODELIST is not set"):
        slurm_hosts_and_slots({}, 8)
    with pytest.raises(UserError, match=r"SLURM_GPUS_ON_NODE is not set; give --slots N"):
        slurm_hosts_and_slots({"SLURM_JOB_NODELIST": "gpu01"}, None)


def test_cli_writes_the_file_and_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "hostfile"
    assert main(["--hosts", "a,b", "--slots", "2", "--output", str(out)]) == 0
    assert out.read_text() == "a slots=2\nb slots=2\n"
    assert main(["--hosts", "a"]) == 2
    assert "--hosts needs --slots N" in capsys.readouterr().err
    assert main(["--slurm"], env={}) == 2


@pytest.mark.slow
def test_two_nodes_no_ssh_share_the_samples_exactly_once(tmp_path: Path) -> None:
    data = make_shard_dir(tmp_path, n_train=256, n_val=32, seq_len=64)
    hostfile, run_dir, port, steps = tmp_path / "hostfile", tmp_path / "run", free_port(), 6
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    nodes = [
        subprocess.Popen(
            ["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--num_nodes", "2", "--node_rank", str(rank),
             "--master_addr", "127.0.0.1", "--master_port", str(port), "--module", "training",
             *train_args(data, run_dir, "--max-steps", str(steps), "--trace-samples")],
            cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=TIMEOUT_S)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-5000:]
    assert "world size 2" in outputs[0]

    traces = [(run_dir / "trace" / f"rank{rank:05d}.txt").read_text().splitlines() for rank in (0, 1)]
    assert len(traces[0]) == len(traces[1]) == steps * 16 // 2
    assert not set(traces[0]) & set(traces[1])
    # What the steps should consume: the loader's global order for world size 1 (global batch 16, micro 4).
    loader = text_loader(str(data), global_batch_size=16, micro_batch_size=4, seed=1234, num_workers=0)
    expected = [i for batch in itertools.islice(loader, steps * loader.grad_accum) for i in batch["sample_ids"]]
    assert sorted(traces[0] + traces[1]) == sorted(expected) and len(set(expected)) == len(expected)
