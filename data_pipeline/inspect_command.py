"""`pretrain inspect`: a shard directory's manifest summary and a few examples decoded back.

pretrain inspect shards/
pretrain inspect shards/ --samples 10 --split val
pretrain inspect image-shards/       # image shards: key, class and size of each sample
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from data_pipeline.errors import UserError
from data_pipeline.formats.images import IMAGE_SUFFIX, LABEL_SUFFIX, iter_tar_samples
from data_pipeline.formats.manifest import (
    IMAGE_FORMAT_NAME,
    SPLITS,
    read_manifest,
    tokenizer_kind,
    tokenizer_special_ids,
)
from data_pipeline.formats.text import Example, iter_chunks
from data_pipeline.text.tokenizer_kinds import TextTokenizer, tokenizer_from_copy

LABEL_NAMES = {"nsp": ("next", "random"), "sop": ("in order", "swapped"), "none": ("-", "-")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `pretrain inspect`."""
    parser.add_argument(
        "directory", metavar="DIR", help="a directory written by `pretrain prepare text` or `prepare images`"
    )
    parser.add_argument("--samples", type=int, default=3, help="examples to decode and print")
    parser.add_argument("--split", choices=SPLITS, default="train", help="split the examples come from")


def summary_lines(manifest: dict[str, Any]) -> list[str]:
    """The manifest in a few lines: splits, tokens, shards, bytes/token, documents, tokenizer."""
    documents = manifest["documents"]
    tokenizer = manifest["tokenizer"]
    lines = [
        (
            f"format {manifest['format']}, objective {manifest['objective']}, seq_len {manifest['seq_len']}, "
            f"seed {manifest['seed']}, bytes/token {manifest.get('bytes_per_token')}"
        )
    ]
    for split, entry in manifest["splits"].items():
        lines.append(
            f"  {split:<5} {entry['samples']:>12,} samples {entry['tokens']:>14,} tokens {len(entry['shards']):>5} shards"
        )
    rejected = ", ".join(f"{reason} {count:,}" for reason, count in documents["rejected"].items()) or "none"
    lines.append(f"documents: read {documents['read']:,}, kept {documents['kept']:,}, rejected: {rejected}")
    lines.append(
        f"tokenizer: {tokenizer['path']} ({tokenizer['vocab_size']:,} pieces, sha256 {tokenizer['sha256'][:12]}…, "
        f"specials {tokenizer['special_ids']})"
    )
    return lines


def iter_examples(directory: str, manifest: dict[str, Any], split: str) -> Iterator[Example]:
    """The examples of ``split`` in manifest order; a missing or damaged shard is a :class:`UserError`."""
    for shard in manifest["splits"][split]["shards"]:
        path = os.path.join(directory, shard["path"])
        try:
            with open(path, "rb") as handle:
                for chunk in iter_chunks(handle, path):
                    for i in range(len(chunk)):
                        yield chunk.example(i)
        except FileNotFoundError as error:
            raise UserError(f"shard {path} listed in the manifest is missing") from error
        except (ValueError, tarfile.TarError) as error:
            raise UserError(f"shard {path} is damaged: {error}") from error


def render_example(tokenizer: TextTokenizer, example: Example, objective: str, sep_id: int) -> str:
    """``[CLS] A [SEP] B [SEP]  (nsp: random)``; inner ``[SEP]`` tokens (document boundaries) shown."""

    def text(tokens: np.ndarray) -> str:
        ids = [int(token) for token in tokens]
        pieces, current = [], []
        for token in ids + [sep_id]:
            if token == sep_id:
                pieces.append(tokenizer.decode(current))
                current = []
            else:
                current.append(token)
        return " [SEP] ".join(pieces)

    rendered = f"[CLS] {text(example.tokens_a)} [SEP]"
    if len(example.tokens_b):
        rendered += f" {text(example.tokens_b)} [SEP]"
    label = LABEL_NAMES.get(objective, ("0", "1"))[int(bool(example.label))]
    return f"{rendered}  ({objective}: {label})"


