"""`pretrain prepare images`: run the Beam job that turns image folders or parquet into shuffled WebDataset shards.

    pretrain prepare images imagenet/train/ --output shards/ --size 256 --val-fraction 0.01
    pretrain prepare images photos/ --output shards/              # flat folder: unlabelled
    pretrain prepare images 'hf/imagenet/*.parquet' --output shards/ --image-column image --label-column label
    pretrain prepare images gs://bucket/imagenet/train/ --output gs://bucket/shards \\
        -- --runner=DataflowRunner --project=P --region=R --temp_location=gs://bucket/tmp

Input layouts (``--layout auto`` tells them apart per INPUT):
  * a folder whose files all lie in sub-folders: one sub-folder per class (label = sub-folder name);
  * a folder with any file directly inside: every file below it is an unlabelled image;
  * ``*.parquet``: an image-bytes column and, when present, a label column.
A job's inputs must be all labelled or all unlabelled.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from data_pipeline.command_common import (
    JobResult,
    beam_arguments,
    clear_previous_outputs,
    job_outcome,
    recorded_options,
    written_manifest,
)
from data_pipeline.errors import UserError
from data_pipeline.images import sources
from data_pipeline.images.decode import ImageOptions
from data_pipeline.images.sources import ImageSource, ParquetColumns
from data_pipeline.tables import format_table

PARQUET_SUFFIX = ".parquet"
LAYOUT_CHOICES = ("auto", "classes", "flat")
LABELLED_PARQUET = "parquet,labelled"
UNREADABLE_PARQUET = "parquet,unreadable"
LABELLED_KINDS = ("classes", LABELLED_PARQUET)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `pretrain prepare images`."""
    parser.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="image folders, image files, .parquet files, globs or URLs"
    )
    parser.add_argument("--output", required=True, help="output directory (local path or filesystem URL)")
    parser.add_argument(
        "--size",
        type=int,
        default=256,
        help="shorter side of the stored images; smaller ones are not upscaled",
    )
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of the stored images (1-95)")
    parser.add_argument(
        "--min-size",
        type=int,
        default=16,
        help="images whose shorter side is below this are rejected as too_small",
    )
    parser.add_argument(
        "--layout",
        choices=LAYOUT_CHOICES,
        default="auto",
        help="folder layout: auto = class folders when every file lies in a sub-folder, else flat",
    )
    parser.add_argument("--image-column", default="image", help="parquet column of image bytes")
    parser.add_argument(
        "--label-column",
        default=None,
        help="parquet column of labels; by default 'label' when the file has one; '' = unlabelled",
    )
    parser.add_argument("--seed", type=int, default=12345, help="seed of the shuffle")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="share of images (by hash of their bytes) in the val split",
    )
    parser.add_argument("--shard-mb", type=float, default=128.0, help="target shard size in MiB")
    parser.add_argument("--strict", action="store_true", help="exit non-zero when any image was rejected")


def _check_ranges(args: argparse.Namespace) -> None:
    checks = [
        ("--size", args.size, 8 <= args.size <= 65500, "between 8 and 65500"),
        ("--quality", args.quality, 1 <= args.quality <= 95, "between 1 and 95"),
        ("--min-size", args.min_size, 1 <= args.min_size <= args.size, f"between 1 and --size {args.size}"),
        ("--val-fraction", args.val_fraction, 0.0 <= args.val_fraction < 1.0, "in [0, 1)"),
        ("--shard-mb", args.shard_mb, args.shard_mb > 0, "positive"),
    ]
    for name, value, ok, expected in checks:
        if not ok:
            raise UserError(f"{name} {value}: must be {expected}")


# ------------------------------------------------------------------------------------- input layout


@dataclass
class ResolvedInputs:
    """What the job reads, found before it starts: sources, class names and the layout of each input."""

    sources: list[ImageSource] = field(default_factory=list)
    labels: set[str] = field(default_factory=set)
    # Folder, parquet file or glob of image files -> classes | flat | parquet | parquet,labelled | ...
    kinds: dict[str, str] = field(default_factory=dict)
    label_column: str | None = None
    input_bytes: int = 0


