"""The ``manifest.json`` of a prepared shard directory, built from plain counts (no Beam, no I/O)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from data_pipeline.examples import SPLITS
from data_pipeline.shard_format import FORMAT_NAME

TOKENIZER_COPY = "tokenizer/spm.model"


def tokenizer_entry(sha256: str, vocab_size: int, special_ids: Mapping[str, int]) -> dict[str, Any]:
    """The manifest's ``tokenizer`` section; the model itself is copied to ``TOKENIZER_COPY``."""
    return {
        "path": TOKENIZER_COPY,
        "sha256": sha256,
        "vocab_size": vocab_size,
        "special_ids": dict(special_ids),
    }


def split_entries(
    shards: Iterable[tuple[str, Mapping[str, Any]]], totals: Sequence[str] = ("samples", "tokens")
) -> dict[str, dict[str, Any]]:
    """``splits.<split>``: totals and the shard list (sorted by path) from ``(split, ShardStats json)``.

    Every split in ``SPLITS`` is present, with zero samples when it got no shard.

    Args:
        shards: ``(split, shard stats)`` pairs, any order.
        totals: The shard-stats fields summed per split. Defaults to samples and tokens (text shards).
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
    """The whole manifest.

    Args:
        shards: ``(split, ShardStats.to_json())`` of every written shard, any order.
        documents: :func:`document_counts`.
        tokenizer: :func:`tokenizer_entry`.
        seq_len: Sequence length including framing tokens.
        objective: ``nsp``, ``sop`` or ``none``.
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


def manifest_text(manifest: Mapping[str, Any]) -> str:
    """Canonical JSON (sorted keys, indent 2, final newline): same content, same bytes."""
    return json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
