"""`pretrain prepare images`: pure image functions, then the Beam job end to end through the CLI."""

from __future__ import annotations

import glob
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from image_fixtures import (
    SHAPES,
    bad_images,
    image_bytes,
    odd_but_valid_images,
    shape_image,
    write_class_folders,
    write_flat_folder,
    write_image_parquet,
    write_mixed_class_folders,
)
from PIL import Image

from data_pipeline.formats.images import sample_key, write_image_shard
from data_pipeline.formats.location import file_sha256
from data_pipeline.formats.manifest import IMAGE_FORMAT_NAME, ManifestError, read_manifest
from data_pipeline.images import decode as im
from data_pipeline.images import sources
from data_pipeline.rejects import Reject
from launch.cli import main

SIZE = 32
OPTIONS = im.ImageOptions(size=SIZE, quality=90, min_size=16)
IN_MEMORY = ["--", "--direct_running_mode=in_memory", "--direct_num_workers=1"]


def prepare(inputs: list[Path], output: Path, *extra: str) -> int:
    args = ["prepare", "images", *map(str, inputs), "--output", str(output), "--size", str(SIZE)]
    return main(args + ["--val-fraction", "0.25", "--shard-mb", "0.02", *extra])


def decoded(jpeg: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(jpeg))
    assert image.format == "JPEG" and image.mode == "RGB"
    return image


def read_samples(directory: Path) -> list[dict[str, object]]:
    shards = sorted(glob.glob(str(directory / "*.tar")))
    return list(wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode("rgb8"))


# ------------------------------------------------------------------------------------ pure functions


@pytest.mark.parametrize("name", sorted(odd_but_valid_images()))
def test_odd_images_become_rgb_jpegs(name: str) -> None:
    data = odd_but_valid_images()[name]
    first, second = im.process_image(data, OPTIONS), im.process_image(data, OPTIONS)
    assert isinstance(first, bytes) and first == second  # deterministic re-encoding
    assert min(decoded(first).size) == SIZE


@pytest.mark.parametrize("name", sorted(bad_images()))
def test_bad_images_are_rejected_by_reason(name: str) -> None:
    data, reason = bad_images()[name]
    result = im.process_image(data, OPTIONS)
    assert isinstance(result, im.DecodeFailure) and result.reason == reason
    assert result.detail


def test_exif_orientation_is_applied() -> None:
    rotated = im.process_image(odd_but_valid_images()["rotated.jpg"], OPTIONS)
    assert isinstance(rotated, bytes)
    # Stored 64x40 with orientation 6 (90 degrees): upright it is 40 wide, 64 high -> 32 x 51.
    assert decoded(rotated).size == (32, 51)


