"""What a fine-tuning run is given (the command-line options) and what it asks of a task kind."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn


@dataclass
class FinetuneOptions:
    """What the command line adds to the config."""

    model: str
    """Export directory, run directory, or ``none`` (random init)."""
    train_path: str
    """Labelled training file, or an image shard directory."""
    eval_path: str
    """Labelled evaluation file, or an image shard directory."""
    run_dir: Path
    """Where eval.json, best/, predictions.jsonl and the metrics go."""
    tokenizer: str | None = None
    """SentencePiece model for ``--model none`` (overrides the config's ``tokenizer``)."""


class Task(Protocol):
    """What the loop asks of a task kind (built before the process group: user errors surface first)."""

    model: nn.Module
    """The task model (encoder + head) with the freezing applied."""
    trainable: list[str]
    """Names of the parameters that train."""
    labels: list[str] | None
    train_rows: int
    eval_rows: int

    def batch(self, indices: Sequence[int], split: str, epoch: int, device: torch.device) -> dict[str, Any]:
        """Model inputs of rows ``indices`` of ``split`` (``train``: augmented per ``epoch``; ``eval``)."""
        ...

    def predictions(self, logits: torch.Tensor, indices: Sequence[int]) -> list[Any]:
        """Predictions of evaluation rows ``indices`` from their logits."""
        ...

    def score(self, predictions: list[Any]) -> tuple[dict[str, float], list[Any], list[Any]]:
        """Metrics, and predictions and labels as names (or values), of all evaluation rows."""
        ...

    def write_best(self, out_dir: Path, state: dict[str, torch.Tensor], facts: dict[str, Any]) -> None:
        """The export directory of the best epoch (rank 0)."""
        ...

    def describe(self) -> str:
        """The task's part of the start-up line."""
        ...
