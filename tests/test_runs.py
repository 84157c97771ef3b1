"""Run files: framing round trips, k-way merges in the order of a full sort, summaries, scratch clean-up."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import IO

import numpy as np

from data_pipeline import beam_common
from data_pipeline.text import splits
from data_pipeline.text.runs import (
    BucketedDocument,
    Section,
    documents_by_bucket,
    encode_document,
    encode_example,
    merged_documents,
    merged_examples,
    read_block_bytes,
    write_sections,
)


def opener(path: str) -> IO[bytes]:
    return open(path, "rb")


def write_run(path: Path, sections: list[tuple[object, list[bytes]]]) -> dict[object, Section]:
    with open(path, "wb") as sink:
        return dict(write_sections(sink, sections, str(path)))


def test_merged_examples_are_in_the_order_of_one_full_sort(tmp_path: Path) -> None:
    """Ties of keys (64-bit collisions) order by blob, exactly as ``sorted`` of all pairs does."""
    rng = random.Random(0)
    pairs = [
        (rng.choice([5, 7, 2**63 + 1, rng.getrandbits(64)]), os.urandom(rng.randint(0, 40)))
        for _ in range(3000)
    ]
    sections = []
    for run in range(7):
        items = sorted(pairs[run::7])
        written = write_run(
            tmp_path / f"{run}.run", [("a", []), ("b", [encode_example(k, b) for k, b in items])]
        )
        assert "a" not in written  # empty groups get no section
        sections.append(written["b"])
    merged = list(merged_examples(sections, opener))
    assert merged == sorted(pairs)


def test_documents_round_trip_and_group_by_bucket(tmp_path: Path) -> None:
    rng = random.Random(1)
    documents = sorted(
        BucketedDocument(
            rng.randint(0, 5),
            os.urandom(16),
            f"src-{rng.randint(0, 3)}-é",
            rng.randint(0, 99),
            os.urandom(50),
        )
        for _ in range(500)
    )
    halves = [documents[0::2], documents[1::2]]
    sections = [
        write_run(tmp_path / f"{i}.run", [(0, [encode_document(d) for d in half])])[0]
        for i, half in enumerate(halves)
    ]
    merged = list(merged_documents(sections, opener))
    assert merged == documents
    grouped = list(documents_by_bucket(iter(merged)))
    assert [bucket for bucket, _ in grouped] == sorted({d.bucket for d in documents})
    assert sum(len(records) for _, records in grouped) == 500
    assert grouped[0][1][0] == tuple(documents[0][1:])


def test_sections_stream_across_small_blocks(tmp_path: Path) -> None:
    """A record split over read blocks comes out whole (the smallest block is far below a record)."""
    blob = os.urandom(300_000)
    section = write_run(tmp_path / "big.run", [(0, [encode_example(1, blob), encode_example(2, b"")])])[0]
    assert list(merged_examples([section] * 1, opener)) == [(1, blob), (2, b"")]
    assert read_block_bytes(1) == 1 << 20 and read_block_bytes(10_000) == 64 * 1024


def test_summaries_count_each_document_once() -> None:
    first = splits.summarize_documents(
        [("train", b"a" * 16, 10), ("val", b"b" * 16, 3), ("train", b"a" * 16, 10)]
    )
    second = splits.summarize_documents([("train", b"c" * 16, 5), ("train", b"a" * 16, 10)])
    assert splits.summary_totals(splits.merge_summaries([first, second])) == {"train": (2, 15), "val": (1, 3)}
    assert splits.summary_totals(splits.merge_summaries([])) == {}
    hashes, tokens = splits.merge_summaries([first, second])["train"]
    assert hashes.dtype == np.dtype("V16") and tokens.tolist() == [10, 5]


def test_remove_temp_dirs_leaves_outputs_alone(tmp_path: Path) -> None:
    for name in ("_tmp-old/documents-1.run", "_tmp-old/examples-2.run", "_tmp-new/x.run", "train-000000.tar"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    beam_common.remove_temp_dirs(str(tmp_path), "_tmp-new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_tmp-old", "train-000000.tar"]
    beam_common.remove_temp_dirs(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar"]
    assert beam_common.new_temp_dir(str(tmp_path)).startswith(str(tmp_path / "_tmp-"))