def _is_folder(pattern: str) -> bool:
    return os.path.isdir(pattern) or ("://" in pattern and pattern.endswith("/"))


def _folder_files(folder: str) -> list[Any]:
    from data_pipeline.inputs import expand_pattern

    files = expand_pattern(folder if os.path.isdir(folder) else folder.rstrip("/") + "/**")
    relative = sources.relative_paths(folder, [f.path for f in files])
    # Hidden files and folders (.DS_Store, .git/, _SUCCESS) are no images of the set.
    return [
        f
        for f, rel in zip(files, relative)
        if not any(part.startswith((".", "_")) for part in rel.split("/"))
    ]


def _add_folder(resolved: ResolvedInputs, folder: str, layout_choice: str) -> None:
    files = _folder_files(folder)
    if not files:
        raise UserError(f"input {folder}: no image files below it")
    relative = sources.relative_paths(folder, [f.path for f in files])
    layout = sources.folder_layout(relative) if layout_choice == "auto" else layout_choice
    if layout == "classes" and sources.folder_layout(relative) != "classes":
        stray = next(rel for rel in relative if "/" not in rel)
        raise UserError(
            f"input {folder}: --layout classes, but {stray} lies directly in it, in no class folder"
        )
    labels = sources.folder_labels(relative, layout)
    resolved.sources += [ImageSource(f.path, label) for f, label in zip(files, labels)]
    resolved.labels.update(label for label in labels if label is not None)
    resolved.kinds[folder] = layout
    resolved.input_bytes += sum(f.size_bytes for f in files)


def _parquet_label_column(path: str, handle: Any, args: argparse.Namespace) -> str | None:
    """The label column of one parquet file; a missing image or named label column is a UserError."""
    import pyarrow.parquet as pq

    names = pq.read_schema(handle).names
    if args.image_column not in names:
        raise UserError(
            f"input {path}: no image column {args.image_column!r} (--image-column); columns: {names}"
        )
    if args.label_column == "":
        return None
    if args.label_column is None:
        return "label" if "label" in names else None
    if args.label_column not in names:
        raise UserError(
            f"input {path}: no label column {args.label_column!r} (--label-column); columns: {names}"
        )
    return args.label_column


def _add_parquet(resolved: ResolvedInputs, path: str, size_bytes: int, args: argparse.Namespace) -> None:
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(path) as handle:
            column = _parquet_label_column(path, handle, args)
            if column is not None:
                handle.seek(0)
                resolved.labels.update(sources.parquet_labels(handle, column))
    except (OSError, ValueError) as error:  # pyarrow's errors derive from these
        # An unreadable file is the job's business: it becomes a corrupt_file / unreadable_file reject,
        # and its labelling, unknown, takes no part in the mixed-labelling check.
        resolved.kinds[path] = UNREADABLE_PARQUET
        print(f"pretrain prepare images: {path} does not read ({error}); the job rejects it", file=sys.stderr)
    else:
        if resolved.label_column is not None and column is not None and column != resolved.label_column:
            raise UserError(
                f"input {path}: label column {column!r}, other inputs use {resolved.label_column!r}"
            )
        resolved.label_column = resolved.label_column or column
        resolved.kinds[path] = "parquet" if column is None else LABELLED_PARQUET
    resolved.sources.append(ImageSource(path, None, parquet=True))
    resolved.input_bytes += size_bytes


