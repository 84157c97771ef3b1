"""Small generated image sets: coloured shapes at random positions per class, plus known bad files."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = ((220, 40, 40), (40, 180, 60), (50, 80, 220), (230, 200, 30))
IMAGE_SIZE = 48


def shape_image(shape: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """One ``shape`` in a random colour at a random place on a grey background."""
    image = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    extent = int(rng.integers(size // 4, size // 2))
    left, top = (int(v) for v in rng.integers(0, size - extent, 2))
    colour = COLOURS[int(rng.integers(len(COLOURS)))]
    box = (left, top, left + extent, top + extent)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon(
            [(left, top + extent), (left + extent, top + extent), (left + extent // 2, top)], fill=colour
        )
    return image


def image_bytes(image: Image.Image, fmt: str = "JPEG", **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def write_class_folders(root: Path, per_class: int = 6, seed: int = 0) -> dict[str, int]:
    """``root/<shape>/<i>.jpg`` (alternately .png); returns the number of images per class."""
    rng = np.random.default_rng(seed)
    for shape in SHAPES:
        (root / shape).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = shape_image(shape, rng)
            if i % 2:
                (root / shape / f"{i:03d}.png").write_bytes(image_bytes(image, "PNG"))
            else:
                (root / shape / f"{i:03d}.jpg").write_bytes(image_bytes(image, quality=95))
    return {shape: per_class for shape in SHAPES}


def write_flat_folder(root: Path, count: int = 8, seed: int = 1) -> int:
    """``root/<i>.jpg``: unlabelled shapes; returns the count."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (root / f"{i:03d}.jpg").write_bytes(image_bytes(shape_image(SHAPES[i % 3], rng)))
    return count


def exif_rotated_jpeg(width: int = 64, height: int = 40) -> bytes:
    """A ``width`` x ``height`` JPEG whose EXIF orientation 6 says: display rotated 90 degrees clockwise."""
    image = Image.new("RGB", (width, height), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    return image_bytes(image, exif=exif.tobytes())


def odd_but_valid_images() -> dict[str, bytes]:
    """Files that decode but need conversion: alpha, palette, 16-bit, CMYK, EXIF rotation."""
    rng = np.random.default_rng(7)
    rgba = shape_image("circle", rng).convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 100))
    sixteen = Image.fromarray((rng.random((IMAGE_SIZE, IMAGE_SIZE)) * 65535).astype(np.uint16))
    return {
        "alpha.png": image_bytes(rgba, "PNG"),
        "palette.gif": image_bytes(shape_image("square", rng).convert("P"), "GIF"),
        "sixteen_bit.png": image_bytes(sixteen, "PNG"),
        "cmyk.jpg": image_bytes(shape_image("triangle", rng).convert("CMYK")),
        "rotated.jpg": exif_rotated_jpeg(),
        "grey.jpg": image_bytes(shape_image("circle", rng).convert("L")),
    }


def bad_images() -> dict[str, tuple[bytes, str]]:
    """Files every run must reject, with the reason expected for each."""
    good = image_bytes(shape_image("circle", np.random.default_rng(3), size=96))
    return {
        "zero.jpg": (b"", "zero_size"),
        "truncated.jpg": (good[: len(good) // 2], "truncated"),
        "text.jpg": (b"this is a text file, not a JPEG\n" * 4, "not_an_image"),
        "tiny.png": (image_bytes(Image.new("RGB", (8, 8), (0, 0, 0)), "PNG"), "too_small"),
    }


def write_mixed_class_folders(root: Path) -> dict[str, int]:
    """Class folders with the odd and bad files added to ``circle`` and one duplicate in ``square``.

    Returns:
        The expected reject counts by reason.
    """
    write_class_folders(root)
    for name, data in odd_but_valid_images().items():
        (root / "circle" / name).write_bytes(data)
    expected: dict[str, int] = {}
    for name, (data, reason) in bad_images().items():
        (root / "circle" / name).write_bytes(data)
        expected[reason] = expected.get(reason, 0) + 1
    shutil.copy(root / "circle" / "000.jpg", root / "square" / "copy_of_circle.jpg")
    expected["duplicate"] = 1
    return expected


def write_image_parquet(path: Path, count: int = 9, seed: int = 2, struct_cells: bool = True) -> None:
    """A parquet file of ``image`` ({bytes, path} structs or raw bytes) and integer ``label`` columns.

    Row 0 has a null image and row 1 holds bytes that are no image.
    """
    rng = np.random.default_rng(seed)
    payloads: list[bytes | None] = [None, b"not an image"]
    payloads += [image_bytes(shape_image(SHAPES[i % 3], rng)) for i in range(count - 2)]
    cells = (
        [{"bytes": data, "path": f"{i}.jpg"} for i, data in enumerate(payloads)] if struct_cells else payloads
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": cells, "label": [i % 3 for i in range(count)]}), path, row_group_size=4)
