"""Document splits and buckets, shard counts, exact de-duplication and the per-split document totals."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from numpy.typing import NDArray

from data_pipeline.text.examples import ExampleOptions

DOCUMENTS_PER_BUCKET = 1000


def split_of(doc_hash: bytes, val_fraction: float) -> str:
    """``val`` when the first 8 hash bytes, read as a fraction of 2**64, fall below ``val_fraction``.

    A function of the document alone, so a document stays in its split across runs and seeds.
    """
    return "val" if int.from_bytes(doc_hash[:8], "big") / 2**64 < val_fraction else "train"


def bucket_of(doc_hash: bytes, num_buckets: int) -> int:
    """The bucket of a document: its last 8 hash bytes modulo ``num_buckets`` (independent of the split)."""
    return int.from_bytes(doc_hash[8:16], "big") % num_buckets


def bucket_count(documents: int, documents_per_bucket: int = DOCUMENTS_PER_BUCKET) -> int:
    """Buckets for ``documents`` kept documents, so that a bucket holds about ``documents_per_bucket``."""
    return max(1, math.ceil(documents / documents_per_bucket))


def estimated_shard_bytes(samples: int, tokens: int, itemsize: int, chunk_sequences: int = 4096) -> int:
    """Approximate tar bytes for ``samples`` sequences of ``tokens`` tokens in total."""
    chunks = math.ceil(samples / chunk_sequences)
    # Per chunk: two tar headers (512 B each) plus two .npy headers (128 B) plus padding (~512 B).
    return tokens * itemsize + samples * 6 + chunks * 2048


def shard_count(estimated_bytes: int, shard_mb: float) -> int:
    """``max(1, ceil(estimated_bytes / shard_mb MiB))``."""
    return max(1, math.ceil(estimated_bytes / (shard_mb * 2**20)))


def planned_shards(
    document_tokens: int, dupe_factor: int, options: ExampleOptions, itemsize: int, shard_mb: float
) -> int:
    """Shards of a split, planned before its examples exist from the tokens of its kept documents.

    Each dupe pass turns about every document token into one example token, in sequences of about
    ``max_content_tokens``; the estimate only sets how many shards there are, never their content.
    """
    tokens = document_tokens * dupe_factor
    samples = math.ceil(tokens / options.max_content_tokens)
    return shard_count(estimated_shard_bytes(samples, tokens, itemsize), shard_mb)


def select_representatives(
    records: Iterable[tuple[bytes, str, int, bytes]],
) -> tuple[list[tuple[bytes, str, int, bytes]], list[tuple[bytes, str, int, bytes]]]:
    """Exact de-duplication: per hash keep the smallest ``(source, index)``; the rest are duplicates.

    Args:
        records: ``(doc_hash, source, index, payload)`` tuples in any order.

    Returns:
        ``(kept, duplicates)``, both sorted by ``(hash, source, index)``.
    """
    kept: list[tuple[bytes, str, int, bytes]] = []
    duplicates: list[tuple[bytes, str, int, bytes]] = []
    for record in sorted(records, key=lambda r: (r[0], r[1], r[2])):
        (duplicates if kept and kept[-1][0] == record[0] else kept).append(record)
    return kept, duplicates


# ------------------------------------------------------------------------------------- split totals

# Per split: the unique document hashes (``V16``, ascending) and the tokens of each document.
DocumentSummary = dict[str, tuple[NDArray[np.void], NDArray[np.int64]]]


def summarize_documents(records: Iterable[tuple[str, bytes, int]]) -> DocumentSummary:
    """``(split, document hash, tokens)`` records -> :data:`DocumentSummary` (copies counted once).

    About 24 bytes per unique document: what the job keeps to size the buckets and the shards, in
    place of the documents themselves.
    """
    hashes: dict[str, list[bytes]] = {}
    tokens: dict[str, list[int]] = {}
    for split, doc_hash, count in records:
        hashes.setdefault(split, []).append(doc_hash)
        tokens.setdefault(split, []).append(count)
    return merge_summaries(
        [{split: (_hash_array(hashes[split]), np.array(tokens[split], np.int64)) for split in hashes}]
    )


def _hash_array(hashes: Sequence[bytes]) -> NDArray[np.void]:
    width = len(hashes[0]) if hashes else 16
    return np.frombuffer(b"".join(hashes), np.dtype(f"V{width}"))


def merge_summaries(summaries: Iterable[DocumentSummary]) -> DocumentSummary:
    """The union of several summaries: a hash seen in more than one counts once."""
    parts: dict[str, list[tuple[NDArray[np.void], NDArray[np.int64]]]] = {}
    for summary in summaries:
        for split, part in summary.items():
            parts.setdefault(split, []).append(part)
    merged: DocumentSummary = {}
    for split, pieces in sorted(parts.items()):
        hashes = np.concatenate([hashes for hashes, _ in pieces])
        tokens = np.concatenate([tokens for _, tokens in pieces])
        unique, first = np.unique(hashes, return_index=True)
        merged[split] = (unique, tokens[first])
    return merged


def summary_totals(summary: DocumentSummary) -> dict[str, tuple[int, int]]:
    """``{split: (unique documents, their tokens)}`` for the splits that hold any document."""
    return {split: (len(hashes), int(tokens.sum())) for split, (hashes, tokens) in summary.items()}
