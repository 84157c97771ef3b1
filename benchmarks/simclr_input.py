"""SimCLR input throughput: our split (decode + crops on CPU, the rest on the device) vs a per-image PIL pipeline.

    python benchmarks/simclr_input.py                        # CPU only, about a minute
    python benchmarks/simclr_input.py --device cuda          # adds GPU augmentation and a ResNet-50 step
    python benchmarks/simclr_input.py --seconds 1 --images 64
    python benchmarks/simclr_input.py --train-step --size 64 --batch 4   # the step row on CPU

Rows (images/s; every image gives two views):
  ours decode+2 crops            image_loader with no workers, on one core: tar read, JPEG decode
                                 (reduced scale where it allows), two random resized crops, uint8
  PIL per-image pipeline         decode, then per view: random resized crop, flip, colour jitter in a
                                 random order, grayscale, blur, to a normalised float tensor; one core
                                 (torchvision's transforms when torchvision imports, else plain PIL)
  ours augment on DEVICE         training.simclr.augment of both uint8 views, batch --batch
  ResNet-50 train step           fwd + bwd + LARS step at --size px, bf16 autocast, batch --batch pairs
                                 (on cuda, or with --train-step)
The images are photo-like synthetic JPEGs of ``--width`` x 256 px (what `pretrain prepare images
--size 256` writes for 4:3 photos).
"""

from __future__ import annotations

import argparse
import io
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from synthetic import write_image_dir

from training.simclr.augment import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig, augment, make_generator
from training.simclr.images import CropConfig, image_loader, random_resized_crop_box
from training.simclr.lars import LARS, lars_param_groups
from training.simclr.model import build_simclr


def rate(work: Callable[[], int], seconds: float, sync: Callable[[], None] = lambda: None) -> float:
    """Items per second of ``work`` (which returns the items it did), after one warm-up call."""
    work()
    sync()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        done += work()
    sync()
    return done / (time.perf_counter() - start)


