"""Weighted k-nearest-neighbour monitor of representation quality (InstDisc, Wu et al. 2018; solo-learn).

Each query (a validation image's features) finds its ``k`` most cosine-similar entries of a
memory bank (the train split's features); neighbour ``j`` votes for its class with weight
``exp(s_j / temperature)``; the class with the largest total wins.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

from training.simclr.loss import gather_rows

DEFAULT_K = 200
DEFAULT_TEMPERATURE = 0.1


def knn_scores(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class scores of each query from its ``k`` nearest bank entries.

    Args:
        queries: (M, dim) features (normalised here).
        bank: (N, dim) features of the memory bank (normalised here).
        bank_labels: (N,) class index of each bank entry.
        num_classes: Number of classes.
        k: Neighbours per query (capped at N). Defaults to 200.
        temperature: Vote weight temperature. Defaults to 0.1.
        chunk_size: Queries per similarity matrix, bounding memory to chunk x N. Defaults to 1024.

    Returns:
        (M, num_classes) summed vote weights.
    """
    bank = F.normalize(bank.float(), dim=1)
    neighbours = min(k, bank.shape[0])
    scores = []
    for chunk in F.normalize(queries.float(), dim=1).split(chunk_size):
        similarity, index = (chunk @ bank.T).topk(neighbours, dim=1)  # (m, k)
        weights = (similarity / temperature).exp()
        votes = torch.zeros(chunk.shape[0], num_classes, device=chunk.device, dtype=weights.dtype)
        scores.append(votes.scatter_add_(1, bank_labels[index], weights))
    return torch.cat(scores)


def knn_accuracy(
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
) -> dict[str, float]:
    """Top-1 (and top-5 when there are more than 5 classes) kNN accuracy; see :func:`knn_scores`."""
    scores = knn_scores(queries, bank, bank_labels, num_classes, k, temperature)
    ranked = scores.argsort(dim=1, descending=True)
    result = {"knn_top1": (ranked[:, 0] == query_labels).float().mean().item()}
    if num_classes > 5:
        result["knn_top5"] = (ranked[:, :5] == query_labels[:, None]).any(dim=1).float().mean().item()
    return result


@torch.no_grad()
def collect_features(
    encode: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[dict[str, Any]],
    prepare: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every batch of this rank, then gathered from all ranks.

    Args:
        encode: Images -> (B, dim) features, e.g. ``model.encode`` (call ``model.eval()`` first).
        batches: Dicts with ``images`` (uint8) and ``labels``, e.g. from ``image_eval_batches``.
        prepare: uint8 images -> normalised float images on the model's device.

    Every rank must pass the same number of rows (``image_eval_batches`` gives equal slices).
    """
    features, labels = [], []
    for batch in batches:
        images = prepare(batch["images"])
        features.append(encode(images).float())
        labels.append(batch["labels"].to(images.device))
    return gather_rows(torch.cat(features)), gather_rows(torch.cat(labels))
