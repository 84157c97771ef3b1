"""`pretrain inspect`: manifest summary, decoded examples with framing and labels, bad directories."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from shard_fixtures import make_shard_dir

from launch.cli import main


@pytest.mark.parametrize(
    "objective, labels",
    [("nsp", {"next", "random"}), ("sop", {"in order", "swapped"}), ("none", {"-"})],
)
def test_examples_show_framing_and_labels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], objective: str, labels: set[str]
) -> None:
    root = make_shard_dir(tmp_path, n_train=64, n_val=8, n_shards=2, objective=objective)
    assert main(["inspect", str(root), "--samples", "20"]) == 0
    out = capsys.readouterr().out
    assert f"objective {objective}" in out
    assert re.search(r"train\s+64 samples", out) and re.search(r"val\s+8 samples", out)
    assert "documents: read 72, kept 72, rejected: none" in out
    shown = [line for line in out.splitlines() if re.match(r"\[\d+\] \d+ tokens: ", line)]
    assert len(shown) == 20
    found = set()
    for line in shown:
        body, label = re.search(r"tokens: (.*)  \((\w+): ([\w ]+|-)\)$", line).group(1, 3)
        found.add(label)
        assert body.startswith("[CLS] ") and body.endswith(" [SEP]")
        if objective != "none":
            assert body.count("[SEP]") == 2
    assert found == labels


def test_summary_shows_rejects_and_val_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_shard_dir(tmp_path, n_train=16, n_val=8, n_shards=1)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["documents"] = {"read": 30, "kept": 24, "rejected": {"duplicate": 2, "too_short": 4}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert main(["inspect", str(root), "--samples", "3", "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "rejected: duplicate 2, too_short 4" in out
    assert "first 3 val examples" in out and "[2] " in out


def test_bad_directories_are_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == 2
    assert "no manifest at" in capsys.readouterr().err
    root = make_shard_dir(tmp_path, n_train=16, n_val=8, n_shards=1)
    (root / "train-000000.tar").write_bytes(b"not a tar file at all" * 30)
    assert main(["inspect", str(root)]) == 2
    assert "train-000000.tar is damaged" in capsys.readouterr().err
    (root / "train-000000.tar").unlink()
    assert main(["inspect", str(root)]) == 2
    assert "train-000000.tar listed in the manifest is missing" in capsys.readouterr().err


def test_image_shards_show_classes_and_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from image_fixtures import write_class_folders

    counts = write_class_folders(tmp_path / "in", per_class=4)
    beam = ["--", "--direct_running_mode=in_memory", "--direct_num_workers=1"]
    argv = ["prepare", "images", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--size", "24"]
    assert main(argv + beam) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "out"), "--samples", "50"]) == 0
    out = capsys.readouterr().out
    total = sum(counts.values())
    assert f"images: read {total}, kept {total}, rejected: none" in out
    shown = [line for line in out.splitlines() if re.match(r"\[\d+\] [0-9a-f]{32}: class \d \(\w+\), ", line)]
    assert len(shown) == total
    assert all("24x24" in line for line in shown)