def pil_view(image: Image.Image, rng: np.random.Generator, size: int, config: AugmentConfig) -> torch.Tensor:
    """One SimCLR view of a decoded image with PIL only (the per-image CPU baseline)."""
    box = random_resized_crop_box(rng, image.width, image.height, CropConfig())
    view = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
    if rng.random() < config.flip_prob:
        view = ImageOps.mirror(view)
    if rng.random() < config.jitter_prob:
        s = config.strength
        ops: list[Callable[[Image.Image], Image.Image]] = [
            lambda v: ImageEnhance.Brightness(v).enhance(rng.uniform(1 - 0.8 * s, 1 + 0.8 * s)),
            lambda v: ImageEnhance.Contrast(v).enhance(rng.uniform(1 - 0.8 * s, 1 + 0.8 * s)),
            lambda v: ImageEnhance.Color(v).enhance(rng.uniform(1 - 0.8 * s, 1 + 0.8 * s)),
            lambda v: _pil_hue(v, rng.uniform(-0.2 * s, 0.2 * s)),
        ]
        for index in rng.permutation(4):
            view = ops[index](view)
    if rng.random() < config.grayscale_prob:
        view = view.convert("L").convert("RGB")
    if rng.random() < config.blur_prob:
        view = view.filter(
            ImageFilter.GaussianBlur(rng.uniform(config.blur_sigma_min, config.blur_sigma_max))
        )
    pixels = torch.from_numpy(np.asarray(view, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - torch.tensor(config.mean).view(3, 1, 1)) / torch.tensor(config.std).view(3, 1, 1)


def _pil_hue(view: Image.Image, shift: float) -> Image.Image:
    hue, saturation, value = view.convert("HSV").split()
    hue = hue.point(lambda h: (h + int(shift * 255)) % 256)
    return Image.merge("HSV", (hue, saturation, value)).convert("RGB")


def torchvision_pipeline(size: int) -> Callable[[Image.Image], torch.Tensor] | None:
    """torchvision's SimCLR transform, or None when torchvision does not import."""
    try:
        from torchvision import transforms
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    kernel = int(0.1 * size) // 2 * 2 + 1
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(size),
            transforms.RandomHorizontalFlip(),
            transforms.RandomApply([transforms.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([transforms.GaussianBlur(kernel, (0.1, 2.0))], p=0.5),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def cpu_rows(data_dir: str, args: argparse.Namespace) -> list[tuple[str, float]]:
    torch.set_num_threads(1)
    count = args.images
    batch = min(args.batch, count)
    # One step per epoch when the batch is over half the images: each call, other images, other crops.
    loader = image_loader(
        data_dir, global_batch_size=batch, micro_batch_size=batch, image_size=args.size, num_workers=0
    )
    batches = iter(loader)

    def ours() -> int:
        next(batches)
        return batch

    encoded = [loader.source.reader.read(0, index)[1] for index in range(count)]
    rng, config = np.random.default_rng(0), AugmentConfig()
    library = torchvision_pipeline(args.size)

    def baseline() -> int:
        for data in encoded:
            with Image.open(io.BytesIO(data)) as image:
                rgb = image.convert("RGB")
                for _ in range(2):
                    library(rgb) if library else pil_view(rgb, rng, args.size, config)
        return len(encoded)

    name = "torchvision per-image pipeline" if library else "PIL per-image pipeline"
    return [
        ("ours decode+2 crops (1 core)", rate(ours, args.seconds)),
        (f"{name} (1 core)", rate(baseline, args.seconds)),
    ]


def device_rows(args: argparse.Namespace) -> list[tuple[str, float]]:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    views = torch.randint(0, 256, (2, args.batch, 3, args.size, args.size), dtype=torch.uint8, device=device)
    generator, config = make_generator(device, 0), AugmentConfig()

    def augment_pairs() -> int:
        augment(views[0], config, generator)
        augment(views[1], config, generator)
        return args.batch

    rows = [(f"ours augment on {device.type} (batch {args.batch})", rate(augment_pairs, args.seconds, sync))]
    if device.type == "cuda" or args.train_step:
        rows.append(
            (
                f"ResNet-50 train step {args.size} px, bf16 (batch {args.batch})",
                resnet50_step_rate(views, args, sync),
            )
        )
    return rows


def resnet50_step_rate(views: torch.Tensor, args: argparse.Namespace, sync: Callable[[], None]) -> float:
    device = views.device
    model = build_simclr(depth=50).to(device).to(memory_format=torch.channels_last)
    optimizer = LARS(lars_param_groups(model, 1e-6), lr=0.3, trust_coefficient=0.001)
    generator, config = make_generator(device, 1), AugmentConfig()

    def step() -> int:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            view1 = augment(views[0], config, generator).contiguous(memory_format=torch.channels_last)
            view2 = augment(views[1], config, generator).contiguous(memory_format=torch.channels_last)
            loss = model(view1, view2).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return args.batch

    return rate(step, args.seconds, sync)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="device of the augmentation rows (cpu or cuda)")
    parser.add_argument("--size", type=int, default=224, help="crop side in pixels")
    parser.add_argument("--width", type=int, default=341, help="width of the 256 px tall source JPEGs")
    parser.add_argument("--images", type=int, default=48, help="synthetic JPEGs to decode")
    parser.add_argument("--batch", type=int, default=32, help="batch of the augmentation and train step rows")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of a CPU augmentation row")
    parser.add_argument("--train-step", action="store_true", help="add the ResNet-50 step row off cuda too")
    parser.add_argument("--seconds", type=float, default=4.0, help="time per row")
    args = parser.parse_args()
    random.seed(0)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as root:
        write_image_dir(Path(root), args.images, args.width, 256)
        rows = cpu_rows(root, args) + device_rows(args)
    print(f"{'row':<48} {'images/s':>10}")
    for name, value in rows:
        print(f"{name:<48} {value:>10.1f}")
    print(f"(every row counts images, i.e. pairs of {args.size} px views; CPU rows on one core)")


if __name__ == "__main__":
    main()
