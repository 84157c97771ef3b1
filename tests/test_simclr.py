"""SimCLR core: NT-Xent (one and two ranks), LARS, augmentation, model, kNN and the two-view image loader."""

from __future__ import annotations

import io
import json
import math
import os
import socket
import tarfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml
from PIL import Image, ImageEnhance

from data_pipeline.errors import UserError
from data_pipeline.formats.location import file_sha256
from data_pipeline.formats.manifest import IMAGE_FORMAT_NAME
from training.data.loader import StepLoader
from training.simclr import SimCLRConfig, augment_config, build_model, build_optimizer
from training.simclr.augment import (
    AugmentConfig,
    AugmentParams,
    apply_params,
    augment,
    gaussian_blur,
    hsv_to_rgb,
    make_generator,
    rgb_to_hsv,
    sample_params,
    shift_hue,
)
from training.simclr.images import (
    CropConfig,
    decode_crops,
    image_eval_batches,
    image_loader,
    random_resized_crop_box,
)
from training.simclr.knn import knn_accuracy, knn_scores
from training.simclr.lars import LARS, lars_param_groups
from training.simclr.loss import nt_xent
from training.simclr.model import build_simclr

# ---------------------------------------------------------------- NT-Xent


def _paper_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's eq. (1) averaged over all 2N anchors, written with explicit loops."""
    z = F.normalize(torch.cat([z1, z2]), dim=1).double()
    n2 = z.shape[0]
    total = 0.0
    for i in range(n2):
        positive = (i + n2 // 2) % n2
        numerator = math.exp(float(z[i] @ z[positive]) / temperature)
        denominator = sum(math.exp(float(z[i] @ z[k]) / temperature) for k in range(n2) if k != i)
        total += -math.log(numerator / denominator)
    return torch.tensor(total / n2)


def test_nt_xent_matches_the_paper_formula() -> None:
    generator = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 8, generator=generator), torch.randn(5, 8, generator=generator)
    for temperature in (0.1, 0.5):
        output = nt_xent(z1, z2, temperature)
        assert output.loss.item() == pytest.approx(_paper_nt_xent(z1, z2, temperature).item(), rel=1e-5)


