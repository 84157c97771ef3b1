"""Pure image-preparation functions: decode, validate, normalise and re-encode images; layouts, labels, shards.

Nothing here imports Beam: ``image_pipeline`` wraps these functions in thin DoFns, and the tests call
them directly.

Decisions, in one place:

* **Layout.** A folder whose files all lie in sub-folders is *class layout* (ImageNet): the label of
  an image is the name of the sub-folder directly below the input folder. A folder with any file
  directly inside is *flat*: every file below it is an unlabelled image. A ``.parquet`` input holds
  an image column (raw bytes, or a ``{bytes, path}`` struct as Hugging Face ``datasets`` writes) and
  optionally a label column.
* **Classes.** The sorted label names; names made only of digits sort numerically, so integer labels
  ``0..N-1`` keep their values as class indices. A sample's ``.cls`` is the index in that list.
* **Pixels.** EXIF orientation applied; palette, alpha, CMYK, 16-bit and greyscale converted to RGB
  (alpha composited over white, 16-bit greyscale keeps its top 8 bits); the shorter side resized to
  ``size`` with LANCZOS, never upscaled (enlarging adds no information; the training crop rescales
  anyway). A JPEG at least twice the target is first decoded at 1/2, 1/4 or 1/8 scale by libjpeg
  (``Image.draft``), which is what makes large inputs cheap. Metadata (EXIF, ICC profile) is dropped.
* **Identity.** A sample's key is the hex BLAKE2b-128 digest of its *source* bytes: stable across
  runs and seeds. The same digest picks the split (so identical files never straddle train and val)
  and, with the seed, the global shuffle order. Exact duplicate files are kept once (the smallest
  source) and the others rejected as ``duplicate``.
"""

from __future__ import annotations

import hashlib
import io
import math
import posixpath
import tarfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageOps, UnidentifiedImageError

from data_pipeline.examples import example_sort_key, split_of
from data_pipeline.manifest import split_entries
from data_pipeline.shard_format import IMAGE_FORMAT_NAME, _add_member, _HashingWriter

REJECT_REASONS = (
    "unreadable_file",  # offset None: the file could not be opened or read; detail: the error
    "zero_size",  # an empty file or parquet cell
    "not_an_image",  # Pillow recognises no image format; detail: the first bytes
    "truncated",  # the image data ends early
    "corrupt",  # the header was read but the pixels do not decode; detail: the error
    "too_small",  # shorter side below --min-size
    "too_large",  # more pixels than Pillow's decompression-bomb limit
    "missing_image",  # parquet: null image cell
    "missing_label",  # parquet: null label cell in a labelled file
    "corrupt_file",  # parquet: the file does not read; offset: the first row not read, or None
    "missing_column",  # parquet: the image column is absent; detail lists the columns present
    "duplicate",  # the same bytes as an earlier source; detail names it
)
HASH_BYTES = 16
TAR_BLOCK = 512
PARQUET_BATCH_ROWS = 64
WHITE = (255, 255, 255, 255)
# 16-bit greyscale modes: Pillow's own convert("L") clips them at 255 instead of scaling.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


@dataclass(frozen=True)
class ImageOptions:
    """How every image is normalised.

    Attributes:
        size: Target length of the shorter side, in pixels (never upscaled).
        quality: JPEG quality of the re-encoded image (1-95).
        min_size: Images whose shorter side is below this are rejected as ``too_small``.
    """

    size: int = 256
    quality: int = 90
    min_size: int = 16


@dataclass(frozen=True)
class Rejection:
    """Why one image was set aside: a ``REJECT_REASONS`` entry and a human-readable detail."""

    reason: str
    detail: str


@dataclass(frozen=True)
class RawImage:
    """One input image before decoding.

    Attributes:
        source: The file it came from.
        offset: The parquet row, or None for an image file.
        label: The class name, or None when unlabelled.
        data: The stored bytes.
    """

    source: str
    offset: int | None
    label: str | None
    data: bytes


