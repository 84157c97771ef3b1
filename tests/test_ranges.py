"""A large JSON-lines file read in byte ranges gives exactly the records of a whole read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.rejects import Reject
from data_pipeline.text import ranges
from data_pipeline.text.range_readers import is_splittable, read_line_range
from data_pipeline.text.ranges import ReadRange, count_before, count_newlines, plan_ranges
from data_pipeline.text.readers import Document, ReaderOptions, default_opener, read_records


def ranged_read(path: Path, range_bytes: int) -> list[Document | Reject]:
    """Every range of ``path`` read on its own, in order, the way the job's read tasks do."""
    ranges = plan_ranges(str(path), path.stat().st_size, True, range_bytes)
    with open(path, "rb") as handle:
        counts = {(r.path, r.start): count_newlines(handle, r.start, r.end or 0) for r in ranges}
    records: list[Document | Reject] = []
    for read_range in ranges:
        if read_range.is_whole:  # a file no larger than one range
            return list(read_records(str(path)))
        before = count_before(counts, read_range.path, read_range.start)
        records += read_line_range(str(path), default_opener, ReaderOptions(), read_range, before)
    return records


def write_lines(path: Path, texts: list[str], newline: bytes = b"\n", last_newline: bool = True) -> None:
    lines = [json.dumps({"text": text}).encode() for text in texts]
    body = newline.join(lines) + (newline if last_newline else b"")
    path.write_bytes(body)


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
@pytest.mark.parametrize("last_newline", [True, False])
@pytest.mark.parametrize("range_bytes", [1, 7, 50, 64, 333, 10_000])
def test_ranges_give_the_records_of_a_whole_read(
    tmp_path: Path, newline: bytes, last_newline: bool, range_bytes: int
) -> None:
    path = tmp_path / "big.jsonl"
    texts = [f"document {i} " + "word " * (i % 17) for i in range(40)]
    write_lines(path, texts, newline, last_newline)
    whole = list(read_records(str(path)))
    assert len(whole) == 40
    assert ranged_read(path, range_bytes) == whole


def test_ranges_keep_line_numbers_of_blank_and_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    body = b'\xef\xbb\xbf{"text": "first"}\n\n{not json\n' + b'{"text": "caf\xe9"}\n' * 3 + b'{"x": 1}\n'
    body += b"".join(json.dumps({"text": f"line {i}"}).encode() + b"\n" for i in range(30))
    path.write_bytes(body)
    whole = list(read_records(str(path)))
    assert any(isinstance(r, Reject) and r.reason == "malformed_json" and r.offset == 2 for r in whole)
    for range_bytes in (3, 16, 41, 100):
        assert ranged_read(path, range_bytes) == whole


def test_a_line_longer_than_several_ranges_is_read_once(tmp_path: Path) -> None:
    path = tmp_path / "long.jsonl"
    write_lines(path, ["short", "x" * 1000, "after"])
    ranges = plan_ranges(str(path), path.stat().st_size, True, 100)
    assert len(ranges) > 5
    assert ranged_read(path, 100) == list(read_records(str(path)))


def test_plan_ranges_covers_the_file_and_leaves_small_files_whole() -> None:
    assert plan_ranges("a.jsonl", 100, True, 100) == [ReadRange("a.jsonl")]
    assert plan_ranges("a.jsonl.gz", 10**9, False, 100) == [ReadRange("a.jsonl.gz")]
    ranges = plan_ranges("a.jsonl", 1000, True, 300)
    assert [(r.start, r.end) for r in ranges] == [(0, 250), (250, 500), (500, 750), (750, 1000)]


@pytest.mark.parametrize(
    "name, expected", [("a.jsonl", True), ("a.json", True), ("a.jsonl.gz", False), ("a.txt", False)]
)
def test_only_uncompressed_json_lines_are_splittable(name: str, expected: bool) -> None:
    assert is_splittable(name, ReaderOptions()) is expected


def test_the_job_writes_the_same_bytes_from_ranges_as_from_whole_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers, one jsonl file cut into ~30 ranges: shards, rejects and manifest as from one read."""
    from test_distributed import digests
    from test_pipeline import document, prepare, train_tokenizer

    from data_pipeline.text.reading import plan_read_ranges

    rng = np.random.default_rng(3)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = [json.dumps({"text": document(rng)}) for _ in range(120)] + ["{bad", json.dumps({"text": "tiny"})]
    (corpus / "one.jsonl").write_text(
        "\r\n".join(lines[:60]) + "\n" + "\n".join(lines[60:]), encoding="utf-8"
    )
    model = train_tokenizer(corpus, tmp_path / "tok")
    workers = ["--", "--direct_num_workers=2"]
    assert prepare(corpus, model, tmp_path / "whole", *workers) == 0
    monkeypatch.setattr(ranges, "RANGE_BYTES", 3000)
    assert len(plan_read_ranges([str(corpus / "one.jsonl")], ReaderOptions())) > 10
    assert prepare(corpus, model, tmp_path / "ranged", *workers) == 0
    assert digests(tmp_path / "ranged") == digests(tmp_path / "whole")
    assert (tmp_path / "whole" / "rejects" / "malformed_json.jsonl").read_text().count('"offset": 120') == 1
