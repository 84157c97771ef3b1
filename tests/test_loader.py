"""The streaming loader: rank partitioning, order, exact and elastic resume, O(1) seek, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from shard_fixtures import make_shard_dir

from data_pipeline.errors import UserError
from training.data.loader import StepLoader
from training.data.text import text_loader, validation_batches
from training.order import EpochOrder

GLOBAL_BATCH = 24  # divisible by micro batch 2 x world sizes 1, 2, 3, 4
MICRO_BATCH = 2


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """7 train shards of uneven sizes, 16-sequence chunks, one 64-sample shuffle window per 4 chunks."""
    return make_shard_dir(tmp_path_factory.mktemp("loader"), n_train=500, n_val=90, n_shards=7, seq_len=48)


def loader(data_dir: Path, rank: int = 0, world_size: int = 1, **options: Any) -> StepLoader:
    settings: dict[str, Any] = {
        "global_batch_size": GLOBAL_BATCH,
        "micro_batch_size": MICRO_BATCH,
        "rank": rank,
        "world_size": world_size,
        "seed": 7,
        "num_workers": 0,
        "window_samples": 64,
    }
    settings.update(options)
    return text_loader(str(data_dir), **settings)


def run_steps(ranks: list[StepLoader], steps: int) -> list[list[dict[str, Any]]]:
    """Drive all ranks (simulated in one process) through optimizer steps; micro batches per rank."""
    iterators = [iter(rank) for rank in ranks]
    taken: list[list[dict[str, Any]]] = [[] for _ in ranks]
    for _ in range(steps):
        for rank, iterator, out in zip(ranks, iterators, taken):
            out.extend(next(iterator) for _ in range(rank.grad_accum))
            rank.step_done()
    return taken


def ids_of(batches: list[dict[str, Any]]) -> list[str]:
    return [sample for batch in batches for sample in batch["sample_ids"]]


def epoch_ids(data_dir: Path, epoch: int, seed: int = 7) -> list[str]:
    """The first steps_per_epoch * B sample ids of an epoch's global order."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    shards = manifest["splits"]["train"]["shards"]
    order = EpochOrder(np.array([s["samples"] for s in shards]), seed, epoch, window_samples=64)
    count = (order.total // GLOBAL_BATCH) * GLOBAL_BATCH
    shard_index, sample_index = order.sample_ids(np.arange(count))
    return [f"{shards[s]['path']}:{i}" for s, i in zip(shard_index, sample_index)]


def test_order_is_a_permutation_that_depends_on_seed_and_epoch_only(data_dir: Path) -> None:
    samples = np.array([90, 51, 27, 24, 109, 124, 75])
    order = EpochOrder(samples, seed=3, epoch=1, window_samples=32)
    shards, indices = order.sample_ids(np.arange(order.total))
    pairs = set(zip(shards.tolist(), indices.tolist()))
    assert pairs == {(s, i) for s, n in enumerate(samples) for i in range(n)}
    again = EpochOrder(samples, seed=3, epoch=1, window_samples=32).sample_ids(np.arange(order.total)[::-1])
    assert (again[0] == shards[::-1]).all() and (again[1] == indices[::-1]).all()
    assert (EpochOrder(samples, 3, 2, 32).sample_ids(np.arange(50))[1] != indices[:50]).any()
    assert (EpochOrder(samples, 4, 1, 32).sample_ids(np.arange(50))[1] != indices[:50]).any()


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_every_rank_gets_equal_batches_and_the_epoch_once(data_dir: Path, world_size: int) -> None:
    ranks = [loader(data_dir, rank, world_size) for rank in range(world_size)]
    steps = ranks[0].steps_per_epoch
    assert steps == 500 // GLOBAL_BATCH and all(r.steps_per_epoch == steps for r in ranks)
    taken = run_steps(ranks, steps)
    assert all(len(batches) == steps * GLOBAL_BATCH // (MICRO_BATCH * world_size) for batches in taken)
    assert all(len(batch["sample_ids"]) == MICRO_BATCH for batches in taken for batch in batches)
    seen = [sample for batches in taken for sample in ids_of(batches)]
    order = epoch_ids(data_dir, 0)
    assert len(seen) == len(set(seen)) and set(seen) == set(order)
    for rank, batches in enumerate(taken):  # micro step k of step s starts at s*B + k*m*world + rank*m
        starts = [
            step * GLOBAL_BATCH + micro * MICRO_BATCH * world_size + rank * MICRO_BATCH
            for step in range(steps)
            for micro in range(ranks[0].grad_accum)
        ]
        assert ids_of(batches) == [
            sample for start in starts for sample in order[start : start + MICRO_BATCH]
        ]
    assert all(r.epoch == 1 for r in ranks)


def test_epochs_continue_with_a_new_order(data_dir: Path) -> None:
    single = loader(data_dir, micro_batch_size=GLOBAL_BATCH)
    taken = run_steps([single], single.steps_per_epoch + 2)[0]
    steps = single.steps_per_epoch
    assert ids_of(taken[:steps]) == epoch_ids(data_dir, 0)
    assert ids_of(taken[steps:]) == epoch_ids(data_dir, 1)[: 2 * GLOBAL_BATCH]
    assert single.state_dict()["epoch"] == 1 and single.state_dict()["position"] == 2 * GLOBAL_BATCH


def test_batch_fields(data_dir: Path) -> None:
    batch = next(iter(loader(data_dir)))
    shape = (MICRO_BATCH, 48)
    for name in ("input_ids", "token_type_ids", "attention_mask", "labels"):
        assert batch[name].shape == shape and batch[name].dtype == torch.int64
    assert batch["next_sentence_label"].shape == (MICRO_BATCH,)
    assert ((batch["labels"] == -100) | (batch["attention_mask"] == 1)).all()


def assert_same_batches(left: list[dict[str, Any]], right: list[dict[str, Any]]) -> None:
    assert len(left) == len(right)
    for one, other in zip(left, right):
        assert one.keys() == other.keys() and one["sample_ids"] == other["sample_ids"]
        for name in one:
            if name != "sample_ids":
                assert torch.equal(one[name], other[name]), name


@pytest.mark.parametrize(("workers", "resume_workers"), [(0, 0), (2, 2), (2, 0)])
def test_resume_same_world_size_gives_identical_batches(
    data_dir: Path, workers: int, resume_workers: int
) -> None:
    first = [loader(data_dir, rank, 2, num_workers=workers) for rank in range(2)]
    iterators = [iter(rank) for rank in first]
    expected: list[list[dict[str, Any]]] = [[], []]
    for step in range(8):  # one uninterrupted run; the state is saved after step 5
        if step == 5:
            states = [json.loads(json.dumps(rank.state_dict())) for rank in first]
        for rank, iterator, out in zip(first, iterators, expected):
            batches = [next(iterator) for _ in range(rank.grad_accum)]
            out.extend(batches if step >= 5 else [])
            rank.step_done()
    resumed = [loader(data_dir, rank, 2, num_workers=resume_workers) for rank in range(2)]
    for rank, state in zip(resumed, states):
        rank.load_state_dict(state)
    for before, after in zip(expected, run_steps(resumed, 3)):
        assert_same_batches(before, after)


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (3, 4)])
def test_elastic_resume_covers_the_epoch_exactly_once(data_dir: Path, before: int, after: int) -> None:
    old = [loader(data_dir, rank, before) for rank in range(before)]
    done = run_steps(old, 8)
    state = old[0].state_dict()
    assert state == {**old[-1].state_dict()} and state["world_size_at_save"] == before
    new = [loader(data_dir, rank, after) for rank in range(after)]
    for rank in new:
        rank.load_state_dict(state)
    rest = run_steps(new, new[0].steps_per_epoch - 8)
    seen = [sample for batches in done + rest for sample in ids_of(batches)]
    assert len(seen) == len(set(seen)) and set(seen) == set(epoch_ids(data_dir, 0))
    assert all(rank.epoch == 1 for rank in new)