def test_alpha_composited_over_white_and_16_bit_scaled() -> None:
    red = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent red
    white = np.asarray(im.to_rgb(red))
    assert (white == 255).all()
    ramp = Image.fromarray(np.full((20, 20), 65535 // 2, np.uint16))
    assert ramp.mode in im.SIXTEEN_BIT_MODES
    grey = np.asarray(im.to_rgb(ramp))
    assert grey.shape == (20, 20, 3) and abs(int(grey[0, 0, 0]) - 127) <= 1  # scaled, not clipped at 255
    cmyk = im.to_rgb(Image.new("CMYK", (4, 4), (0, 255, 255, 0)))
    assert cmyk.mode == "RGB" and cmyk.getpixel((0, 0)) == (255, 0, 0)


def test_resize_never_upscales_and_hits_the_shorter_side() -> None:
    small = Image.new("RGB", (20, 30))
    assert im.resize_shorter_side(small, SIZE) is small
    assert im.resize_shorter_side(Image.new("RGB", (300, 200)), SIZE).size == (48, 32)
    assert im.resize_shorter_side(Image.new("RGB", (64, 640)), SIZE).size == (32, 320)


def test_large_jpeg_is_drafted_and_still_at_target_size() -> None:
    big = image_bytes(shape_image("circle", np.random.default_rng(0), size=300))
    assert decoded(im.process_image(big, OPTIONS)).size == (SIZE, SIZE)


def test_classes_layout_and_labels() -> None:
    assert sources.class_list(["10", "2", "b", "a", "2"]) == ["2", "10", "a", "b"]
    relative = sources.relative_paths("/d/", ["/d/cat/1.jpg", "/d/dog/x/2.jpg"])
    assert relative == ["cat/1.jpg", "dog/x/2.jpg"]
    assert sources.folder_layout(relative) == "classes"
    assert sources.folder_labels(relative, "classes") == ["cat", "dog"]
    assert sources.folder_layout(["cat/1.jpg", "2.jpg"]) == "flat"
    assert sources.folder_labels(["2.jpg"], "flat") == [None]
    assert sources.label_name(3) == "3" and sources.label_name(b"cat") == "cat"


def test_placement_depends_on_bytes_and_seed_only() -> None:
    digest = im.content_digest(b"image bytes")
    split, key = im.place_image(digest, 1, 0.5)
    assert im.place_image(digest, 1, 0.5) == (split, key)
    assert im.place_image(digest, 2, 0.5)[0] == split and im.place_image(digest, 2, 0.5)[1] != key
    assert im.place_image(digest, 1, 0.0)[0] == "train"
    assert sample_key(digest) == digest.hex() and "." not in sample_key(digest)


def test_keep_first_copies_keeps_the_smallest_source() -> None:
    def kept(source: str, data: bytes) -> im.KeptImage:
        digest = im.content_digest(data)
        return im.KeptImage(im.place_image(digest, 0, 0.0)[1], digest, source, -1, 0, b"j")

    images = [kept("b", b"x"), kept("a", b"x"), kept("c", b"y")]
    first, duplicates = im.keep_first_copies(reversed(images))
    assert sorted(i.source for i in first) == ["a", "c"]
    assert [(d.source, o.source) for d, o in duplicates] == [("b", "a")]
    assert first == sorted(first)


def test_image_shard_is_webdataset_with_fixed_bytes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    records = []
    for index in range(3):
        jpeg = im.process_image(image_bytes(shape_image(SHAPES[index], rng)), OPTIONS)
        digest = im.content_digest(jpeg)
        records.append(im.KeptImage(index, digest, f"s{index}", -1, index if index < 2 else -1, jpeg))
    buffers = [io.BytesIO(), io.BytesIO()]
    stats = [write_image_shard(buffer, "train-000000.tar", records) for buffer in buffers]
    assert buffers[0].getvalue() == buffers[1].getvalue() and stats[0] == stats[1]
    (tmp_path / "train-000000.tar").write_bytes(buffers[0].getvalue())
    assert stats[0]["sha256"] == file_sha256(str(tmp_path / "train-000000.tar"))
    samples = read_samples(tmp_path)
    assert [s["__key__"] for s in samples] == [r.digest.hex() for r in records]
    assert [s.get("cls") for s in samples] == [0, 1, None]
    assert samples[0]["jpg"].shape == (SIZE, SIZE, 3) and samples[0]["jpg"].dtype == np.uint8


def test_parquet_rows_and_struct_cells(tmp_path: Path) -> None:
    write_image_parquet(tmp_path / "a.parquet", count=5)
    with open(tmp_path / "a.parquet", "rb") as handle:
        records = list(sources.iter_parquet_images("a.parquet", handle, "image", "label"))
    reasons = [r.reason if isinstance(r, Reject) else None for r in records]
    assert reasons == ["missing_image", None, None, None, None]
    assert [r.offset for r in records] == [0, 1, 2, 3, 4]
    assert [r.label for r in records[1:]] == ["1", "2", "0", "1"]
    with open(tmp_path / "a.parquet", "rb") as handle:
        missing = list(sources.iter_parquet_images("a.parquet", handle, "pixels", None))
    assert [r.reason for r in missing] == ["missing_column"]
    corrupt = list(sources.iter_parquet_images("x.parquet", io.BytesIO(b"PAR1 garbage"), "image", None))
    assert [r.reason for r in corrupt] == ["corrupt_file"]


# ------------------------------------------------------------------------------------ the Beam job


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Class folders with odd and bad files, prepared with 1 and with 2 multi-process workers."""
    root = tmp_path_factory.mktemp("images")
    expected = write_mixed_class_folders(root / "classes")
    for workers in (1, 2):
        assert (
            prepare([root / "classes"], root / f"out{workers}", "--", f"--direct_num_workers={workers}") == 0
        )
    return {"root": root, "rejects": expected, "out": root / "out2"}


def test_manifest_fields_and_sums(prepared: dict[str, object]) -> None:
    out = prepared["out"]
    manifest = read_manifest(str(out), IMAGE_FORMAT_NAME)
    assert manifest["format"] == IMAGE_FORMAT_NAME and manifest["layout"] == "classes"
    assert manifest["classes"] == list(SHAPES) and manifest["image_size"] == SIZE
    counts = manifest["images"]
    assert counts == manifest["documents"]
    assert counts["rejected"] == prepared["rejects"]
    assert counts["read"] == counts["kept"] + sum(counts["rejected"].values()) == 3 * 6 + 6 + 4 + 1
    total = 0
    for split, entry in manifest["splits"].items():
        shards = entry["shards"]
        assert entry["samples"] == entry["images"] == sum(s["samples"] for s in shards)
        assert entry["bytes"] == sum(s["bytes"] for s in shards)
        for shard in shards:
            assert shard["path"].startswith(f"{split}-")
            assert file_sha256(str(out / shard["path"])) == shard["sha256"]
        total += entry["samples"]
    assert total == counts["kept"] and manifest["splits"]["val"]["samples"] > 0


def test_rejects_listed_per_reason(prepared: dict[str, object]) -> None:
    rejects = prepared["out"] / "rejects"
    for reason, count in prepared["rejects"].items():
        lines = [json.loads(line) for line in (rejects / f"{reason}.jsonl").read_text().splitlines()]
        assert len(lines) == count
        assert all(set(line) == {"source", "offset", "payload"} and line["payload"] for line in lines)
    duplicate = json.loads((rejects / "duplicate.jsonl").read_text())
    assert duplicate["source"].endswith("square/copy_of_circle.jpg")
    assert duplicate["payload"].endswith("circle/000.jpg")


def test_shards_decode_with_webdataset_and_labels_match_folders(prepared: dict[str, object]) -> None:
    folders = prepared["root"] / "classes"
    label_of = {}
    for path in sorted(folders.glob("*/*")):
        label_of.setdefault(hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest(), path.parent.name)
    samples = read_samples(prepared["out"])
    assert len(samples) == read_manifest(str(prepared["out"]), None)["images"]["kept"]
    assert len({s["__key__"] for s in samples}) == len(samples)
    for sample in samples:
        image = sample["jpg"]
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert min(image.shape[:2]) == SIZE
        assert SHAPES[sample["cls"]] == label_of[sample["__key__"]]


def test_byte_identical_at_one_and_two_workers(prepared: dict[str, object]) -> None:
    def digests(directory: Path) -> dict[str, str]:
        files = sorted(p for p in directory.rglob("*") if p.is_file())
        return {str(p.relative_to(directory)): file_sha256(str(p)) for p in files}

    one, two = digests(prepared["root"] / "out1"), digests(prepared["root"] / "out2")
    assert one == two and "manifest.json" in one and "rejects/duplicate.jsonl" in one


def test_parquet_and_flat_inputs(tmp_path: Path) -> None:
    write_image_parquet(tmp_path / "pq" / "a.parquet", seed=2)
    write_image_parquet(tmp_path / "pq" / "b.parquet", seed=3, struct_cells=False)
    (tmp_path / "pq" / "c.parquet").write_bytes(b"PAR1 not really parquet")
    assert prepare([tmp_path / "pq" / "*.parquet"], tmp_path / "out", *IN_MEMORY) == 0
    manifest = read_manifest(str(tmp_path / "out"), IMAGE_FORMAT_NAME)
    assert manifest["classes"] == ["0", "1", "2"] and manifest["layout"] == "parquet"
    assert manifest["images"]["rejected"] == {"missing_image": 2, "not_an_image": 2, "corrupt_file": 1}
    assert manifest["images"]["kept"] == 14
    assert {s["cls"] for s in read_samples(tmp_path / "out")} == {0, 1, 2}
    write_flat_folder(tmp_path / "flat", count=5)
    assert prepare([tmp_path / "flat"], tmp_path / "out", *IN_MEMORY) == 0
    manifest = read_manifest(str(tmp_path / "out"), None)
    assert manifest["classes"] == [] and manifest["layout"] == "flat" and manifest["images"]["kept"] == 5
    samples = read_samples(tmp_path / "out")
    assert len(samples) == 5 and all("cls" not in s for s in samples)


def test_user_errors_before_the_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_class_folders(tmp_path / "classes", per_class=1)
    write_flat_folder(tmp_path / "flat", count=1)
    write_image_parquet(tmp_path / "a.parquet", count=3)
    out = tmp_path / "out"
    assert prepare([tmp_path / "classes", tmp_path / "flat"], out, *IN_MEMORY) == 2
    assert "mix labelled and unlabelled" in capsys.readouterr().err
    assert prepare([tmp_path / "a.parquet"], out, "--label-column", "cls", *IN_MEMORY) == 2
    assert "no label column 'cls'" in capsys.readouterr().err
    assert prepare([tmp_path / "flat"], out, "--layout", "classes", *IN_MEMORY) == 2
    assert "lies directly in it" in capsys.readouterr().err
    assert prepare([tmp_path / "flat"], out, "--quality", "100", *IN_MEMORY) == 2
    assert "--quality 100" in capsys.readouterr().err
    assert prepare([tmp_path / "nowhere"], out, *IN_MEMORY) == 2
    assert "no such file" in capsys.readouterr().err


def test_nothing_kept_and_strict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"")
    assert prepare([tmp_path / "bad"], tmp_path / "out", *IN_MEMORY) == 2
    assert "no image kept" in capsys.readouterr().err
    write_flat_folder(tmp_path / "bad", count=2)
    assert prepare([tmp_path / "bad"], tmp_path / "out", "--strict", *IN_MEMORY) == 1
    assert "--strict: 1 records rejected" in capsys.readouterr().err
    assert (tmp_path / "out" / "rejects" / "zero_size.jsonl").exists()


def test_load_manifest_checks_the_expected_format(prepared: dict[str, object]) -> None:
    out = str(prepared["out"])
    with pytest.raises(ManifestError, match="format 'pretrain-images-v1', expected 'pretrain-chunked-v1'"):
        read_manifest(out)
    assert read_manifest(out, None)["format"] == IMAGE_FORMAT_NAME
