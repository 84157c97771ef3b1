"""Pure image functions: decode, validate, normalise and re-encode one image; its identity and place.

Nothing here imports Beam: ``images.pipeline`` wraps these functions in thin DoFns, and the tests
call them directly.

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
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from data_pipeline.text.examples import example_sort_key
from data_pipeline.text.splits import split_of

# Every reason the image job sets a record aside for (reading, decoding, de-duplication).
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
class DecodeFailure:
    """Why one image cannot be used: a ``REJECT_REASONS`` entry and a human-readable detail."""

    reason: str
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


def _decode_failure(error: Exception) -> DecodeFailure:
    message = f"{type(error).__name__}: {error}"
    if isinstance(error, Image.DecompressionBombError):
        return DecodeFailure("too_large", message)
    if isinstance(error, OSError) and "truncat" in str(error).lower():
        return DecodeFailure("truncated", message)
    return DecodeFailure("corrupt", message)


def decode_image(data: bytes, options: ImageOptions) -> Image.Image | DecodeFailure:
    """The decoded, upright image of ``data``, or the reason it cannot be used.

    A JPEG at least twice ``options.size`` is decoded at a reduced scale (still at least ``size`` on
    the shorter side).
    """
    if not data:
        return DecodeFailure("zero_size", "0 bytes")
    # Malformed files make Pillow raise almost anything (OSError, ValueError, SyntaxError,
    # struct.error, IndexError...): each is a property of the input, so all become reject reasons.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return DecodeFailure("not_an_image", f"{len(data)} bytes starting {data[:16]!r}")
    except Exception as error:  # noqa: BLE001 - see above: a malformed file, never a bug here
        return _decode_failure(error)
    if min(image.size) < options.min_size:
        return DecodeFailure("too_small", f"{image.size[0]}x{image.size[1]} < --min-size {options.min_size}")
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


def process_image(data: bytes, options: ImageOptions) -> bytes | DecodeFailure:
    """Decode, validate, orient, convert to RGB, resize and re-encode one image."""
    decoded = decode_image(data, options)
    if isinstance(decoded, DecodeFailure):
        return decoded
    try:
        return encode_jpeg(resize_shorter_side(to_rgb(decoded), options.size), options.quality)
    except Exception as error:  # noqa: BLE001 - a mode or palette Pillow cannot convert: the file's fault
        return _decode_failure(error)


# --------------------------------------------------------------------------------- identity, splits


def content_digest(data: bytes) -> bytes:
    """The 16-byte BLAKE2b digest of an image's source bytes."""
    return hashlib.blake2b(data, digest_size=HASH_BYTES).digest()


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