def test_masks_do_not_depend_on_world_size(data_dir: Path) -> None:
    rows: dict[int, dict[str, torch.Tensor]] = {}
    for world_size in (1, 3):
        ranks = [loader(data_dir, rank, world_size) for rank in range(world_size)]
        for batch in (b for batches in run_steps(ranks, 2) for b in batches):
            for row, sample in enumerate(batch["sample_ids"]):
                rows.setdefault(sample, {})[world_size] = batch["input_ids"][row]
    assert len(rows) == 2 * GLOBAL_BATCH
    assert all(torch.equal(both[1], both[3]) for both in rows.values())


def test_seek_reads_only_the_shards_at_the_position(data_dir: Path) -> None:
    deep = loader(data_dir)
    state = deep.state_dict()
    last_step = deep.steps_per_epoch - 1
    deep.load_state_dict({**state, "epoch": 3, "position": last_step * GLOBAL_BATCH})
    batch = next(iter(deep))
    paths = json.loads((data_dir / "manifest.json").read_text())["splits"]["train"]["shards"]
    wanted = {[s["path"] for s in paths].index(sample.split(":")[0]) for sample in batch["sample_ids"]}
    assert set(deep.source.reader.indexes) == wanted
    assert deep.source.reader.chunks_read <= MICRO_BATCH
    order = deep.order(3)
    assert set(order._windows) == wanted  # no window permutation built for earlier shards
    assert order.sample_ids(np.array([last_step * GLOBAL_BATCH]))[1].tolist() == [
        int(batch["sample_ids"][0].split(":")[1])
    ]