def image_summary_lines(manifest: dict[str, Any]) -> list[str]:
    """An image manifest in a few lines: splits, images, bytes, shards, classes, rejects."""
    images = manifest["images"]
    lines = [f"format {manifest['format']}, image size {manifest['image_size']}, seed {manifest['seed']}"]
    for split, entry in manifest["splits"].items():
        lines.append(
            f"  {split:<5} {entry['samples']:>12,} images {entry['bytes'] / 2**20:>12,.1f} MiB "
            f"{len(entry['shards']):>5} shards"
        )
    rejected = ", ".join(f"{reason} {count:,}" for reason, count in images["rejected"].items()) or "none"
    lines.append(f"images: read {images['read']:,}, kept {images['kept']:,}, rejected: {rejected}")
    classes = manifest.get("classes") or []
    lines.append(f"classes ({len(classes)}): {', '.join(classes[:20])}{' …' if len(classes) > 20 else ''}")
    return lines


def iter_image_samples(directory: str, manifest: dict[str, Any], split: str) -> Iterator[str]:
    """One line per image sample of ``split``: key, class, pixel size and JPEG bytes."""
    from PIL import Image

    classes = manifest.get("classes") or []
    for shard in manifest["splits"][split]["shards"]:
        path = os.path.join(directory, shard["path"])
        try:
            for key, members in iter_tar_samples(path):
                jpeg = members[IMAGE_SUFFIX]
                width, height = Image.open(io.BytesIO(jpeg)).size
                label = int(members[LABEL_SUFFIX]) if LABEL_SUFFIX in members else None
                name = "unlabelled" if label is None else f"class {label} ({classes[label]})"
                yield f"{key}: {name}, {width}x{height}, {len(jpeg):,} bytes"
        except FileNotFoundError as error:
            raise UserError(f"shard {path} listed in the manifest is missing") from error
        except (KeyError, ValueError, OSError, IndexError, tarfile.TarError) as error:
            raise UserError(f"shard {path} is damaged: {error!r}") from error


def run_images(args: argparse.Namespace, manifest: dict[str, Any]) -> int:
    """`inspect` of an image shard directory."""
    print("\n".join(image_summary_lines(manifest)))
    if args.samples == 0:
        return 0
    print(f"\nfirst {args.samples} {args.split} images:")
    shown = 0
    for line in iter_image_samples(args.directory, manifest, args.split):
        if shown == args.samples:
            break
        print(f"[{shown}] {line}")
        shown += 1
    if shown == 0:
        print(f"  (split {args.split} holds no image)")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run `pretrain inspect`; the exit status."""
    if args.samples < 0:
        raise UserError(f"--samples {args.samples}: must be at least 0")
    if not os.path.isdir(args.directory):
        raise UserError(f"{args.directory}: not a directory")
    manifest = read_manifest(args.directory, expected_format=None)
    if manifest["format"] == IMAGE_FORMAT_NAME:
        return run_images(args, manifest)
    print("\n".join(summary_lines(manifest)))
    if args.samples == 0:
        return 0
    model_path = os.path.join(args.directory, manifest["tokenizer"]["path"])
    if not os.path.isfile(model_path):
        raise UserError(f"tokenizer copy {model_path} listed in the manifest is missing")
    with open(model_path, "rb") as handle:
        tokenizer = tokenizer_from_copy(tokenizer_kind(manifest, args.directory), handle.read(), model_path)
    sep_id = tokenizer_special_ids(manifest, args.directory).sep
    print(f"\nfirst {args.samples} {args.split} examples:")
    shown = 0
    for example in iter_examples(args.directory, manifest, args.split):
        if shown == args.samples:
            break
        total = len(example.tokens_a) + len(example.tokens_b)
        rendered = render_example(tokenizer, example, manifest["objective"], sep_id)
        print(f"[{shown}] {total} tokens: {rendered}")
        shown += 1
    if shown == 0:
        print(f"  (split {args.split} holds no example)")
    return 0