def resolve_inputs(args: argparse.Namespace) -> ResolvedInputs:
    """Expand every INPUT, tell its layout and list the class names; mixed labelling is a UserError."""
    from data_pipeline.inputs import expand_pattern

    if not args.inputs:
        raise UserError("no INPUT given")
    resolved = ResolvedInputs()
    for pattern in args.inputs:
        if _is_folder(pattern):
            _add_folder(resolved, pattern, args.layout)
            continue
        for input_file in expand_pattern(pattern):
            if input_file.path.endswith(PARQUET_SUFFIX):
                _add_parquet(resolved, input_file.path, input_file.size_bytes, args)
            else:
                resolved.sources.append(ImageSource(input_file.path))
                resolved.kinds[pattern] = "flat"
                resolved.input_bytes += input_file.size_bytes
    known = {name: kind for name, kind in sorted(resolved.kinds.items()) if kind != UNREADABLE_PARQUET}
    if len({kind in LABELLED_KINDS for kind in known.values()}) > 1:
        listing = ", ".join(f"{name} ({kind})" for name, kind in list(known.items())[:10])
        raise UserError(f"inputs mix labelled and unlabelled images: {listing}")
    # Each source once, in one order whatever order the INPUTs came in.
    resolved.sources = sorted(
        {source.path: source for source in resolved.sources}.values(), key=lambda s: s.path
    )
    return resolved


# ---------------------------------------------------------------------------------------------- job


def prepare_images(args: argparse.Namespace, beam_args: list[str]) -> tuple[JobResult, str]:
    """Resolve the inputs, run the job, read back the manifest; returns it and the layout."""
    from data_pipeline.images import pipeline as ip

    resolved = resolve_inputs(args)
    classes = sources.class_list(resolved.labels)
    layout = ",".join(sorted({kind.split(",")[0] for kind in resolved.kinds.values()}))
    clear_previous_outputs(args.output)
    config = ip.ImageJobConfig(
        output=args.output,
        options=ImageOptions(args.size, args.quality, args.min_size),
        columns=ParquetColumns(args.image_column, resolved.label_column),
        classes=tuple(classes),
        seed=args.seed,
        val_fraction=args.val_fraction,
        shard_mb=args.shard_mb,
    )
    static = {
        "classes": classes,
        "layout": layout,
        "image_size": args.size,
        "quality": args.quality,
        "seed": args.seed,
        "options": recorded_options(args, beam_args),
    }
    print(
        f"pretrain prepare images: {len(resolved.sources)} sources, layout {layout}, {len(classes)} classes, "
        f"Beam options {' '.join(beam_args)}",
        file=sys.stderr,
    )
    ip.run_image_job(resolved.sources, config, static, beam_args)
    return JobResult(written_manifest(args.output), len(resolved.sources), resolved.input_bytes), layout


def summary_table(result: JobResult, layout: str, seconds: float) -> str:
    """The end-of-run table: images read/kept, rejects by reason, samples and shards per split, speed."""
    manifest = result.manifest
    counts = manifest["images"]
    rows = [
        ("sources", f"{result.input_files:,}"),
        ("layout", f"{layout}, {len(manifest['classes'])} classes"),
        ("images read", f"{counts['read']:,}"),
        ("images kept", f"{counts['kept']:,}"),
    ]
    rows += [(f"  rejected: {reason}", f"{count:,}") for reason, count in counts["rejected"].items()]
    for split, entry in manifest["splits"].items():
        rows.append(
            (
                split,
                f"{entry['samples']:,} images, {entry['bytes'] / 1e6:,.1f} MB, {len(entry['shards'])} shards",
            )
        )
    rows += [
        ("MB in", f"{result.input_bytes / 1e6:,.1f}"),
        ("seconds", f"{seconds:,.1f}"),
        ("images/s", f"{counts['read'] / seconds:,.1f}" if seconds > 0 else "-"),
    ]
    return format_table(rows)


def run(args: argparse.Namespace) -> int:
    """Run `pretrain prepare images`; the exit status."""
    _check_ranges(args)
    beam_args = beam_arguments(list(getattr(args, "passthrough", [])), os.cpu_count() or 1)
    started = time.monotonic()
    result, layout = prepare_images(args, beam_args)
    print(summary_table(result, layout, time.monotonic() - started))
    return job_outcome(result.manifest["images"], "image", "prepare images", args)