@pytest.mark.parametrize("scheme", ["file", "pipe"])
def test_remote_locations_give_the_same_batches(data_dir: Path, scheme: str) -> None:
    local = run_steps([loader(data_dir)], 2)[0]
    location = data_dir.as_uri() if scheme == "file" else f"pipe:cat {data_dir}"  # fsspec; webdataset gopen
    assert_same_batches(local, run_steps([loader(location)], 2)[0])


def test_validation_slices_are_equal_disjoint_and_fixed(data_dir: Path) -> None:
    per_rank = [
        list(validation_batches(str(data_dir), micro_batch_size=4, rank=r, world_size=4, seed=1))
        for r in range(4)
    ]
    assert [len(batches) for batches in per_rank] == [6] * 4  # 90 // 4 = 22 samples: 5 x 4 + 2
    seen = [sample for batches in per_rank for sample in ids_of(batches)]
    assert len(seen) == len(set(seen)) == 88
    again = list(
        validation_batches(
            str(data_dir), micro_batch_size=4, rank=1, world_size=4, seed=1, max_batches=2, num_workers=2
        )
    )
    assert_same_batches(per_rank[1][:2], again)


def test_objective_none_has_no_sentence_label(tmp_path: Path) -> None:
    none_dir = make_shard_dir(tmp_path, n_train=64, n_val=8, n_shards=2, objective="none")
    batch = next(iter(text_loader(str(none_dir), global_batch_size=8, micro_batch_size=8, num_workers=0)))
    assert "next_sentence_label" not in batch and batch["input_ids"].shape == (8, 64)


def test_global_batch_not_divisible(data_dir: Path) -> None:
    with pytest.raises(
        UserError,
        match=r"global_batch_size 30 is not divisible by micro_batch_size 4 "
        r"x world_size 2 = 8",
    ):
        loader(data_dir, world_size=2, global_batch_size=30, micro_batch_size=4)


def test_resume_refuses_a_changed_global_batch(data_dir: Path) -> None:
    state = loader(data_dir).state_dict()
    with pytest.raises(UserError, match=r"global_batch_size=24 but this run has 48"):
        loader(data_dir, global_batch_size=48).load_state_dict(state)
    with pytest.raises(UserError, match=r"lacks keys \['position'\]"):
        loader(data_dir).load_state_dict({k: v for k, v in state.items() if k != "position"})


def edit_manifest(source: Path, tmp_path: Path, change: Any) -> Path:
    """Copy a data dir's manifest next to links to its files, then let ``change`` edit it."""
    target = tmp_path / "edited"
    target.mkdir()
    for item in source.iterdir():
        if item.name != "manifest.json":
            (target / item.name).symlink_to(item)
    manifest = json.loads((source / "manifest.json").read_text())
    change(manifest)
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def _shift_samples(manifest: dict[str, Any]) -> None:
    shards = manifest["splits"]["train"]["shards"]
    shards[0]["samples"] += 1
    shards[1]["samples"] -= 1


@pytest.mark.parametrize(
    ("change", "message", "when"),
    [
        (lambda m: m.pop("seq_len"), r"lacks keys \['seq_len'\]", "open"),
        (lambda m: m.update(objective="mlm"), r"objective 'mlm' is not one of", "open"),
        (lambda m: m["splits"].pop("train"), r"no split 'train'", "open"),
        (
            lambda m: m["splits"]["train"].update(samples=7),
            r"splits.train.samples is 7, its shards hold 500",
            "open",
        ),
        (lambda m: m["tokenizer"].update(vocab_size=999), r"320 pieces, manifest vocab_size 999", "open"),
        (
            lambda m: m["tokenizer"].update(sha256="0" * 64),
            r"spm.model: sha256 differs from the manifest",
            "open",
        ),
        (_shift_samples, r"shard .*train-00000[01].tar: \d+ samples in manifest, \d+ in file", "read"),
        (lambda m: m.update(seq_len=20), r"with framing exceeds the manifest seq_len 20", "read"),
    ],
)
def test_bad_manifest_is_a_user_error(
    data_dir: Path, tmp_path: Path, change: Any, message: str, when: str
) -> None:
    edited = edit_manifest(data_dir, tmp_path, change)
    with pytest.raises(UserError, match=message):
        single = loader(edited, window_samples=10_000)  # one window per shard: the first batch reads shard 0
        if when == "read":
            for _ in zip(range(300), single):
                pass


