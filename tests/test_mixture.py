"""Weighted mixtures: the batch schedule, per-source epochs, exact and elastic resume, refusals, a CLI run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from shard_fixtures import make_shard_dir

from data_pipeline.errors import UserError
from training.config import config_from_dict
from training.data.mixture import MixtureLoader, text_mixture_loader
from training.data.text import text_loader
from training.order import check_mixture_batch, mixture_boundaries, mixture_drawn, mixture_step

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 24  # divisible by micro batch 2 x world sizes 1, 2, 3
MICRO_BATCH = 2
BIG, SMALL = 300, 60  # train samples of the two sources
WEIGHTS = (0.5, 0.5)  # 12 samples of each source per step: the small source repeats every 5 steps


# ------------------------------------------------------------------------------------------ the schedule


@pytest.mark.parametrize(
    ("weights", "global_batch"),
    [((0.4, 0.6), 256), ((0.4, 0.6), 24), ((0.7, 0.2, 0.1), 64), ((3.0, 1.0), 10), ((0.05, 0.95), 32)],
)
def test_proportions_follow_the_weights_within_one_percent_over_1000_batches(
    weights: tuple[float, ...], global_batch: int
) -> None:
    boundaries = mixture_boundaries(weights)
    shares = np.asarray(weights) / sum(weights)
    counts = np.zeros(len(weights), dtype=np.int64)
    for step in range(1000):
        sources, stream = mixture_step(boundaries, global_batch, step)
        assert sources.shape == stream.shape == (global_batch,)
        for source in range(len(weights)):  # each source's slots take its stream in order, none skipped
            here = stream[sources == source]
            assert (here == counts[source] + np.arange(len(here))).all()
        counts += np.bincount(sources, minlength=len(weights))
        drawn = mixture_drawn(boundaries, (step + 1) * global_batch)
        assert (counts == drawn).all()
        assert (np.abs(drawn - shares * (step + 1) * global_batch) < 1 + 1e-9).all()  # within one sample
    realised = counts / counts.sum()
    assert (np.abs(realised - shares) <= 0.01).all(), (realised, shares)


def test_every_micro_batch_gets_about_the_weights_share() -> None:
    boundaries = mixture_boundaries([0.25, 0.75])
    sources, _ = mixture_step(boundaries, 64, step=3)
    per_micro = [int((sources[start : start + 8] == 0).sum()) for start in range(0, 64, 8)]
    assert per_micro == [2] * 8


def test_a_source_under_one_sample_per_batch_is_refused() -> None:
    with pytest.raises(UserError, match=r"source 1 has a share 0\.01 of the mixture, 0\.64 samples of a"):
        check_mixture_batch(mixture_boundaries([0.99, 0.01]), 64)
    with pytest.raises(UserError, match=r"a mixture needs at least 2 sources, got 1"):
        mixture_boundaries([1.0])
    with pytest.raises(UserError, match=r"weight of source 1: expected a number > 0, got -1"):
        mixture_boundaries([1.0, -1])


# ------------------------------------------------------------------------------------------ the loader


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two sources made with the same tokenizer seed (so the same tokenizer sha256), of different sizes."""
    root = tmp_path_factory.mktemp("mixture")
    big = make_shard_dir(root, n_train=BIG, n_val=24, n_shards=5, seq_len=48, name="big")
    small = make_shard_dir(root, n_train=SMALL, n_val=8, n_shards=2, seq_len=48, name="small")
    return [big, small]


def mixture(sources: list[Path], rank: int = 0, world_size: int = 1, **options: Any) -> MixtureLoader:
    settings: dict[str, Any] = {
        "global_batch_size": GLOBAL_BATCH,
        "micro_batch_size": MICRO_BATCH,
        "rank": rank,
        "world_size": world_size,
        "seed": 7,
        "num_workers": 0,
        "window_samples": 32,
    }
    weights = options.pop("weights", WEIGHTS)
    settings.update(options)
    return text_mixture_loader(list(zip(map(str, sources), weights)), **settings)


def run_steps(ranks: list[Any], steps: int) -> list[list[dict[str, Any]]]:
    """Drive all ranks (simulated in one process) through optimizer steps; micro batches per rank."""
    iterators = [iter(rank) for rank in ranks]
    taken: list[list[dict[str, Any]]] = [[] for _ in ranks]
    for _ in range(steps):
        for rank, iterator, out in zip(ranks, iterators, taken):
            out.extend(next(iterator) for _ in range(rank.grad_accum))
            rank.step_done()
    return taken