@dataclass(frozen=True)
class ImageRecordReject:
    """A record set aside while reading: the fields of a ``rejects/<reason>.jsonl`` line."""

    reason: str
    source: str
    offset: int | None
    detail: str


@dataclass(frozen=True, order=True)
class KeptImage:
    """A re-encoded image with its place in the output; orders by shuffle key, then identity.

    Attributes:
        sort_key: The seeded 64-bit shuffle key (a function of ``digest`` and the seed).
        digest: BLAKE2b-128 of the source bytes: the sample key and the split key.
        source: The file it came from.
        offset: The parquet row, -1 for an image file (so that records compare).
        label: The class index, or -1 when unlabelled.
        jpeg: The re-encoded JPEG.
    """

    sort_key: int
    digest: bytes
    source: str
    offset: int
    label: int
    jpeg: bytes


# ------------------------------------------------------------------------------------ decode, encode


def _decode_failure(error: Exception) -> Rejection:
    message = f"{type(error).__name__}: {error}"
    if isinstance(error, Image.DecompressionBombError):
        return Rejection("too_large", message)
    if isinstance(error, OSError) and "truncat" in str(error).lower():
        return Rejection("truncated", message)
    return Rejection("corrupt", message)


def decode_image(data: bytes, options: ImageOptions) -> Image.Image | Rejection:
    """The decoded, upright image of ``data``, or the reason it cannot be used.

    A JPEG at least twice ``options.size`` is decoded at a reduced scale (still at least ``size`` on
    the shorter side).
    """
    if not data:
        return Rejection("zero_size", "0 bytes")
    # Malformed files make Pillow raise almost anything (OSError, ValueError, SyntaxError,
    # struct.error, IndexError...): each is a property of the input, so all become reject reasons.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return Rejection("not_an_image", f"{len(data)} bytes starting {data[:16]!r}")
    except Exception as error:  # noqa: BLE001 - see above: a malformed file, never a bug here
        return _decode_failure(error)
    if min(image.size) < options.min_size:
        return Rejection("too_small", f"{image.size[0]}x{image.size[1]} < --min-size {options.min_size}")
    try:
        if image.format == "JPEG":
            # A square request keeps the shorter side >= size whatever the EXIF orientation.
            image.draft(None, (options.size, options.size))
        image.load()
        return ImageOps.exif_transpose(image)
    except Exception as error:  # noqa: BLE001 - pixel data Pillow cannot decode
        return _decode_failure(error)


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB: alpha composited over white, 16-bit greyscale scaled to 8 bits."""
    if image.mode in SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        values = np.asarray(image).astype(np.float64)
        # I;16 (and I/F holding more than 8 bits) span 0..65535: keep the top 8 bits.
        if image.mode in SIXTEEN_BIT_MODES or values.max(initial=0) > 255:
            values = values / 257.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """``image`` with its shorter side scaled down to ``size`` (LANCZOS); a smaller image is returned as is."""
    width, height = image.size
    if min(width, height) <= size:
        return image
    if width <= height:
        target = (size, max(1, round(height * size / width)))
    else:
        target = (max(1, round(width * size / height)), size)
    # reducing_gap: integer box reduction first, LANCZOS for the last factor of <= 3 (same quality,
    # far less work on large inputs).
    return image.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    """Baseline JPEG of an RGB image at ``quality``, no metadata: the same pixels give the same bytes."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, optimize=False, progressive=False)
    return buffer.getvalue()


def process_image(data: bytes, options: ImageOptions) -> bytes | Rejection:
    """Decode, validate, orient, convert to RGB, resize and re-encode one image."""
    decoded = decode_image(data, options)
    if isinstance(decoded, Rejection):
        return decoded
    try:
        return encode_jpeg(resize_shorter_side(to_rgb(decoded), options.size), options.quality)
    except Exception as error:  # noqa: BLE001 - a mode or palette Pillow cannot convert: the file's fault
        return _decode_failure(error)


# --------------------------------------------------------------------------------- identity, splits


