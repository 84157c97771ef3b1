"""Where images come from: folder layouts, class names and parquet rows, as raw records (no Beam).

* **Layout.** A folder whose files all lie in sub-folders is *class layout* (ImageNet): the label of
  an image is the name of the sub-folder directly below the input folder. A folder with any file
  directly inside is *flat*: every file below it is an unlabelled image. A ``.parquet`` input holds
  an image column (raw bytes, or a ``{bytes, path}`` struct as Hugging Face ``datasets`` writes) and
  optionally a label column.
* **Classes.** The sorted label names; names made only of digits sort numerically, so integer labels
  ``0..N-1`` keep their values as class indices. A sample's ``.cls`` is the index in that list.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_pipeline.rejects import Reject

PARQUET_BATCH_ROWS = 64


@dataclass(frozen=True)
class ImageSource:
    """One item of work: an image file (with its class name, if any) or a whole parquet file."""

    path: str
    label: str | None = None
    parquet: bool = False


@dataclass(frozen=True)
class ParquetColumns:
    """Which parquet columns hold the image bytes and the label (None: unlabelled)."""

    image: str = "image"
    label: str | None = None


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
) -> Iterator[RawImage | Reject]:
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
            yield Reject("missing_column", path, None, f"no column {absent}; columns: {names}")
            return
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted):
            images = batch.column(0).to_pylist()
            labels = batch.column(1).to_pylist() if label_column else [None] * len(images)
            for cell, label in zip(images, labels):
                yield _parquet_row(path, row, image_bytes(cell), label, label_column is not None)
                row += 1
    except (pa.ArrowException, OSError) as error:
        yield Reject(
            "corrupt_file", path, row if row else None, f"{type(error).__name__}: {error}"
        )


def _parquet_row(
    path: str, row: int, data: bytes | None, label: Any, labelled: bool
) -> RawImage | Reject:
    if data is None:
        return Reject("missing_image", path, row, "null or non-binary image cell")
    if labelled and label is None:
        return Reject("missing_label", path, row, "null label cell")
    return RawImage(path, row, label_name(label) if labelled else None, data)


def parquet_labels(handle: IO[bytes], label_column: str) -> list[str]:
    """The distinct class names of a parquet file's label column (nulls left out)."""
    column = pq.read_table(handle, columns=[label_column]).column(0)
    return [label_name(value) for value in pc.unique(column).to_pylist() if value is not None]