def global_order(taken: list[list[dict[str, Any]]]) -> list[str]:
    """Sample ids in global-batch slot order: micro step k of rank r holds slots k*m*world + r*m..."""
    world_size = len(taken)
    ids: list[str] = []
    for micro in range(len(taken[0])):  # micro batches of all steps, in order; every rank has as many
        for rank in range(world_size):
            ids.extend(taken[rank][micro]["sample_ids"])
    return ids


def by_source(ids: list[str]) -> dict[int, list[str]]:
    streams: dict[int, list[str]] = {}
    for sample in ids:
        source, _, rest = sample.partition(":")
        streams.setdefault(int(source), []).append(rest)
    return streams


def assert_epochs_exactly_once(stream: list[str], samples: int) -> int:
    """Each whole epoch of the source's stream holds every sample once; returns the number of whole epochs."""
    epochs = len(stream) // samples
    for epoch in range(epochs):
        part = stream[epoch * samples : (epoch + 1) * samples]
        assert len(set(part)) == samples, f"epoch {epoch}: {samples - len(set(part))} duplicates"
    tail = stream[epochs * samples :]
    assert len(set(tail)) == len(tail)
    return epochs


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_rank_gets_equal_batches_and_each_source_its_epochs_once(
    sources: list[Path], world_size: int
) -> None:
    ranks = [mixture(sources, rank, world_size) for rank in range(world_size)]
    steps = ranks[0].steps_per_epoch
    assert steps == BIG // (GLOBAL_BATCH // 2)  # the big source's epoch; the small one has had 5 by then
    taken = run_steps(ranks, steps)
    assert all(len(batches) == steps * GLOBAL_BATCH // (MICRO_BATCH * world_size) for batches in taken)
    assert all(len(batch["sample_ids"]) == MICRO_BATCH for batches in taken for batch in batches)
    streams = by_source(global_order(taken))
    assert [len(streams[0]), len(streams[1])] == [BIG, BIG]
    assert assert_epochs_exactly_once(streams[0], BIG) == 1
    assert assert_epochs_exactly_once(streams[1], SMALL) == 5  # the small source repeats ...
    assert streams[1][:SMALL] != streams[1][SMALL : 2 * SMALL]  # ... each pass in a new order
    expected = {"epoch": 1, "samples/0": BIG, "samples/1": BIG, "epoch/0": 1, "epoch/1": 5}
    assert ranks[0].progress_metrics() == expected
    single = global_order(run_steps([mixture(sources)], steps))  # the same global batches at any world size
    assert global_order(taken) == single


def assert_same_batches(left: list[dict[str, Any]], right: list[dict[str, Any]]) -> None:
    assert len(left) == len(right)
    for one, other in zip(left, right):
        assert one.keys() == other.keys() and one["sample_ids"] == other["sample_ids"]
        for name in one:
            if name != "sample_ids":
                assert torch.equal(one[name], other[name]), name


@pytest.mark.parametrize(("workers", "resume_workers"), [(0, 0), (2, 2), (2, 0)])
def test_resume_same_world_size_gives_identical_batches(
    sources: list[Path], workers: int, resume_workers: int
) -> None:
    first = [mixture(sources, rank, 2, num_workers=workers) for rank in range(2)]
    iterators = [iter(rank) for rank in first]
    expected: list[list[dict[str, Any]]] = [[], []]
    for step in range(9):  # one uninterrupted run; the state is saved after step 6 (the small source wrapped)
        if step == 6:
            states = [json.loads(json.dumps(rank.state_dict())) for rank in first]
        for rank, iterator, out in zip(first, iterators, expected):
            batches = [next(iterator) for _ in range(rank.grad_accum)]
            out.extend(batches if step >= 6 else [])
            rank.step_done()
    identity = first[0].mixture.sources[1].identity
    assert states[0]["sources"][1] == {
        "path": str(sources[1]), "weight": 0.5, "data_identity": identity, "epoch": 1, "position": 12
    }
    resumed = [mixture(sources, rank, 2, num_workers=resume_workers) for rank in range(2)]
    for rank, state in zip(resumed, states):
        rank.load_state_dict(state)
    for before, after in zip(expected, run_steps(resumed, 3)):
        assert_same_batches(before, after)


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_elastic_resume_covers_each_source_epoch_exactly_once(
    sources: list[Path], before: int, after: int
) -> None:
    old = [mixture(sources, rank, before) for rank in range(before)]
    done = run_steps(old, 7)
    state = json.loads(json.dumps(old[0].state_dict()))
    assert state["world_size_at_save"] == before
    new = [mixture(sources, rank, after) for rank in range(after)]
    for rank in new:
        rank.load_state_dict(state)
    rest = run_steps(new, 2 * new[0].steps_per_epoch - 7)
    ids = global_order(done) + global_order(rest)
    streams = by_source(ids)
    assert assert_epochs_exactly_once(streams[0], BIG) == 2
    assert assert_epochs_exactly_once(streams[1], SMALL) == 10
    reference = run_steps([mixture(sources)], 2 * new[0].steps_per_epoch)[0]
    assert ids == global_order([reference])
    resumed_rows = torch.cat([torch.cat([b["input_ids"] for b in batches]) for batches in zip(*rest)])
    reference_rows = torch.cat([batch["input_ids"] for batch in reference])
    assert torch.equal(resumed_rows, reference_rows[-len(resumed_rows) :])  # masks too: world-size free


def test_trace_ids_name_the_source(sources: list[Path]) -> None:
    batch = next(iter(mixture(sources)))
    assert {sample.split(":")[0] for sample in batch["sample_ids"]} <= {"0", "1"}
    assert all(sample.split(":")[1].startswith("train-") for sample in batch["sample_ids"])


# ------------------------------------------------------------------------------------------ refusals


def test_resume_refuses_another_mixture(sources: list[Path]) -> None:
    loader = mixture(sources)
    run_steps([loader], 3)
    state = json.loads(json.dumps(loader.state_dict()))
    with pytest.raises(UserError, match=r"sources\[1\]\.weight=0\.5 but this run has 0\.25"):
        mixture(sources, weights=(0.5, 0.25)).load_state_dict(state)
    mixture(sources, weights=(2.0, 2.0)).load_state_dict(state)  # the same shares
    with pytest.raises(UserError, match=r"sources\[0\]\.data_identity='[0-9a-f]+' \(.*big\) but this run"):
        mixture(sources[::-1]).load_state_dict(state)
    with pytest.raises(UserError, match=r"loader state has 2 sources but this run has 3"):
        mixture([*sources, sources[0]], weights=(1, 1, 1)).load_state_dict(state)
    with pytest.raises(UserError, match=r"global_batch_size=24 but this run has 48"):
        mixture(sources, global_batch_size=48).load_state_dict(state)
    moved = {**state, "sources": [state["sources"][0], {**state["sources"][1], "position": 99}]}
    with pytest.raises(UserError, match=r"sources\[1\]\.position=99 but step 3 of this mixture gives 36"):
        mixture(sources).load_state_dict(moved)


def test_single_and_mixture_states_do_not_mix(sources: list[Path]) -> None:
    single = text_loader(str(sources[0]), global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO_BATCH,
                         num_workers=0, seed=7, window_samples=32)
    with pytest.raises(UserError, match=r"state is of a run on one dataset .* this run mixes 2 sources"):
        mixture(sources).load_state_dict(single.state_dict())
    with pytest.raises(UserError, match=r"state is of a mixture of 2 sources .* this run reads one dataset"):
        single.load_state_dict(mixture(sources).state_dict())


def test_sources_of_another_seq_len_or_task_are_refused(sources: list[Path], tmp_path: Path) -> None:
    longer = make_shard_dir(tmp_path, n_train=60, n_val=8, n_shards=2, seq_len=64, name="longer")
    with pytest.raises(
        UserError,
        match=r"data.sources\[1\] \(.*longer\) has seq_len 64, but data.sources\[0\] \(.*big\) has 48",
    ):
        mixture([sources[0], longer])
    other = make_shard_dir(tmp_path, n_train=60, n_val=8, n_shards=2, seq_len=48, seed=1, name="other")
    with pytest.raises(UserError, match=r"data.sources\[1\] \(.*other\) has tokenizer sha256 '[0-9a-f]+'"):
        mixture([sources[0], other])
    none = make_shard_dir(tmp_path, n_train=60, n_val=8, n_shards=2, seq_len=48, objective="none", name="no")
    with pytest.raises(UserError, match=r"has sentence task \(objective\) 'none', but .* has 'nsp'"):
        mixture([sources[0], none])
    with pytest.raises(UserError, match=r"data.sources\[1\].path: no directory '.*missing'"):
        mixture([sources[0], tmp_path / "missing"])


WIKI = {"path": "wiki/", "weight": 0.4}


@pytest.mark.parametrize(
    ("sources_section", "message"),
    [
        ([WIKI, {"path": "b", "weight": 0}], r"data.sources\[1\].weight: expected a number > 0, got 0"),
        ([WIKI, {"path": "b"}], r"data.sources\[1\].weight: expected a number > 0, got None"),
        ([WIKI], r"data.sources: a mixture needs at least 2 sources, got 1"),
        ([WIKI, {"weight": 1}], r"data.sources\[1\].path: required"),
        ([WIKI, {"path": "b", "wieght": 1}], r"data.sources\[1\].wieght: unknown key"),
        ("wiki/", r"data.sources: expected a list, got 'wiki/'"),
    ],
)
def test_config_errors_name_the_key_and_value(sources_section: Any, message: str) -> None:
    with pytest.raises(UserError, match=message):
        config_from_dict({"data": {"sources": sources_section}})


# ------------------------------------------------------------------------------------------ end to end

TINY = [  # as tests/test_faults.py, with validation on
    "model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
    "model.intermediate_size=64", "deepspeed.train_batch_size=16",
    "deepspeed.train_micro_batch_size_per_gpu=8", "deepspeed.scheduler.params.warmup_num_steps=5",
    "train.val_every=3", "train.val_batches=1", "train.total_steps=200", "data.num_workers=0",
]


def child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def train(config: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "launch.cli", "train", "--config", str(config),
               "--run-dir", str(run_dir), "--log-every", "1", *extra]
    for item in TINY:
        command += ["--set", item]
    return subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600,
                          check=False)