def content_digest(data: bytes) -> bytes:
    """The 16-byte BLAKE2b digest of an image's source bytes."""
    return hashlib.blake2b(data, digest_size=HASH_BYTES).digest()


def sample_key(digest: bytes) -> str:
    """The WebDataset key of a sample: its digest in hex (no dots, unique once duplicates are gone)."""
    return digest.hex()


def place_image(digest: bytes, seed: int, val_fraction: float) -> tuple[str, int]:
    """``(split, sort_key)`` of an image: the split from its digest alone, the order also from the seed."""
    return split_of(digest, val_fraction), example_sort_key(seed, digest, 0, 0)


def keep_first_copies(
    images: Iterable[KeptImage],
) -> tuple[list[KeptImage], list[tuple[KeptImage, KeptImage]]]:
    """Shuffle order and exact de-duplication of one shard's images.

    Returns:
        ``(kept, duplicates)``: the kept images sorted by ``(sort_key, digest, source, offset)``, and
        ``(duplicate, kept copy)`` pairs. Copies share a digest, hence a sort key and a shard, so
        the smallest ``(source, offset)`` of each digest is kept whatever the worker count.
    """
    kept: list[KeptImage] = []
    duplicates: list[tuple[KeptImage, KeptImage]] = []
    for image in sorted(images):
        if kept and kept[-1].digest == image.digest:
            duplicates.append((image, kept[-1]))
        else:
            kept.append(image)
    return kept, duplicates


def where(source: str, offset: int | None) -> str:
    """``source`` or ``source:row N``: how reject details name a record."""
    return source if offset is None or offset < 0 else f"{source}:row {offset}"


# ---------------------------------------------------------------------------------- layouts, classes


def relative_paths(base: str, paths: Sequence[str]) -> list[str]:
    """``paths`` relative to the folder ``base`` (``/``-separated, any filesystem)."""
    prefix = base.rstrip("/") + "/"
    return [path[len(prefix) :] if path.startswith(prefix) else posixpath.basename(path) for path in paths]


def folder_layout(relative: Sequence[str]) -> str:
    """``classes`` when every file lies in a sub-folder, else ``flat``."""
    return "classes" if relative and all("/" in path for path in relative) else "flat"


def folder_labels(relative: Sequence[str], layout: str) -> list[str | None]:
    """Each file's class name (its first path component) in class layout; None in a flat folder."""
    if layout != "classes":
        return [None] * len(relative)
    return [path.split("/", 1)[0] for path in relative]


def _class_sort_key(name: str) -> tuple[int, int, str]:
    return (0, int(name), name) if name.isdigit() else (1, 0, name)


def class_list(labels: Iterable[str]) -> list[str]:
    """The sorted distinct class names: all-digit names numerically first, then the others as strings."""
    return sorted(set(labels), key=_class_sort_key)


def label_name(value: Any) -> str:
    """A parquet label cell as a class name (integers as decimal digits, bytes as UTF-8)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


# ------------------------------------------------------------------------------------------ parquet


def image_bytes(cell: Any) -> bytes | None:
    """The bytes of an image cell: raw binary, or the ``bytes`` field of a ``{bytes, path}`` struct."""
    if isinstance(cell, dict):
        cell = cell.get("bytes")
    return cell if isinstance(cell, bytes) or cell is None else None


def iter_parquet_images(
    path: str, handle: IO[bytes], image_column: str, label_column: str | None
) -> Iterator[RawImage | ImageRecordReject]:
    """The rows of a parquet file as raw images, or reject records for rows (or a file) that cannot be read.

    Args:
        path: The file's name, recorded as the source.
        handle: A seekable binary stream of the file.
        image_column: Column of image bytes (or ``{bytes, path}`` structs).
        label_column: Column of class labels; None when the file is unlabelled.
    """
    row = 0
    try:
        parquet = pq.ParquetFile(handle)
        names = parquet.schema_arrow.names
        wanted = [image_column] + ([label_column] if label_column else [])
        absent = [name for name in wanted if name not in names]
        if absent:
            yield ImageRecordReject("missing_column", path, None, f"no column {absent}; columns: {names}")
            return
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted):
            images = batch.column(0).to_pylist()
            labels = batch.column(1).to_pylist() if label_column else [None] * len(images)
            for cell, label in zip(images, labels):
                yield _parquet_row(path, row, image_bytes(cell), label, label_column is not None)
                row += 1
    except (pa.ArrowException, OSError) as error:
        yield ImageRecordReject(
            "corrupt_file", path, row if row else None, f"{type(error).__name__}: {error}"
        )


def _parquet_row(
    path: str, row: int, data: bytes | None, label: Any, labelled: bool
) -> RawImage | ImageRecordReject:
    if data is None:
        return ImageRecordReject("missing_image", path, row, "null or non-binary image cell")
    if labelled and label is None:
        return ImageRecordReject("missing_label", path, row, "null label cell")
    return RawImage(path, row, label_name(label) if labelled else None, data)


def parquet_labels(handle: IO[bytes], label_column: str) -> list[str]:
    """The distinct class names of a parquet file's label column (nulls left out)."""
    column = pq.read_table(handle, columns=[label_column]).column(0)
    return [label_name(value) for value in pc.unique(column).to_pylist() if value is not None]