def test_missing_manifest_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no manifest at .*manifest.json"):
        loader(tmp_path)


def test_a_worker_user_error_reaches_the_caller_as_its_message(data_dir: Path, tmp_path: Path) -> None:
    edited = edit_manifest(data_dir, tmp_path, lambda m: m.update(seq_len=20))
    with pytest.raises(UserError, match=r"exceeds the manifest seq_len 20$") as caught:
        next(iter(loader(edited, num_workers=2)))
    assert "Traceback" not in str(caught.value)


def test_a_program_left_with_a_live_multi_worker_iterator_still_exits(tmp_path: Path) -> None:
    # Workers ignore SIGTERM (so a pre-empted rank can finish its step); exit must not wait on them.
    data = make_shard_dir(tmp_path)
    script = (
        "import sys; from training.data.text import text_loader\n"
        f"loader = text_loader({str(data)!r}, global_batch_size=8, micro_batch_size=4, num_workers=2)\n"
        "batches = iter(loader); next(batches); print('batch', flush=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "batch"


def copy_with_changed_shards(source: Path, tmp_path: Path, change: Any) -> Path:
    """``edit_manifest`` with an unchanged manifest, then every train shard replaced by ``change(bytes)``."""
    target = edit_manifest(source, tmp_path, lambda m: None)
    for shard in target.glob("train-*.tar"):
        payload = change(bytearray(shard.read_bytes()))
        shard.unlink()  # a link to the shared fixture: replace it, do not write through it
        shard.write_bytes(bytes(payload))
    return target


def _flip_last_byte(payload: bytearray) -> bytearray:
    # The last byte lies in the tar's trailing zero blocks: the shard still reads, only its sha256 differs.
    payload[-1] ^= 0xFF
    return payload


def test_a_changed_shard_fails_its_sha256_even_in_a_worker(data_dir: Path, tmp_path: Path) -> None:
    changed = copy_with_changed_shards(data_dir, tmp_path, _flip_last_byte)
    with pytest.raises(UserError, match=r"train-00000\d\.tar: sha256 [0-9a-f]{64} differs from the manifest"):
        next(iter(loader(changed, num_workers=2)))
    assert len(next(iter(loader(changed, verify="size")))["sample_ids"]) == MICRO_BATCH


def test_a_shard_of_another_size_is_refused_when_the_loader_is_built(data_dir: Path, tmp_path: Path) -> None:
    longer = copy_with_changed_shards(data_dir, tmp_path, lambda payload: payload + b"\0" * 512)
    with pytest.raises(UserError, match=r"train-000000\.tar: \d+ bytes, the manifest says \d+ bytes"):
        loader(longer, verify="size")
    assert len(next(iter(loader(longer, verify="none")))["sample_ids"]) == MICRO_BATCH


def test_shards_without_checksums_need_a_weaker_check(data_dir: Path, tmp_path: Path) -> None:
    def drop(manifest: dict[str, Any]) -> None:
        for shard in manifest["splits"]["train"]["shards"]:
            shard["sha256"] = None

    unchecked = edit_manifest(data_dir, tmp_path, drop)
    with pytest.raises(UserError, match=r"records no sha256.*--verify-shards size"):
        loader(unchecked)
    loader(unchecked, verify="size")
    with pytest.raises(UserError, match=r"--verify-shards 'fast': expected one of full, size, none"):
        loader(unchecked, verify="fast")


def test_each_shard_is_hashed_once_per_process(data_dir: Path, tmp_path: Path, monkeypatch: Any) -> None:
    from training.data import files

    hashed: list[int] = []
    digest = files.file_digest
    monkeypatch.setattr(files, "file_digest", lambda handle: hashed.append(1) or digest(handle))
    fresh = edit_manifest(data_dir, tmp_path, lambda m: None)  # a new location: not hashed yet here
    # Two epochs over 7 shards with 4 open handles reopen shards, and a second loader opens them again.
    run_steps([loader(fresh)], 2 * 500 // GLOBAL_BATCH)
    run_steps([loader(fresh)], 5)
    assert len(hashed) == 7
