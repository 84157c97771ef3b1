"""Pure evaluation metrics of the fine-tuning tasks (no torch): classification, regression and BIO spans."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

OUTSIDE_TAG = "O"


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Share of predictions equal to their label (0.0 for no rows)."""
    _check_lengths(predictions, labels)
    if not len(labels):
        return 0.0
    return float(np.mean(np.asarray(predictions) == np.asarray(labels)))


def _check_lengths(predictions: Sequence[object], labels: Sequence[object]) -> None:
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")


def _safe_divide(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, or 0.0 when the denominator is 0 (scikit-learn's zero_division=0)."""
    return numerator / denominator if denominator else 0.0


def _f1(correct: float, predicted: float, actual: float) -> float:
    precision, recall = _safe_divide(correct, predicted), _safe_divide(correct, actual)
    return _safe_divide(2 * precision * recall, precision + recall)


def macro_f1(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Unweighted mean of the per-class F1 over every class that occurs in the labels or the predictions.

    A class that is never predicted has precision 0/0, counted as 0, so its F1 is 0 (as scikit-learn's
    ``f1_score(average="macro", zero_division=0)``).
    """
    _check_lengths(predictions, labels)
    predicted, actual = np.asarray(predictions), np.asarray(labels)
    classes = sorted(set(predicted.tolist()) | set(actual.tolist()))
    if not classes:
        return 0.0
    scores = [
        _f1(
            float(np.sum((predicted == cls) & (actual == cls))),
            float(np.sum(predicted == cls)),
            float(np.sum(actual == cls)),
        )
        for cls in classes
    ]
    return float(np.mean(scores))


def mcc(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation coefficient, multi-class (Gorodkin's R_K, as scikit-learn computes it).

    Constant predictions (or constant labels) make the denominator 0; the value is then defined as 0.0,
    "no better than chance", which is what a classifier that always says the same thing deserves.
    """
    _check_lengths(predictions, labels)
    predicted, actual = np.asarray(predictions), np.asarray(labels)
    if not len(actual):
        return 0.0
    classes = sorted(set(predicted.tolist()) | set(actual.tolist()))
    index = {cls: position for position, cls in enumerate(classes)}
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)  # (actual, predicted)
    for truth, guess in zip(actual.tolist(), predicted.tolist()):
        confusion[index[truth], index[guess]] += 1
    true_counts, predicted_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    correct, samples = float(np.trace(confusion)), float(confusion.sum())
    covariance = correct * samples - float(true_counts @ predicted_counts)
    spread = math.sqrt(samples**2 - float(predicted_counts @ predicted_counts)) * math.sqrt(
        samples**2 - float(true_counts @ true_counts)
    )
    return _safe_divide(covariance, spread)


def pearson(predictions: Sequence[float], labels: Sequence[float]) -> float:
    """Pearson correlation; 0.0 when either side is constant (or there are fewer than 2 rows)."""
    _check_lengths(predictions, labels)
    x, y = np.asarray(predictions, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if len(x) < 2:
        return 0.0
    dx, dy = x - x.mean(), y - y.mean()
    return _safe_divide(float(dx @ dy), math.sqrt(float(dx @ dx) * float(dy @ dy)))


def average_ranks(values: Sequence[float]) -> NDArray[np.float64]:
    """1-based ranks with ties given the mean of the ranks they span: ``[10, 20, 20]`` -> ``[1, 2.5, 2.5]``."""
    array = np.asarray(values, dtype=np.float64)
    order = np.argsort(array, kind="stable")
    ranks = np.empty(len(array), dtype=np.float64)
    start = 0
    while start < len(order):
        stop = start
        while stop + 1 < len(order) and array[order[stop + 1]] == array[order[start]]:
            stop += 1
        ranks[order[start : stop + 1]] = (start + stop) / 2 + 1
        start = stop + 1
    return ranks


def spearman(predictions: Sequence[float], labels: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson of the tie-averaged ranks); 0.0 when either side is constant."""
    _check_lengths(predictions, labels)
    return pearson(average_ranks(predictions).tolist(), average_ranks(labels).tolist())


def is_bio_tag(tag: str) -> bool:
    """Whether ``tag`` is ``O``, ``B-TYPE`` or ``I-TYPE`` (TYPE non-empty)."""
    return tag == OUTSIDE_TAG or (len(tag) > 2 and tag[:2] in ("B-", "I-"))


def entity_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The entities of one BIO sequence as ``(type, start, end)`` with ``end`` exclusive.

    The conlleval reading: ``B-X`` always starts an entity; ``I-X`` continues an open ``X`` entity and
    otherwise (after ``O``, at the start, or after another type) starts a new one, so an ``I-`` without
    its ``B-`` is still an entity rather than a silently dropped one.

    Raises:
        ValueError: A tag that is not ``O``, ``B-TYPE`` or ``I-TYPE``.
    """
    spans: set[tuple[str, int, int]] = set()
    open_type, open_start = None, 0
    for position, tag in enumerate(list(tags) + [OUTSIDE_TAG]):
        if not is_bio_tag(tag):
            raise ValueError(f"tag {tag!r} at position {position}: expected O, B-TYPE or I-TYPE")
        prefix, kind = (tag[:2], tag[2:]) if tag != OUTSIDE_TAG else ("", None)
        continues = prefix == "I-" and kind == open_type
        if open_type is not None and not continues:
            spans.add((open_type, open_start, position))
            open_type = None
        if prefix == "B-" or (prefix == "I-" and not continues):
            open_type, open_start = kind, position
    return spans


def entity_scores(predictions: Sequence[Sequence[str]], labels: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level precision, recall and F1 over sentences: an entity counts only with exact type and span.

    Args:
        predictions: Predicted BIO tags, one list per sentence.
        labels: Gold BIO tags, the same shape.

    Returns:
        ``{"entity_precision", "entity_recall", "entity_f1"}``; each 0.0 when its denominator is 0.
    """
    _check_lengths(predictions, labels)
    correct = predicted = actual = 0
    for row, (guess, truth) in enumerate(zip(predictions, labels)):
        if len(guess) != len(truth):
            raise ValueError(f"sentence {row}: {len(guess)} predicted tags for {len(truth)} gold tags")
        guessed, gold = entity_spans(guess), entity_spans(truth)
        correct += len(guessed & gold)
        predicted += len(guessed)
        actual += len(gold)
    precision, recall = _safe_divide(correct, predicted), _safe_divide(correct, actual)
    return {
        "entity_precision": precision,
        "entity_recall": recall,
        "entity_f1": _safe_divide(2 * precision * recall, precision + recall),
    }


def classification_scores(predictions: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """``accuracy``, ``macro_f1`` and ``mcc`` of class-index predictions."""
    return {
        "accuracy": accuracy(predictions, labels),
        "macro_f1": macro_f1(predictions, labels),
        "mcc": mcc(predictions, labels),
    }


def regression_scores(predictions: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    """``pearson``, ``spearman`` and ``mse`` of real-valued predictions."""
    _check_lengths(predictions, labels)
    errors = np.asarray(predictions, dtype=np.float64) - np.asarray(labels, dtype=np.float64)
    return {
        "pearson": pearson(predictions, labels),
        "spearman": spearman(predictions, labels),
        "mse": float(np.mean(errors**2)) if len(errors) else 0.0,
    }