# -------------------------------------------------------------------------------------------- shards


def _member_bytes(payload_bytes: int) -> int:
    return TAR_BLOCK + math.ceil(payload_bytes / TAR_BLOCK) * TAR_BLOCK


def sample_tar_bytes(jpeg_bytes: int, labelled: bool) -> int:
    """Tar bytes one sample adds to a shard: a header and padded payload per member."""
    return _member_bytes(jpeg_bytes) + (_member_bytes(2) if labelled else 0)


def write_image_shard(sink: IO[bytes], relative_path: str, images: Iterable[KeptImage]) -> dict[str, Any]:
    """Write ``images`` (in their final order) as one tar shard to ``sink``; the caller closes ``sink``.

    Each image is a standard WebDataset sample: ``KEY.jpg`` and, when labelled, ``KEY.cls`` (the class
    index in ASCII digits). Tar metadata is fixed, so the same images give the same bytes.

    Returns:
        The manifest's ``shards[]`` entry: path, samples, images, bytes, sha256.
    """
    hashing = _HashingWriter(sink)
    count = 0
    with tarfile.open(fileobj=hashing, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for image in images:
            key = sample_key(image.digest)
            _add_member(tar, f"{key}.jpg", image.jpeg)
            if image.label >= 0:
                _add_member(tar, f"{key}.cls", str(image.label).encode("ascii"))
            count += 1
    return {
        "path": relative_path,
        "samples": count,
        "images": count,
        "bytes": hashing.nbytes,
        "sha256": hashing.sha256.hexdigest(),
    }


def build_image_manifest(
    shards: Iterable[tuple[str, Mapping[str, Any]]],
    documents: Mapping[str, Any],
    classes: Sequence[str],
    layout: str,
    image_size: int,
    quality: int,
    seed: int,
    options: Mapping[str, Any],
) -> dict[str, Any]:
    """The manifest of an image shard directory (same schema as the text one where they overlap).

    Args:
        shards: ``(split, write_image_shard stats)`` of every shard, any order.
        documents: ``manifest.document_counts`` of the images: read, kept, rejected by reason. Stored
            as ``images`` and, for tools that read any manifest, as ``documents``.
        classes: Class names; a sample's ``.cls`` indexes this list. Empty when unlabelled.
        layout: ``classes``, ``flat`` or ``parquet``.
        image_size: The shorter side the images were resized to (smaller ones kept as they were).
        quality: JPEG quality.
        seed: The shuffle seed.
        options: Every option the job ran with.
    """
    return {
        "format": IMAGE_FORMAT_NAME,
        "splits": split_entries(shards, totals=("samples", "images", "bytes")),
        "classes": list(classes),
        "layout": layout,
        "image_size": image_size,
        "jpeg_quality": quality,
        "seed": seed,
        "images": dict(documents),
        "documents": dict(documents),
        "options": dict(options),
    }
