"""End to end `prepare text` on the real DirectRunner over a small mixed corpus, plus its stage helpers."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from apache_beam.testing.util import assert_that, equal_to
from fixtures_text import WORDS

from data_pipeline import beam_common
from data_pipeline.command_common import beam_arguments, recorded_options
from data_pipeline.errors import UserError
from data_pipeline.formats.location import file_sha256
from data_pipeline.formats.manifest import FORMAT_NAME, SPLITS, read_manifest
from data_pipeline.formats.text import SEP_ID, chunk_from_sample, read_shard, special_token_count
from data_pipeline.inputs import expand_inputs
from data_pipeline.rejects import reject_lines
from data_pipeline.text import pipeline, reading
from data_pipeline.text.readers import ReaderOptions
from data_pipeline.text.tokenizer import load_processor, special_ids, train_sentencepiece, trainer_options
from launch.cli import main

SEQ_LEN = 64
IN_MEMORY = ["--", "--direct_running_mode=in_memory", "--direct_num_workers=1"]


def document(rng: np.random.Generator) -> str:
    sentences = [
        " ".join(rng.choice(WORDS, int(rng.integers(4, 14)))).capitalize() + f" {rng.integers(0, 999)}."
        for _ in range(int(rng.integers(8, 16)))
    ]
    return " ".join(sentences)


def write_corpus(directory: Path, seed: int = 0) -> dict[str, int]:
    """txt, jsonl, jsonl.gz and parquet inputs with known bad records; returns the expected rejects."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    for i in range(3):
        (directory / f"story{i}.txt").write_text(document(rng), encoding="utf-8")
    duplicate = document(rng)
    lines = [json.dumps({"text": document(rng)}) for _ in range(60)]
    lines += ["{not json", json.dumps({"text": "Too short."}), json.dumps({"text": duplicate})]
    (directory / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with gzip.open(directory / "b.jsonl.gz", "wt", encoding="utf-8") as handle:
        for _ in range(60):
            handle.write(json.dumps({"text": document(rng)}) + "\n")
        handle.write(json.dumps({"text": duplicate}) + "\n")
    pq.write_table(pa.table({"text": [document(rng) for _ in range(60)]}), directory / "c.parquet")
    with open(directory / "d.jsonl", "wb") as handle:
        handle.write(b'{"text": "caf\xe9 is latin-1, not UTF-8 ' + b"x" * 300 + b'"}\n')
        handle.write(json.dumps({"text": document(rng)}).encode() + b"\n")
    return {"malformed_json": 1, "too_short": 1, "duplicate": 1, "invalid_utf8": 1}


def train_tokenizer(corpus: Path, out: Path) -> Path:
    rng = np.random.default_rng(1)
    sentences = corpus.parent / "tokenizer-sentences.txt"
    sentences.write_text("\n".join(document(rng) for _ in range(300)), encoding="utf-8")
    return Path(train_sentencepiece(str(sentences), str(out), trainer_options(320, num_threads=1)))


def prepare(corpus: Path, model: Path, output: Path, *extra: str) -> int:
    args = ["prepare", "text", str(corpus / "*"), "--tokenizer", str(model.parent), "--output", str(output)]
    args += ["--seq-len", str(SEQ_LEN), "--val-fraction", "0.1", "--shard-mb", "0.02", *extra]
    return main(args)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One corpus prepared twice: multi-process DirectRunner with 1 and with 2 workers."""
    root = tmp_path_factory.mktemp("prepare")
    expected_rejects = write_corpus(root / "corpus")
    model = train_tokenizer(root / "corpus", root / "tok")
    for workers in (1, 2):
        assert (
            prepare(root / "corpus", model, root / f"out{workers}", "--", f"--direct_num_workers={workers}")
            == 0
        )
    return {"root": root, "model": model, "rejects": expected_rejects, "out": root / "out2"}


def test_manifest_fields_and_sums(prepared: dict[str, object]) -> None:
    out = prepared["out"]
    manifest = read_manifest(str(out))
    assert manifest["format"] == FORMAT_NAME
    assert (manifest["seq_len"], manifest["objective"], manifest["seed"]) == (SEQ_LEN, "nsp", 12345)
    documents = manifest["documents"]
    assert documents["rejected"] == prepared["rejects"]
    assert (
        documents["read"] == 3 + 63 + 61 + 60 + 2 == documents["kept"] + sum(documents["rejected"].values())
    )
    for split in SPLITS:
        entry = manifest["splits"][split]
        assert entry["samples"] == sum(s["samples"] for s in entry["shards"]) > 0
        assert (
            entry["tokens"]
            == sum(s["tokens"] for s in entry["shards"])
            == manifest["tokens_per_split"][split]
        )
        for shard in entry["shards"]:
            assert shard["path"].startswith(f"{split}-") and not shard["path"].startswith("/")
            assert file_sha256(str(out / shard["path"])) == shard["sha256"]
            assert (out / shard["path"]).stat().st_size == shard["bytes"]
    assert len(manifest["splits"]["train"]["shards"]) > 1
    tokenizer = manifest["tokenizer"]
    assert tokenizer["sha256"] == hashlib.sha256(prepared["model"].read_bytes()).hexdigest()
    assert (out / tokenizer["path"]).read_bytes() == prepared["model"].read_bytes()
    assert tokenizer["special_ids"] == special_ids(load_processor(str(prepared["model"])))
    assert manifest["options"]["inputs"] == [str(prepared["root"] / "corpus" / "*")]
    assert "--runner=DirectRunner" in manifest["options"]["beam"]
    assert 2.0 <= manifest["bytes_per_token"] < 4.0


def test_rejects_written_per_reason(prepared: dict[str, object]) -> None:
    out = prepared["out"]
    files = sorted(path.stem for path in (out / "rejects").glob("*.jsonl"))
    assert files == sorted(prepared["rejects"])
    malformed = [
        json.loads(line) for line in (out / "rejects" / "malformed_json.jsonl").read_text().splitlines()
    ]
    assert malformed == [
        {"source": str(prepared["root"] / "corpus" / "a.jsonl"), "offset": 60, "payload": "{not json"}
    ]
    duplicate = json.loads((out / "rejects" / "duplicate.jsonl").read_text())
    assert duplicate["source"].endswith("b.jsonl.gz") and duplicate["payload"].endswith("a.jsonl:62")
    invalid = json.loads((out / "rejects" / "invalid_utf8.jsonl").read_text())
    assert invalid["offset"] == 0 and "caf" in invalid["payload"]


def test_every_shard_reads_with_webdataset(prepared: dict[str, object]) -> None:
    out = prepared["out"]
    manifest = read_manifest(str(out))
    labels = []
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            samples = 0
            for sample in wds.WebDataset(str(out / shard["path"]), shardshuffle=False).decode():
                chunk = chunk_from_sample(sample)
                samples += len(chunk)
                for i in range(len(chunk)):
                    example = chunk.example(i)
                    framed = (
                        len(example.tokens_a)
                        + len(example.tokens_b)
                        + special_token_count(len(example.tokens_b))
                    )
                    assert framed <= SEQ_LEN and len(example.tokens_b) > 0
                    assert example.tokens_a.min() >= 5 and example.tokens_b.min() >= 5  # no special inside
                    labels.append(example.label)
            assert samples == shard["samples"]
    assert 0.35 < np.mean(labels) < 0.65


def test_byte_identical_at_one_and_two_workers(prepared: dict[str, object]) -> None:
    root = prepared["root"]

    def digests(directory: Path) -> dict[str, str]:
        return {
            str(path.relative_to(directory)): file_sha256(str(path))
            for path in sorted(directory.rglob("*"))
            if path.is_file()
        }

    one, two = digests(root / "out1"), digests(root / "out2")
    assert one == two
    assert "manifest.json" in one and any(name.startswith("train-") for name in one)


def test_no_readable_document_is_an_error(tmp_path: Path, prepared: dict[str, object], capsys) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bad.jsonl").write_text("{broken\n[1, 2]\n")
    assert prepare(tmp_path / "in", prepared["model"], tmp_path / "out", *IN_MEMORY) == 2
    err = capsys.readouterr().err
    assert "no document kept" in err and "malformed_json" in err and "missing_field" in err
    assert (tmp_path / "out" / "rejects" / "malformed_json.jsonl").is_file()


def test_strict_fails_on_rejects(tmp_path: Path, prepared: dict[str, object], capsys) -> None:
    corpus = prepared["root"] / "corpus"
    assert prepare(corpus, prepared["model"], tmp_path / "out", "--strict", *IN_MEMORY) == 1
    assert "--strict: 4 records rejected" in capsys.readouterr().err


def test_user_errors_before_the_job(tmp_path: Path, prepared: dict[str, object], capsys) -> None:
    assert prepare(tmp_path / "missing", prepared["model"], tmp_path / "out") == 2
    assert "matches no file" in capsys.readouterr().err
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.md").write_text("text")
    assert prepare(tmp_path / "in", prepared["model"], tmp_path / "out") == 2
    assert "notes.md: cannot tell the input format" in capsys.readouterr().err
    (tmp_path / "in" / "notes.md").unlink()
    (tmp_path / "in" / "a.txt").write_text("text")
    args = [
        "prepare",
        "text",
        str(tmp_path / "in"),
        "--tokenizer",
        str(tmp_path),
        "--output",
        str(tmp_path / "o"),
    ]
    assert main(args) == 2
    assert "no SentencePiece model" in capsys.readouterr().err
    assert main([*args[:-2], "--tokenizer", str(prepared["model"]), "--output", "x", "--seq-len", "4"]) == 2
    assert "--seq-len 4" in capsys.readouterr().err


def test_beam_arguments_defaults_and_overrides() -> None:
    assert beam_arguments([], 8) == [
        "--runner=DirectRunner",
        "--direct_running_mode=multi_processing",
        "--direct_num_workers=8",
        "--default_sdk_harness_log_level=WARNING",
    ]
    assert "--direct_num_workers=3" in beam_arguments(["--direct_num_workers=3"], 8)
    assert "--direct_num_workers=8" not in beam_arguments(["--direct_num_workers=3"], 8)
    assert beam_arguments(["--runner=DataflowRunner", "--project=p"], 8) == [
        "--runner=DataflowRunner",
        "--project=p",
    ]


def test_read_and_clean_composites(tmp_path: Path) -> None:
    good = "First sentence here. Second one follows.  "
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"text": good}) + "\n" + json.dumps({"text": "tiny"}) + "\n{x\n"
    )
    path = str(tmp_path / "a.jsonl")
    config = pipeline.JobConfig(str(tmp_path), b"", 320, ReaderOptions(), 10, None, 1, 0, 0.0, 1.0)
    with beam_common.make_pipeline(["--direct_running_mode=in_memory"])[0] as p:
        read = p | reading.ReadDocuments([path], ReaderOptions())
        assert_that(read.documents, equal_to([(path, 0, good), (path, 1, "tiny")]), label="documents")
        assert_that(read[beam_common.REJECTS], equal_to([("malformed_json", path, 2, "{x")]), label="rejects")
        assert_that(read[beam_common.COUNT], equal_to([3]), label="count")
        cleaned = read.documents | pipeline.CleanDocuments(config.min_doc_chars)
        assert_that(cleaned[beam_common.REJECTS], equal_to([("too_short", path, 1, "tiny")]), label="short")
        assert_that(cleaned.clean | beam.Map(lambda r: r[3]), equal_to([good.strip()]), label="clean")


@pytest.mark.parametrize("objective, seq_len", [("sop", SEQ_LEN), ("none", 256)])
def test_other_objectives_end_to_end(
    tmp_path: Path, prepared: dict[str, object], objective: str, seq_len: int
) -> None:
    corpus = prepared["root"] / "corpus"
    extra = ["--objective", objective, "--seq-len", str(seq_len)]  # the later --seq-len wins
    assert prepare(corpus, prepared["model"], tmp_path, *extra, *IN_MEMORY) == 0
    manifest = read_manifest(str(tmp_path))
    assert manifest["objective"] == objective
    labels, separators = [], 0
    for shard in manifest["splits"]["train"]["shards"]:
        for chunk in read_shard(str(tmp_path / shard["path"])):
            for i in range(len(chunk)):
                example = chunk.example(i)
                content = len(example.tokens_a) + len(example.tokens_b)
                assert content + special_token_count(len(example.tokens_b)) <= seq_len
                assert (len(example.tokens_b) == 0) == (objective == "none")
                labels.append(example.label)
                separators += int((example.tokens_a == SEP_ID).sum())
    if objective == "sop":
        assert 0.35 < np.mean(labels) < 0.65
    else:
        assert set(labels) == {0} and separators > 0  # packed sequences cross documents


def test_reject_lines_are_sorted_json() -> None:
    lines = reject_lines([("b", 2, "x"), ("a", None, "y"), ("a", 3, "z")])
    assert [json.loads(line)["source"] for line in lines] == ["a", "a", "b"]
    assert json.loads(lines[0]) == {"source": "a", "offset": None, "payload": "y"}


def test_recorded_options_leave_out_execution_only_settings() -> None:
    import argparse

    args = argparse.Namespace(inputs=["x"], output="/tmp/o", passthrough=["--direct_num_workers=2"], seed=1)
    options = recorded_options(args, ["--runner=DirectRunner", "--direct_num_workers=2", "--project=p"])
    assert options == {"inputs": ["x"], "seed": 1, "beam": ["--runner=DirectRunner", "--project=p"]}


def test_expand_inputs_dirs_globs_and_errors(tmp_path: Path) -> None:
    for name in ("b.txt", "a.jsonl", "sub/c.txt", ".hidden", "_SUCCESS"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    found = [f.path for f in expand_inputs([str(tmp_path), str(tmp_path / "*.txt")])]
    assert found == sorted(str(tmp_path / name) for name in ("a.jsonl", "b.txt", "sub/c.txt"))
    with pytest.raises(UserError, match=r"input .*missing\.txt: no such file"):
        expand_inputs([str(tmp_path / "missing.txt")])
    with pytest.raises(UserError, match=r"input .*\*\.parquet: matches no file"):
        expand_inputs([str(tmp_path / "*.parquet")])
    with pytest.raises(UserError, match="input nosuchscheme://x"):
        expand_inputs(["nosuchscheme://x/*.txt"])
