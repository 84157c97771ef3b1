"""The compact shard format: round trip, webdataset compatibility, size, determinism, errors."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data_pipeline.formats.location import join_location
from data_pipeline.formats.manifest import FORMAT_NAME, ManifestError, read_manifest
from data_pipeline.formats.text import (
    Example,
    chunk_from_sample,
    iter_chunks,
    read_shard,
    token_dtype,
    write_shard,
)


def random_examples(count: int, vocab: int, seed: int = 0, max_len: int = 62) -> list[Example]:
    rng = np.random.default_rng(seed)
    return [
        Example(
            rng.integers(5, vocab, rng.integers(1, max_len)),
            rng.integers(5, vocab, rng.integers(0, max_len)),
            int(rng.integers(0, 2)),
        )
        for _ in range(count)
    ]


def write(path: Path, examples: list[Example], vocab: int = 8000, chunk: int = 100) -> None:
    with open(path, "wb") as handle:
        write_shard(handle, path.name, "train-000000", examples, vocab, chunk_sequences=chunk)


def test_round_trip_keeps_every_sequence_in_order(tmp_path: Path) -> None:
    examples = random_examples(250, 8000)
    write(tmp_path / "s.tar", examples)
    chunks = read_shard(str(tmp_path / "s.tar"))
    assert [len(chunk) for chunk in chunks] == [100, 100, 50]
    decoded = [chunk.example(i) for chunk in chunks for i in range(len(chunk))]
    for original, back in zip(examples, decoded, strict=True):
        assert np.array_equal(original.tokens_a, back.tokens_a)
        assert np.array_equal(original.tokens_b, back.tokens_b)
        assert original.label == back.label


def test_stats_match_file_and_bytes_are_deterministic(tmp_path: Path) -> None:
    examples = random_examples(300, 8000)
    for name in ("a.tar", "b.tar"):
        with open(tmp_path / name, "wb") as handle:
            stats = write_shard(handle, name, "train-000000", examples, 8000)
        assert stats.bytes == (tmp_path / name).stat().st_size
        assert stats.samples == 300
        assert stats.tokens == sum(len(e.tokens_a) + len(e.tokens_b) for e in examples)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_webdataset_reads_the_shard(tmp_path: Path) -> None:
    examples = random_examples(120, 8000)
    write(tmp_path / "s.tar", examples, chunk=50)
    samples = list(wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == [f"train-000000-00000{i}" for i in range(3)]
    chunk = chunk_from_sample(samples[2])
    assert chunk.tokens.dtype == np.uint16 and len(chunk) == 20
    assert np.array_equal(chunk.example(19).tokens_a, examples[-1].tokens_a)


def test_full_length_sequences_cost_about_two_bytes_per_token(tmp_path: Path) -> None:
    # 125 content tokens = seq_len 128 minus [CLS] and two [SEP]; the default chunk size.
    rng = np.random.default_rng(1)
    examples = [Example(rng.integers(5, 30000, 60), rng.integers(5, 30000, 65), 0) for _ in range(20000)]
    with open(tmp_path / "s.tar", "wb") as handle:
        stats = write_shard(handle, "s.tar", "train-000000", examples, 30000)
    assert stats.bytes / stats.tokens < 2.1


def test_large_vocabularies_use_uint32() -> None:
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_truncated_shard_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "s.tar", random_examples(250, 8000))
    data = (tmp_path / "s.tar").read_bytes()
    with pytest.raises(tarfile.ReadError):
        list(iter_chunks(io.BytesIO(data[: len(data) // 2]), "s.tar"))


def test_manifest_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no manifest at .*manifest.json"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"format": FORMAT_NAME}))
    with pytest.raises(ManifestError, match="lacks keys"):
        read_manifest(str(tmp_path))


@pytest.mark.parametrize(
    "path",
    ["/etc/passwd", "../x.tar", "a/../../x.tar", "./x.tar", "a//x.tar", "x.tar/", "-rf.tar", "a/-x.tar",
     "x.tar; touch y", "$(id).tar", "x\n.tar", ""],
)
def test_manifest_paths_must_stay_plain_and_inside_the_data(tmp_path: Path, path: str) -> None:
    shard = {"path": path, "samples": 1, "bytes": 10, "sha256": None}
    manifest = {
        "format": FORMAT_NAME, "splits": {"train": {"samples": 1, "shards": [shard]}},
        "tokenizer": {"path": "tokenizer/spm.model"}, "seq_len": 8, "objective": "none", "seed": 0,
        "documents": {},
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"splits\.train\.shards\[0\]\.path"):
        read_manifest(str(tmp_path))
    manifest["splits"]["train"]["shards"][0]["path"] = "sub/train-000000.tar"
    manifest["tokenizer"]["path"] = path
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"tokenizer\.path"):
        read_manifest(str(tmp_path))


def test_pipe_locations_quote_what_is_appended() -> None:
    assert join_location("pipe:cat /data/", "train-000000.tar") == "pipe:cat /data/train-000000.tar"
    assert join_location("pipe:cat /data", "a b; touch x") == "pipe:cat /data/'a b; touch x'"
    assert join_location("/data/", "a b") == "/data/a b"