def test_nt_xent_accuracy_is_one_for_identical_views() -> None:
    z = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    assert nt_xent(z, z.clone(), 0.1).accuracy.item() == 1.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_rank_worker(rank: int, world: int, port: int, z1: torch.Tensor, z2: torch.Tensor, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        batch = z1.shape[0] // world
        local1 = z1[rank * batch : (rank + 1) * batch].clone().requires_grad_(True)
        local2 = z2[rank * batch : (rank + 1) * batch].clone().requires_grad_(True)
        output = nt_xent(local1, local2, 0.2)
        output.loss.backward()
        torch.save(
            {"loss": output.loss.detach(), "grad1": local1.grad, "grad2": local2.grad},
            f"{out}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_two_ranks_give_the_full_batch_loss_and_gradients(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(6, 8, generator=generator), torch.randn(6, 8, generator=generator)
    full1, full2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    full = nt_xent(full1, full2, 0.2)
    full.loss.backward()
    mp.spawn(_two_rank_worker, args=(2, _free_port(), z1, z2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    # The engine averages the ranks' losses and gradients: that must be the full-batch loss and gradient.
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(full.loss.item(), rel=1e-6)
    grad1 = torch.cat([r["grad1"] for r in ranks]) / 2
    grad2 = torch.cat([r["grad2"] for r in ranks]) / 2
    torch.testing.assert_close(grad1, full1.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad2, full2.grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- LARS


def test_lars_follows_the_published_update_rule() -> None:
    weight = torch.nn.Parameter(torch.tensor([3.0, -4.0]))  # ||w|| = 5
    optimizer = LARS([weight], lr=0.5, momentum=0.9, weight_decay=0.1, trust_coefficient=0.02)
    expected_w, velocity = torch.tensor([3.0, -4.0]), torch.zeros(2)
    for gradient in (torch.tensor([1.0, 2.0]), torch.tensor([-0.5, 0.25])):
        weight.grad = gradient.clone()
        optimizer.step()
        update = gradient + 0.1 * expected_w
        trust = 0.02 * expected_w.norm() / update.norm()
        velocity = 0.9 * velocity + 0.5 * trust * update
        expected_w = expected_w - velocity
        torch.testing.assert_close(weight.detach(), expected_w)


def test_lars_excluded_group_is_plain_momentum_sgd() -> None:
    bias = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    optimizer = LARS([{"params": [bias], "weight_decay": 0.0, "lars_adapt": False}], lr=0.1, momentum=0.9)
    bias.grad = torch.tensor([1.0, -1.0])
    optimizer.step()
    optimizer.step()  # velocity 0.1 then 0.19
    torch.testing.assert_close(bias.detach(), torch.tensor([1.0 - 0.29, 1.0 + 0.29]))


def test_lars_zero_weight_uses_trust_one() -> None:
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = LARS([weight], lr=0.1, momentum=0.0, weight_decay=0.5)
    weight.grad = torch.ones(3)
    optimizer.step()
    torch.testing.assert_close(weight.detach(), torch.full((3,), -0.1))


def test_lars_param_groups_exclude_biases_and_norms() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    adapted, excluded = lars_param_groups(model, weight_decay=1e-6)
    assert [p.shape for p in adapted["params"]] == [(3, 4), (2, 3)]
    assert adapted["weight_decay"] == 1e-6 and adapted["lars_adapt"]
    assert len(excluded["params"]) == 4 and excluded["weight_decay"] == 0.0 and not excluded["lars_adapt"]


def test_lars_rejects_negative_values() -> None:
    with pytest.raises(UserError, match="LARS lr must be >= 0, got -1"):
        LARS([torch.nn.Parameter(torch.zeros(1))], lr=-1)


# ---------------------------------------------------------------- augmentation


def _images(batch: int = 6, size: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def test_augment_shapes_ranges_and_determinism() -> None:
    images = _images()
    config = AugmentConfig(solarize_prob=0.3)
    first = augment(images, config, make_generator("cpu", 7, 3))
    again = augment(images, config, make_generator("cpu", 7, 3))
    other = augment(images, config, make_generator("cpu", 7, 4))
    assert first.shape == images.shape and first.dtype == torch.float32
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)
    mean, std = torch.tensor(config.mean).view(1, 3, 1, 1), torch.tensor(config.std).view(1, 3, 1, 1)
    unit = first * std + mean
    assert unit.min() >= -1e-5 and unit.max() <= 1 + 1e-5


def test_identity_choices_only_normalise() -> None:
    images = _images()
    config = AugmentConfig()
    params = sample_params(6, config, make_generator("cpu", 0))
    params.flip[:] = False
    params.factors[:] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    params.grayscale[:] = False
    params.blur_sigma[:] = 0.0
    out = apply_params(images, params, config)
    expected = (images.float() / 255 - torch.tensor(config.mean).view(1, 3, 1, 1)) / torch.tensor(
        config.std
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_flip_grayscale_and_brightness_per_sample() -> None:
    images = _images(batch=3)
    config = AugmentConfig(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), blur_prob=0.0)
    params = sample_params(3, config, make_generator("cpu", 0))
    params.flip[:] = torch.tensor([True, False, False])
    params.grayscale[:] = torch.tensor([False, True, False])
    params.factors[:] = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0], [0.5, 1.0, 1.0, 0.0]])
    out = apply_params(images, params, config)
    unit = images.float() / 255
    torch.testing.assert_close(out[0], unit[0].flip(-1))
    assert torch.equal(out[1, 0], out[1, 1]) and torch.equal(out[1, 1], out[1, 2])
    torch.testing.assert_close(out[2], unit[2] * 0.5)


def test_batched_augment_equals_one_image_at_a_time() -> None:
    images = _images(batch=5)
    config = AugmentConfig(solarize_prob=0.5)
    params = sample_params(5, config, make_generator("cpu", 11))
    batched = apply_params(images, params, config)
    for row in range(5):
        single = AugmentParams(*(getattr(params, f.name)[row : row + 1] for f in fields(AugmentParams)))
        torch.testing.assert_close(apply_params(images[row : row + 1], single, config)[0], batched[row])


@pytest.mark.parametrize(("op", "enhancer"), [(1, ImageEnhance.Contrast), (2, ImageEnhance.Color)])
def test_contrast_and_saturation_agree_with_pil(op: int, enhancer: type) -> None:
    images = _images(batch=1, size=32, seed=3)
    config = AugmentConfig(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), blur_prob=0.0, grayscale_prob=0.0)
    params = sample_params(1, config, make_generator("cpu", 0))
    params.flip[:] = False
    params.factors[:] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    params.factors[0, op] = 1.6
    ours = (apply_params(images, params, config)[0] * 255).permute(1, 2, 0).numpy()
    pil = np.asarray(
        enhancer(Image.fromarray(images[0].permute(1, 2, 0).numpy())).enhance(1.6), dtype=np.float32
    )
    # PIL rounds its grey reference and each blend to whole levels.
    assert np.abs(ours - pil).max() <= 3.0


def test_hsv_round_trip_and_hue_shift() -> None:
    unit = _images(batch=2).float() / 255
    torch.testing.assert_close(hsv_to_rgb(rgb_to_hsv(unit)), unit, rtol=0, atol=1e-5)
    pure_red = torch.zeros(1, 3, 2, 2)
    pure_red[:, 0] = 1.0
    # A third of a turn takes red to green.
    torch.testing.assert_close(
        shift_hue(pure_red, torch.tensor([1 / 3]))[0, :, 0, 0], torch.tensor([0.0, 1.0, 0.0])
    )


def test_blur_keeps_constant_images_and_smooths_noise() -> None:
    constant = torch.full((2, 3, 16, 16), 0.4)
    torch.testing.assert_close(gaussian_blur(constant, torch.tensor([1.5, 0.0]), 5), constant)
    noise = _images(batch=2, size=16).float() / 255
    blurred = gaussian_blur(noise, torch.tensor([2.0, 0.0]), 5)
    assert blurred[0].std() < noise[0].std()
    torch.testing.assert_close(blurred[1], noise[1])


def test_augment_config_validation_names_the_field() -> None:
    with pytest.raises(UserError, match="augmentation blur_prob must be in"):
        AugmentConfig(blur_prob=1.5).validate()


# ---------------------------------------------------------------- model and kNN


def test_simclr_model_forward_backward() -> None:
    torch.manual_seed(0)
    model = build_simclr(depth=18, cifar_stem=True, projection_dim=16, temperature=0.5)
    view1, view2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    output = model(view1, view2)
    assert output.loss.ndim == 0 and torch.isfinite(output.loss)
    assert 0.0 <= output.accuracy.item() <= 1.0
    output.loss.backward()
    assert model.encoder.conv1.weight.grad is not None
    assert model.projector.layers[0].weight.shape == (512, 512)
    assert model.encode(view1).shape == (4, 512)


def test_knn_scores_match_direct_votes() -> None:
    generator = torch.Generator().manual_seed(3)
    bank, labels = torch.randn(20, 4, generator=generator), torch.randint(0, 3, (20,), generator=generator)
    queries = torch.randn(5, 4, generator=generator)
    scores = knn_scores(queries, bank, labels, 3, k=4, temperature=0.1, chunk_size=2)
    similarity = F.normalize(queries, dim=1) @ F.normalize(bank, dim=1).T
    for row in range(5):
        top = similarity[row].argsort(descending=True)[:4]
        expected = torch.zeros(3)
        for index in top:
            expected[labels[index]] += torch.exp(similarity[row, index] / 0.1)
        torch.testing.assert_close(scores[row], expected)


def test_knn_accuracy_on_separated_clusters() -> None:
    centres = torch.eye(8)[:6] * 10
    generator = torch.Generator().manual_seed(4)
    bank_labels = torch.arange(60) % 6
    bank = centres[bank_labels] + torch.randn(60, 8, generator=generator)
    query_labels = torch.arange(12) % 6
    queries = centres[query_labels] + torch.randn(12, 8, generator=generator)
    result = knn_accuracy(queries, query_labels, bank, bank_labels, 6, k=5)
    assert result == {"knn_top1": 1.0, "knn_top5": 1.0}


@pytest.mark.parametrize("recipe", ["tiny", "resnet18", "resnet50"])
def test_recipe_sections_are_valid(recipe: str) -> None:
    raw = yaml.safe_load((Path(__file__).parents[1] / f"configs/simclr-{recipe}.yaml").read_text())
    SimCLRConfig(**raw["simclr"]).validate()
    assert raw["deepspeed"]["zero_optimization"]["stage"] == 0 and "optimizer" not in raw["deepspeed"]


def test_config_factories_build_model_and_lars() -> None:
    config = SimCLRConfig(depth=18, cifar_stem=True, projection_dim=32, weight_decay=1e-4)
    model = build_model(config)
    optimizer = build_optimizer(model, config)
    assert isinstance(optimizer, LARS) and optimizer.param_groups[0]["weight_decay"] == 1e-4
    assert model.projector.layers[3].out_features == 32
    assert augment_config(config).strength == 1.0
    with pytest.raises(UserError, match="simclr.temperature: expected a value > 0, got 0"):
        SimCLRConfig(temperature=0).validate()


# ---------------------------------------------------------------- image loader

CLASSES = ["circle", "square", "stripe"]


def _jpeg(rng: np.random.Generator, label: int, width: int, height: int) -> bytes:
    """A photo-like JPEG: the class's colour channel, a smooth random pattern and a little noise."""
    pattern = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((width, height))
    pixels = np.asarray(pattern, dtype=np.float32) * 0.5 + rng.normal(0, 8, (height, width, 3))
    pixels[..., label] += 100
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _write_tar(path: Path, samples: list[tuple[str, bytes, int]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, data, label in samples:
            for name, payload in ((f"{key}.jpg", data), (f"{key}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def write_image_dir(
    root: Path,
    counts: dict[str, list[int]],
    seed: int = 0,
    size: tuple[int, int] = (48, 40),
    large_every: int = 7,
) -> Path:
    """Shards of the ``pretrain-images-v1`` format: one list of per-shard sample counts per split.

    Images are ``size`` (width, height); every ``large_every``-th is 200 x 160 instead, large enough
    for a reduced-scale JPEG decode (0: none).
    """
    rng = np.random.default_rng(seed)
    splits: dict[str, Any] = {}
    for split, shard_counts in counts.items():
        shards = []
        for number, count in enumerate(shard_counts):
            samples = []
            for index in range(count):
                label = int(rng.integers(0, len(CLASSES)))
                width, height = (200, 160) if large_every and index % large_every == 0 else size
                samples.append((f"{split}-{number:02d}-{index:04d}", _jpeg(rng, label, width, height), label))
            path = root / f"{split}-{number:06d}.tar"
            _write_tar(path, samples)
            shards.append(
                {
                    "path": path.name,
                    "samples": count,
                    "bytes": path.stat().st_size,
                    "sha256": file_sha256(path),
                }
            )
        splits[split] = {"samples": sum(shard_counts), "shards": shards}
    images = {"read": sum(sum(c) for c in counts.values()), "rejected": {}}
    images["kept"] = images["read"]
    manifest = {
        "format": IMAGE_FORMAT_NAME,
        "splits": splits,
        "classes": CLASSES,
        "image_size": max(size),
        "seed": seed,
        "images": images,
        "documents": images,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_dir(tmp_path_factory.mktemp("images"), {"train": [23, 17], "val": [9]})


def _loader(image_dir: Path, **overrides: Any) -> StepLoader:
    options: dict[str, Any] = {
        "global_batch_size": 8,
        "micro_batch_size": 2,
        "image_size": 16,
        "seed": 5,
        "num_workers": 0,
    }
    options.update(overrides)
    return image_loader(str(image_dir), **options)


def _take_steps(loader: StepLoader, steps: int) -> list[dict[str, Any]]:
    batches, stream = [], iter(loader)
    for _ in range(steps):
        batches += [next(stream) for _ in range(loader.grad_accum)]
        loader.step_done()
    return batches


def test_loader_gives_uint8_two_view_batches(image_dir: Path) -> None:
    loader = _loader(image_dir)
    assert loader.steps_per_epoch == 5 and loader.grad_accum == 4 and loader.source.classes == CLASSES
    batch = next(iter(loader))
    assert batch["view1"].shape == batch["view2"].shape == (2, 3, 16, 16)
    assert batch["view1"].dtype == torch.uint8 and batch["labels"].dtype == torch.int64
    assert set(batch["labels"].tolist()) <= {0, 1, 2}
    assert not torch.equal(batch["view1"], batch["view2"])


@pytest.mark.parametrize("world_size", [1, 2])
def test_ranks_get_equal_disjoint_batches(image_dir: Path, world_size: int) -> None:
    per_rank = [
        _take_steps(_loader(image_dir, rank=rank, world_size=world_size), 5) for rank in range(world_size)
    ]
    assert len({len(batches) for batches in per_rank}) == 1
    ids = [sample for batches in per_rank for batch in batches for sample in batch["sample_ids"]]
    assert len(ids) == len(set(ids)) == 40  # 5 steps x 8: all of the 40 train images once


@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 0), (2, 2)])
def test_resume_gives_identical_next_batches(image_dir: Path, world_size: int, num_workers: int) -> None:
    def run(rank: int, resume_from: dict[str, Any] | None) -> list[dict[str, Any]]:
        loader = _loader(image_dir, rank=rank, world_size=world_size, num_workers=num_workers)
        if resume_from is None:
            return _take_steps(loader, 7)  # crosses into the second epoch
        loader.load_state_dict(resume_from)
        return _take_steps(loader, 4)

    saved = _loader(image_dir, world_size=world_size)
    _take_steps(saved, 3)
    state = json.loads(json.dumps(saved.state_dict()))
    for rank in range(world_size):
        resumed = run(rank, state)
        straight = run(rank, None)[-len(resumed) :]
        assert len(resumed) == 4 * _loader(image_dir, world_size=world_size).grad_accum
        for left, right in zip(straight, resumed):
            assert left["sample_ids"] == right["sample_ids"]
            assert torch.equal(left["view1"], right["view1"]) and torch.equal(left["view2"], right["view2"])


def test_crops_do_not_depend_on_world_size(image_dir: Path) -> None:
    single = {
        sample: view
        for batch in _take_steps(_loader(image_dir), 2)
        for sample, view in zip(batch["sample_ids"], batch["view1"])
    }
    for rank in range(2):
        for batch in _take_steps(_loader(image_dir, rank=rank, world_size=2), 2):
            for sample, view in zip(batch["sample_ids"], batch["view1"]):
                assert torch.equal(single[sample], view)


def test_eval_batches_cover_equal_slices(image_dir: Path) -> None:
    slices = [
        list(image_eval_batches(str(image_dir), micro_batch_size=3, image_size=16, rank=r, world_size=2))
        for r in range(2)
    ]
    assert [sum(len(b["labels"]) for b in batches) for batches in slices] == [4, 4]
    assert slices[0][0]["images"].shape == (3, 3, 16, 16) and slices[0][0]["images"].dtype == torch.uint8


def test_reduced_scale_decode_matches_full_decode_closely() -> None:
    rng = np.random.default_rng(0)
    data = _jpeg(rng, 1, 400, 320)

    def whole(width: int, height: int) -> list[tuple[float, float, float, float]]:
        return [(0.0, 0.0, float(width), float(height))]

    reduced = decode_crops(data, whole, 32, "test.jpg")[0].astype(np.int16)  # drafted at 1/8 scale
    with Image.open(io.BytesIO(data)) as image:
        full = np.asarray(image.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)).astype(np.int16)
    assert reduced.shape == (32, 32, 3)
    assert np.abs(reduced - full).mean() < 4


def test_random_resized_crop_box_stays_inside_and_in_range() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = random_resized_crop_box(rng, 60, 40, CropConfig())
        assert 0 <= left < right <= 60 and 0 <= top < bottom <= 40
        assert (right - left) * (bottom - top) <= 60 * 40


def test_corrupt_image_is_a_user_error_naming_the_sample(tmp_path: Path) -> None:
    write_image_dir(tmp_path, {"train": [8]})
    samples = [(f"bad-{i:02d}", b"not a jpeg", 0) for i in range(8)]
    shard = tmp_path / "train-000000.tar"
    _write_tar(shard, samples)
    # The manifest describes the shard as written (its size and sha256 pass the shard checks).
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0].update(bytes=shard.stat().st_size, sha256=file_sha256(shard))
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"image .*train-000000.tar:bad-0\d: cannot decode"):
        next(iter(_loader(tmp_path)))