def test_pretrain_train_on_a_mixture_traces_and_counts_each_source(
    sources: list[Path], tmp_path: Path
) -> None:
    config = yaml.safe_load((REPO / "configs" / "bert-tiny.yaml").read_text())
    config.setdefault("data", {})["sources"] = [{"path": str(sources[0]), "weight": 0.25},
                                               {"path": str(sources[1]), "weight": 0.75}]
    path = tmp_path / "mixture.yaml"
    path.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    done = train(path, run_dir, "--max-steps", "6", "--trace-samples")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    lines = (run_dir / "trace" / "rank00000.txt").read_text().split()
    assert len(lines) == 6 * 16
    counts = Counter(line.split(":")[0] for line in lines)
    assert counts == {"0": 6 * 4, "1": 6 * 12}
    assert all(len(line.split(":")) == 3 and line.split(":")[1].startswith("train-") for line in lines)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [row for row in rows if "loss" in row][-1]
    assert (last["samples/0"], last["samples/1"]) == (24, 72)
    assert (last["epoch/0"], last["epoch/1"], last["epoch"]) == (0, 1, 0)  # 72 of 60: the small one repeats
    assert any("val_loss" in row for row in rows)  # the first source's val split
    both = train(path, tmp_path / "both", "--data", str(sources[0]))
    assert both.returncode != 0 and "both name the data" in both.stdout + both.stderr
    config["data"]["sources"][1]["weight"] = 0.5
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(config))
    refused = train(changed, run_dir, "--max-steps", "8")
    assert refused.returncode != 0
    assert "sources[1].weight=0.75 but this run has 0.5" in refused.stdout + refused.stderr
    resumed = train(path, run_dir, "--max-steps", "8", "--trace-samples")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    lines = (run_dir / "trace" / "rank00000.txt").read_text().split()
    assert Counter(line.split(":")[0] for line in lines) == {"0": 8 * 4, "1": 8 * 12}
    streams = by_source(lines)  # one rank: the trace is in slot order, each source's stream in order
    assert assert_epochs_exactly_once(streams[0], BIG) == 0 and len(set(streams[0])) == 32
    assert assert_epochs_exactly_once(streams[1], SMALL) == 1  # 96 of 60: a whole epoch and 36 of the next
