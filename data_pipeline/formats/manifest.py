"""The ``manifest.json`` of a prepared shard directory: its keys, how it is built, the one reader and checks.

Building is a function of plain counts (no Beam, no I/O); :func:`read_manifest` reads the manifest
of a local directory, a ``manifest.json`` path, a filesystem URL or a ``pipe:`` location, and every
problem it finds is a :class:`ManifestError` naming the file and the key.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from data_pipeline.errors import UserError
from data_pipeline.formats.location import join_location, open_binary
from data_pipeline.formats.text import SENTENCE_TASKS, SpecialIds

MANIFEST_NAME = "manifest.json"
# Tokenised text shards (`pretrain prepare text`), see :mod:`data_pipeline.formats.text`.
FORMAT_NAME = "pretrain-chunked-v1"
# Image shards (`pretrain prepare images`), see :mod:`data_pipeline.formats.images`.
IMAGE_FORMAT_NAME = "pretrain-images-v1"
SPLITS = ("train", "val")
TOKENIZER_COPY = "tokenizer/spm.model"
# Where `prepare text` copies the tokenizer's files; the manifest's tokenizer.path names the main one.
TOKENIZER_DIR = "tokenizer"
# Tokenizer kinds a manifest may record; a manifest without ``tokenizer.kind`` is SentencePiece.
TOKENIZER_KINDS = ("sentencepiece", "wordpiece", "bpe", "unigram")
DEFAULT_TOKENIZER_KIND = "sentencepiece"
# What a path inside a manifest may hold: it is joined to the data directory, and for a ``pipe:``
# location it becomes part of a shell command, so only plain file-name characters are allowed.
SAFE_PATH = re.compile(r"[A-Za-z0-9._/-]+")

REQUIRED_MANIFEST_KEYS = ("format", "splits", "tokenizer", "seq_len", "objective", "seed", "documents")
REQUIRED_IMAGE_MANIFEST_KEYS = ("format", "splits", "classes", "image_size", "seed", "images", "documents")
# The keys each known format requires, and the command that writes it.
KNOWN_FORMATS = {
    FORMAT_NAME: (REQUIRED_MANIFEST_KEYS, "pretrain prepare text"),
    IMAGE_FORMAT_NAME: (REQUIRED_IMAGE_MANIFEST_KEYS, "pretrain prepare images"),
}


class ManifestError(UserError):
    """A manifest that is missing, unreadable or lacks a required field."""


# ------------------------------------------------------------------------------------------- reading


def manifest_location(location: str) -> str:
    """The manifest file of ``location``: itself when it names a ``.json`` file, else the one inside it."""
    return location if location.endswith(".json") else join_location(location, MANIFEST_NAME)


def read_manifest(location: str, expected_format: str | None = FORMAT_NAME) -> dict[str, Any]:
    """Read and check the manifest of a shard directory.

    Args:
        location: A local directory or ``manifest.json`` path, a filesystem URL or a ``pipe:CMD``
            location (of the directory or of the manifest file).
        expected_format: The format the caller reads; None accepts any known format. Defaults to
            ``FORMAT_NAME`` (tokenised text).

    Raises:
        ManifestError: No manifest, unreadable or invalid JSON, a missing required key, or another
            format than expected; the message names the file and the key.
    """
    source = manifest_location(location)
    command = KNOWN_FORMATS[expected_format][1] if expected_format else "pretrain prepare text|images"
    try:
        with open_binary(source) as stream:
            data = stream.read()
    except FileNotFoundError as error:
        raise ManifestError(f"no manifest at {source}: run `{command}` first") from error
    except (OSError, ValueError) as error:
        raise ManifestError(f"cannot read manifest {source}: {error}") from error
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ManifestError(f"manifest {source} is not valid JSON: {error}") from error
    check_format(manifest, source, expected_format)
    check_paths(manifest, source)
    return manifest


def check_format(manifest: Any, source: str, expected_format: str | None = FORMAT_NAME) -> None:
    """Check that ``manifest`` is an object of a known format (the expected one) with all its keys.

    Args:
        manifest: The parsed JSON.
        source: The manifest's location, for the messages.
        expected_format: As for :func:`read_manifest`. Defaults to ``FORMAT_NAME``.
    """
    if not isinstance(manifest, dict):
        raise ManifestError(f"manifest {source}: a JSON object expected, found {type(manifest).__name__}")
    found = manifest.get("format")
    # The keys of the format found (or, when that is unknown, of the one expected).
    required = KNOWN_FORMATS.get(found, KNOWN_FORMATS[expected_format or FORMAT_NAME])[0]
    missing = [key for key in required if key not in manifest]
    if missing:
        raise ManifestError(f"manifest {source} lacks keys {missing}")
    if found not in KNOWN_FORMATS or (expected_format is not None and found != expected_format):
        expected = expected_format or " or ".join(KNOWN_FORMATS)
        raise ManifestError(f"manifest {source}: format {found!r}, expected {expected!r}")


def check_relative_path(value: str, source: str, key: str) -> None:
    """Refuse a manifest path that could leave the data directory or read as more than a file name.

    The path must be relative and normalised (no ``..``, ``.``, empty or trailing component), of
    the characters in ``SAFE_PATH``, and no component may start with ``-`` (an option to a command).

    Args:
        value: The path as the manifest gives it.
        source: The manifest's location, for the message.
        key: The manifest key that holds it (``splits.train.shards[0].path``), for the message.

    Raises:
        ManifestError: Naming the manifest, the key and the value.
    """
    parts = value.split("/")
    if (
        SAFE_PATH.fullmatch(value) is None
        or value.startswith("/")
        or posixpath.normpath(value) != value
        or any(part in ("", ".", "..") or part.startswith("-") for part in parts)
    ):
        raise ManifestError(
            f"manifest {source}: {key} {value!r} is not a plain path inside the data directory "
            "(relative, normalised, no '..', only letters, digits and '._/-', no part starting with '-')"
        )


def check_paths(manifest: dict[str, Any], source: str) -> None:
    """Check every path the manifest lists (shards of each split, the tokenizer copy).

    Only string paths are checked here; a missing or mistyped one is :func:`check_split`'s and
    :func:`check_manifest`'s to report.
    """
    splits = manifest.get("splits")
    for split, entry in (splits.items() if isinstance(splits, dict) else ()):
        shards = entry.get("shards") if isinstance(entry, dict) else None
        for index, shard in enumerate(shards if isinstance(shards, list) else ()):
            if isinstance(shard, dict) and isinstance(shard.get("path"), str):
                check_relative_path(shard["path"], source, f"splits.{split}.shards[{index}].path")
    tokenizer = manifest.get("tokenizer")
    if isinstance(tokenizer, dict) and isinstance(tokenizer.get("path"), str):
        check_relative_path(tokenizer["path"], source, "tokenizer.path")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_split(manifest: dict[str, Any], source: str, split: str) -> None:
    """Check ``splits.<split>``: a non-empty shard list of paths and sample counts that add up."""
    splits = manifest["splits"]
    if not isinstance(splits, dict) or split not in splits:
        available = sorted(splits) if isinstance(splits, dict) else splits
        raise ManifestError(f"manifest {source}: no split {split!r} in splits (has {available})")
    shards = splits[split].get("shards")
    if not isinstance(shards, list) or not shards:
        raise ManifestError(
            f"manifest {source}: splits.{split}.shards must be a non-empty list, got {shards!r}"
        )
    for index, shard in enumerate(shards):
        if (
            not isinstance(shard, dict)
            or not isinstance(shard.get("path"), str)
            or not _is_count(shard.get("samples"))
        ):
            raise ManifestError(
                f"manifest {source}: splits.{split}.shards[{index}] needs a string path and a sample count, got {shard!r}"
            )
    listed = sum(shard["samples"] for shard in shards)
    if splits[split].get("samples") != listed:
        raise ManifestError(
            f"manifest {source}: splits.{split}.samples is {splits[split].get('samples')!r}, its shards hold {listed}"
        )


def check_manifest(manifest: dict[str, Any], source: str, split: str) -> None:
    """Check the fields a text loader relies on; raise ManifestError naming the key and value."""
    check_split(manifest, source, split)
    if not isinstance(manifest["seq_len"], int) or manifest["seq_len"] < 3:
        raise ManifestError(
            f"manifest {source}: seq_len must be an integer >= 3, got {manifest['seq_len']!r}"
        )
    if manifest["objective"] not in SENTENCE_TASKS:
        raise ManifestError(
            f"manifest {source}: objective {manifest['objective']!r} is not one of {SENTENCE_TASKS}"
        )
    tokenizer = manifest["tokenizer"]
    if (
        not isinstance(tokenizer, dict)
        or not isinstance(tokenizer.get("path"), str)
        or not _is_count(tokenizer.get("vocab_size"))
    ):
        raise ManifestError(f"manifest {source}: tokenizer needs a path and a vocab_size, got {tokenizer!r}")


def tokenizer_kind(manifest: Mapping[str, Any], source: str) -> str:
    """The manifest's ``tokenizer.kind``; ``sentencepiece`` when absent (manifests before other kinds).

    Raises:
        ManifestError: An unknown kind, naming the manifest and the value.
    """
    kind = manifest["tokenizer"].get("kind", DEFAULT_TOKENIZER_KIND)
    if kind not in TOKENIZER_KINDS:
        raise ManifestError(f"manifest {source}: tokenizer.kind {kind!r} is not one of {TOKENIZER_KINDS}")
    return str(kind)


def tokenizer_special_ids(manifest: Mapping[str, Any], source: str) -> SpecialIds:
    """The manifest's ``tokenizer.special_ids``: the ids the loader frames and masks with.

    Raises:
        ManifestError: Missing, or a special token without a valid id, naming the manifest.
    """
    ids = manifest["tokenizer"].get("special_ids")
    if not isinstance(ids, Mapping):
        raise ManifestError(f"manifest {source}: tokenizer.special_ids must be an object, got {ids!r}")
    try:
        return SpecialIds.from_tokens(ids, f"manifest {source}: tokenizer")
    except ValueError as error:
        raise ManifestError(str(error)) from error


def split_identity(manifest: dict[str, Any], split: str) -> str:
    """sha256 over the (path, samples, sha256) of a split's shards: what the order depends on."""
    listing = [
        [shard["path"], shard["samples"], shard.get("sha256")]
        for shard in manifest["splits"][split]["shards"]
    ]
    return hashlib.sha256(json.dumps(listing).encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------ building


def tokenizer_entry(
    sha256: str,
    vocab_size: int,
    special_ids: Mapping[str, int],
    kind: str = DEFAULT_TOKENIZER_KIND,
    path: str = TOKENIZER_COPY,
) -> dict[str, Any]:
    """The manifest's ``tokenizer`` section.

    Args:
        sha256: Hex sha256 of the main tokenizer file.
        vocab_size: Ids in the vocabulary, specials included.
        special_ids: ``{"[PAD]": id, ...}`` for every token of ``SPECIAL_TOKENS``.
        kind: One of ``TOKENIZER_KINDS``; recorded only when not ``sentencepiece``, so that
            SentencePiece manifests stay as they always were. Defaults to ``sentencepiece``.
        path: The main file's copy, relative to the data directory. Defaults to ``TOKENIZER_COPY``.
    """
    entry: dict[str, Any] = {
        "path": path,
        "sha256": sha256,
        "vocab_size": vocab_size,
        "special_ids": dict(special_ids),
    }
    if kind != DEFAULT_TOKENIZER_KIND:
        entry["kind"] = kind
    return entry


def split_entries(
    shards: Iterable[tuple[str, Mapping[str, Any]]], totals: Sequence[str] = ("samples", "tokens")
) -> dict[str, dict[str, Any]]:
    """``splits.<split>``: totals and the shard list (sorted by path) from ``(split, shard entry)``.

    Every split in ``SPLITS`` is present, with zero samples when it got no shard.

    Args:
        shards: ``(split, shard entry)`` pairs, any order.
        totals: The shard-entry fields summed per split. Defaults to samples and tokens (text shards).
    """
    splits: dict[str, dict[str, Any]] = {
        name: {**{total: 0 for total in totals}, "shards": []} for name in SPLITS
    }
    for split, stats in shards:
        entry = splits[split]
        for total in totals:
            entry[total] += int(stats[total])
        entry["shards"].append(dict(stats))
    for entry in splits.values():
        entry["shards"].sort(key=lambda stats: stats["path"])
    return splits


def document_counts(read: int, kept: int, rejected: Mapping[str, int]) -> dict[str, Any]:
    """``documents``: read, kept and rejects by reason; ``read == kept + sum(rejected)`` or ValueError.

    A mismatch means a record was lost or counted twice inside the job: a bug, never a user mistake.
    """
    if read != kept + sum(rejected.values()):
        raise ValueError(
            f"document counts do not add up: read {read}, kept {kept}, rejected {dict(rejected)}"
        )
    return {"read": read, "kept": kept, "rejected": {reason: rejected[reason] for reason in sorted(rejected)}}


def build_manifest(
    shards: Iterable[tuple[str, Mapping[str, Any]]],
    documents: Mapping[str, Any],
    tokenizer: Mapping[str, Any],
    seq_len: int,
    objective: str,
    seed: int,
    options: Mapping[str, Any],
) -> dict[str, Any]:
    """The manifest of a text shard directory.

    Args:
        shards: ``(split, ShardStats.to_json())`` of every written shard, any order.
        documents: :func:`document_counts`.
        tokenizer: :func:`tokenizer_entry`.
        seq_len: Sequence length including framing tokens.
        objective: One of ``SENTENCE_TASKS``.
        seed: The job seed.
        options: Every option the job ran with, Beam options included, as given by the user.
    """
    splits = split_entries(shards)
    tokens = sum(entry["tokens"] for entry in splits.values())
    shard_bytes = sum(stats["bytes"] for entry in splits.values() for stats in entry["shards"])
    return {
        "format": FORMAT_NAME,
        "splits": splits,
        "tokenizer": dict(tokenizer),
        "seq_len": seq_len,
        "objective": objective,
        "seed": seed,
        "documents": dict(documents),
        "tokens_per_split": {name: entry["tokens"] for name, entry in splits.items()},
        # Stored bytes per content token: what the shard format costs over the raw token ids.
        "bytes_per_token": round(shard_bytes / tokens, 4) if tokens else None,
        "options": dict(options),
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
        shards: ``(split, write_image_shard entry)`` of every shard, any order.
        documents: :func:`document_counts` of the images: read, kept, rejected by reason. Stored
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


def manifest_text(manifest: Mapping[str, Any]) -> str:
    """Canonical JSON (sorted keys, indent 2, final newline): same content, same bytes."""
    return json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