def test_manifest_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no manifest at .*run `pretrain prepare images` first"):
        _loader(tmp_path)
    write_image_dir(tmp_path, {"train": [8]})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format": "pretrain-images-v0"}))
    with pytest.raises(UserError, match="format 'pretrain-images-v0', expected 'pretrain-images-v1'"):
        _loader(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="no split 'val' in splits"):
        image_eval_batches(str(tmp_path), micro_batch_size=2).__next__()


def test_sample_count_mismatch_names_the_shard(tmp_path: Path) -> None:
    write_image_dir(tmp_path, {"train": [8]})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["samples"] = manifest["splits"]["train"]["samples"] = 9
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="train-000000.tar: 9 samples in manifest, 8 images in file"):
        next(iter(_loader(tmp_path)))


def test_knn_monitor_is_decided_at_start_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.config import load_config
    from training.engine import DistEnv
    from training.methods.base import MethodContext
    from training.methods.simclr import knn_monitor_for

    data = write_image_dir(tmp_path, {"train": [8], "val": []})
    manifest = json.loads((data / "manifest.json").read_text())
    config = load_config("configs/simclr-tiny.yaml")
    section = config.simclr
    assert section is not None
    context = MethodContext(config, DistEnv(0, 1, 0, torch.device("cpu")), {}, str(data))
    assert not knn_monitor_for(context, section, manifest)
    assert "kNN validation skipped: split 'val' of the data holds no images" in capsys.readouterr().out
    silent = load_config("configs/simclr-tiny.yaml", ["train.val_every=0"])
    assert not knn_monitor_for(MethodContext(silent, context.env, {}, str(data)), section, manifest)
    assert capsys.readouterr().out == ""
    (tmp_path / "usable").mkdir()
    usable = write_image_dir(tmp_path / "usable", {"train": [8], "val": [2]})
    usable_context = MethodContext(config, context.env, {}, str(usable))
    assert knn_monitor_for(usable_context, section, json.loads((usable / "manifest.json").read_text()))
