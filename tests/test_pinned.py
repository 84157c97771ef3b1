"""Pinned behaviour: the exact bytes `prepare text` and `prepare images` write for a fixed small input,
and the exact per-step losses of short bert-tiny and SimCLR runs trained on those outputs.

These tests go through the `pretrain` command line only, so that any internal re-arrangement of the
code keeps them unchanged. The bert run trains on what `prepare text` wrote: the seam between the
pre-processing job and the trainer (raw text -> shards -> training steps) is covered end to end.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from launch.cli import main

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 600
LOCAL = ["--", "--direct_running_mode=in_memory", "--direct_num_workers=1"]
WORDS = (
    "river stone morning light quiet field early winter garden market small house north road green "
    "paper letter window summer city bright tower open water island school friend music table"
).split()

# sha256 of every file `prepare text` writes for write_text_corpus() and the tokenizer trained on it.
TEXT_OUTPUT = {
    "manifest.json": "b158f8e53c9080360d05bc97677bc3967b26662ea4851e1e3625efaffd3c523f",
    "tokenizer/spm.model": "ab5d58711470406a23c36620ac5bd1cec1fa7cc7b4cca59e6f2598385a3b405f",
    "train-000000.tar": "f91ed04ea54c05782bfde0a895ac97ece0abfbebfef3a8dff1b353a839a23fd3",
    "train-000001.tar": "ad061c5d34f851067d9325a510ca66e49ea8d0b6706ea2d9d470247a9c6e81e9",
    "train-000002.tar": "ebb7caf33b811fc8a02ddd4aaad64cd12b02b5b977c2488bc0e12464ed6ef9c1",
    "train-000003.tar": "c5324922f3b02e33d8f01e8230306a65bfb8c0a2fabbb5c4bdac831f6dd9cec1",
    "train-000004.tar": "08bd430217bcc9441e6500bd1fd60c215e334ade4c64228cce02b711b00e8055",
    "train-000005.tar": "aa75990d0c08768fc38972409f704f51d30dbc69307976543a86967b5f684107",
    "train-000006.tar": "191b72044aba96ec13f4da9ced58e6e419c06c63ba8c309864f928be49dcdd27",
    "train-000007.tar": "79993a42e5df9ba824ea932265b09ad3cb90ddd26b442088206be0be048a1bce",
    "train-000008.tar": "f663eacf64e17d9e655fce1e1e4f5671287074f8558bf265acb2514e4b65fa6e",
    "train-000009.tar": "491246e4dcd34b1c69148690dc63b32cc751d7f1d813aa9ac3589e555210cd24",
    "train-000010.tar": "7a16f164d8219975aa0ab71adee164a0def8f925fed2c24c27953ffd327eea38",
    "train-000011.tar": "9be5f18734950987a4c100633a4c939ff2575730485e6277eeccc9e2081add67",
    "train-000012.tar": "d727009030f8a5eb49103d8304bdb8da0d1088e1ae697490b6fa989d6435e183",
    "train-000013.tar": "989fc8c07328248d1637acbeaa8a8cb39bdb8e4e0d4923773fb3bdb69d2fa3e4",
    "train-000014.tar": "ca50255124277477e46899a6e86f15a0a09cfe223e1cc0d08ed7ef2aa9b2bd9d",
    "train-000015.tar": "4a3abde66e960bb7b6770333e917954c9df693ed8ad8b5cb343af8a79a083f5f",
    "train-000016.tar": "3527c4e3697b955aeec98be40d94b39b8c4849d440c39ccd6e465d396f01e43b",
    "train-000017.tar": "b564a97f4c3db01e49ae30be6a74faeed2765e4313112b57be447024046f63b9",
    "train-000018.tar": "bf504b685e9d9921801e3a6a679db196d64271e7360400ee40d37d7b36ef8c86",
    "train-000019.tar": "840fb5c17cad68d507127bf508d4ead421d0443f51e624a66b56472c754557ee",
    "val-000000.tar": "bef5dcd531d4b23e9c1c4425b4096b419e174b406ce9cfef743639d14d5e2f51",
    "val-000001.tar": "178b0975199f38f46d4d5e503eeda927751329f5a2418c8c3585b6b4310736d2",
}
# sha256 of every file `prepare images` writes for write_image_folders().
IMAGE_OUTPUT = {
    "manifest.json": "a785460557f9784abdb33b0d4e0e433cd472a869b9bfc05be84005f4445df35c",
    "train-000000.tar": "628fd0e2b21740af37e8cfc607582def234b18e60c418592df8088fc87155a92",
    "train-000001.tar": "b3d0e1e4e15e9ffa2d5a87cb76ca2b6c36e08f49c95c778db665948a978b14b5",
    "train-000002.tar": "5700e71f51f5c5117cfb76e0f34eaafcc784d73409c8fd3db36f90a327677cd3",
    "train-000003.tar": "1e6b79f9ec7d4e1f2a94d6b2a4dce43d6c49c6644bf5e51d96b9165047e04a11",
    "train-000004.tar": "d94aefb15da63b11141d0cf140255c30b5f9e2b15795d905991d7f378a461cee",
    "train-000005.tar": "adb726acbbde439277383e13ae6ec9298ed075c0cba9ac90f49de39399c32f52",
    "train-000006.tar": "b28fc0713535828c7de2b4d60ac4c15e63feb4c7c44401174701a909747fec35",
    "train-000007.tar": "b3c7b4ff426a403e8ff8bde71de44c87c29a4c8c7b905048e60b4792b5bf3590",
    "train-000008.tar": "eabacad133e49b56cf5f798277c433322a46f97a2236aaad71beb11d83228abb",
    "val-000000.tar": "e8d25a072b178b0906a4807995c3c437f304434e2b09f1e00896d52c5d63bf8d",
    "val-000001.tar": "eb4a5f525136842bb02a6337388e920eac7e2f4a5c2cb4e55cd0b7a41dc5b0b1",
    "val-000002.tar": "129b57cad3b62f3dd4422b83c2c0eb3837a19de877c230f068bae12033c3e95f",
    "val-000003.tar": "847853eb08fb850c1e062c2be0919dc2677a14bb1c0a3b75db2c49a305fa8840",
    "val-000004.tar": "4cc9056e27a92c0123b2ece20d9bcb387cfebdf017d666cd6f386424693d5bcd",
}
# Per-step losses of the pinned 20-step bert-tiny run and 6-step SimCLR run.
BERT_LOSSES: dict[int, float] = {
    1: 6.495030403137207,
    2: 6.535846710205078,
    3: 6.543227434158325,
    4: 6.44211745262146,
    5: 6.312145233154297,
    6: 6.176700115203857,
    7: 6.130817890167236,
    8: 5.844022274017334,
    9: 5.739578723907471,
    10: 5.6169233322143555,
    11: 5.386719465255737,
    12: 5.3533830642700195,
    13: 5.3133814334869385,
    14: 5.171881914138794,
    15: 5.0799267292022705,
    16: 5.0002264976501465,
    17: 4.89831805229187,
    18: 4.887695074081421,
    19: 4.848339557647705,
    20: 4.837909936904907,
}
SIMCLR_LOSSES: dict[int, float] = {
    1: 1.795812964439392,
    2: 1.8116503357887268,
    3: 2.015145719051361,
    4: 1.9610941410064697,
    5: 1.8729575872421265,
    6: 1.9996191263198853,
}


def write_text_corpus(directory: Path) -> None:
    rng = np.random.default_rng(7)
    directory.mkdir(parents=True)
    documents = []
    for _ in range(240):
        sentences = [
            " ".join(rng.choice(WORDS, int(rng.integers(4, 12)))).capitalize() + f" {rng.integers(0, 99)}."
            for _ in range(int(rng.integers(6, 14)))
        ]
        documents.append(" ".join(sentences))
    (directory / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents[:160]))
    for index, text in enumerate(documents[160:]):
        (directory / f"doc{index:03d}.txt").write_text(text)


def write_image_folders(directory: Path) -> None:
    rng = np.random.default_rng(3)
    for label in ("disc", "box"):
        (directory / label).mkdir(parents=True)
        for index in range(24):
            image = Image.new("RGB", (40, 36), tuple(int(v) for v in rng.integers(0, 80, 3)))
            draw = ImageDraw.Draw(image)
            left, top = (int(v) for v in rng.integers(0, 12, 2))
            shape = (left, top, left + 20, top + 18)
            fill = tuple(int(v) for v in rng.integers(150, 255, 3))
            (draw.ellipse if label == "disc" else draw.rectangle)(shape, fill=fill)
            image.save(directory / label / f"{index:02d}.png")


def digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def train(config: str, data: Path, run_dir: Path, sets: list[str]) -> dict[int, float]:
    command = [sys.executable, "-m", "launch.cli", "train", "--config", config, "--data", str(data),
               "--run-dir", str(run_dir), "--log-every", "1"]
    for item in sets:
        command += ["--set", item]
    done = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S, check=False)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


@pytest.fixture(scope="module")
def text_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pinned-text")
    write_text_corpus(root / "corpus")
    previous = os.getcwd()
    os.chdir(root)  # relative paths: the manifest records the inputs as given
    try:
        assert main(["tokenizer", "corpus", "--out", "tok", "--vocab-size", "320"]) == 0
        assert main(["prepare", "text", "corpus", "--tokenizer", "tok", "--output", "shards",
                     "--seq-len", "48", "--val-fraction", "0.1", "--shard-mb", "0.01", *LOCAL]) == 0
    finally:
        os.chdir(previous)
    return root / "shards"


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pinned-images")
    write_image_folders(root / "folders")
    previous = os.getcwd()
    os.chdir(root)
    try:
        assert main(["prepare", "images", "folders", "--output", "shards", "--size", "32",
                     "--val-fraction", "0.25", "--shard-mb", "0.01", *LOCAL]) == 0
    finally:
        os.chdir(previous)
    return root / "shards"


def test_prepare_text_output_bytes_are_pinned(text_shards: Path) -> None:
    assert digests(text_shards) == TEXT_OUTPUT


def test_prepare_images_output_bytes_are_pinned(image_shards: Path) -> None:
    assert digests(image_shards) == IMAGE_OUTPUT


@pytest.mark.slow
def test_bert_tiny_losses_on_prepared_text_are_pinned(text_shards: Path, tmp_path: Path) -> None:
    sets = ["train.total_steps=20", "train.val_every=10", "train.val_batches=2", "train.save_every=10",
            "deepspeed.train_batch_size=16", "deepspeed.train_micro_batch_size_per_gpu=8",
            "deepspeed.scheduler.params.warmup_num_steps=5", "data.num_workers=0"]
    found = train("configs/bert-tiny.yaml", text_shards, tmp_path / "run", sets)
    assert sorted(found) == list(range(1, 21))
    assert found == pytest.approx(BERT_LOSSES, abs=1e-6)


@pytest.mark.slow
def test_simclr_losses_on_prepared_images_are_pinned(image_shards: Path, tmp_path: Path) -> None:
    sets = ["train.total_steps=6", "train.val_every=0", "train.save_every=3", "data.num_workers=0",
            "deepspeed.train_batch_size=8", "deepspeed.train_micro_batch_size_per_gpu=4",
            "deepspeed.scheduler.params.warmup_num_steps=2"]
    found = train("configs/simclr-tiny.yaml", image_shards, tmp_path / "run", sets)
    assert sorted(found) == list(range(1, 7))
    assert found == pytest.approx(SIMCLR_LOSSES, abs=1e-6)
