"""`pretrain inspect`: a shard directory's manifest summary and a few examples decoded back to text.

pretrain inspect shards/
pretrain inspect shards/ --samples 10 --split val
"""

from __future__ import annotations

import argparse
import os
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from data_pipeline.errors import UserError
from data_pipeline.examples import SPLITS
from data_pipeline.shard_format import SEP_ID, Example, iter_chunks, load_manifest
from data_pipeline.tokenizer import load_processor

LABEL_NAMES = {"nsp": ("next", "random"), "sop": ("in order", "swapped"), "none": ("-", "-")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", help="a directory written by `pretrain prepare text`")
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


def render_example(processor: Any, example: Example, objective: str) -> str:
    """``[CLS] A [SEP] B [SEP]  (nsp: random)``; inner ``[SEP]`` tokens (document boundaries) shown."""

    def text(tokens: np.ndarray) -> str:
        ids = [int(token) for token in tokens]
        pieces, current = [], []
        for token in ids + [SEP_ID]:
            if token == SEP_ID:
                pieces.append(processor.Decode(current))
                current = []
            else:
                current.append(token)
        return " [SEP] ".join(pieces)

    rendered = f"[CLS] {text(example.tokens_a)} [SEP]"
    if len(example.tokens_b):
        rendered += f" {text(example.tokens_b)} [SEP]"
    label = LABEL_NAMES.get(objective, ("0", "1"))[int(bool(example.label))]
    return f"{rendered}  ({objective}: {label})"


def run(args: argparse.Namespace) -> int:
    if args.samples < 0:
        raise UserError(f"--samples {args.samples}: must be at least 0")
    if not os.path.isdir(args.directory):
        raise UserError(f"{args.directory}: not a directory")
    manifest = load_manifest(args.directory)
    print("\n".join(summary_lines(manifest)))
    if args.samples == 0:
        return 0
    model_path = os.path.join(args.directory, manifest["tokenizer"]["path"])
    if not os.path.isfile(model_path):
        raise UserError(f"tokenizer copy {model_path} listed in the manifest is missing")
    processor = load_processor(model_path)
    print(f"\nfirst {args.samples} {args.split} examples:")
    shown = 0
    for example in iter_examples(args.directory, manifest, args.split):
        if shown == args.samples:
            break
        total = len(example.tokens_a) + len(example.tokens_b)
        print(f"[{shown}] {total} tokens: {render_example(processor, example, manifest['objective'])}")
        shown += 1
    if shown == 0:
        print(f"  (split {args.split} holds no example)")
    return 0
