"""Text tasks on the BERT encoder: the pre-trained source, the data, batches, predictions, scores, the export.

:class:`TextTask` is what the fine-tuning loop (:mod:`training.finetune.loop`) asks of a task kind
for ``classification``, ``pair``, ``regression`` and ``tokens``; image tasks are in
:mod:`training.finetune.images`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.errors import UserError
from data_pipeline.formats.text import SpecialIds
from data_pipeline.text.tokenizer_kinds import TextTokenizer, find_tokenizer_file, load_tokenizer
from training.finetune.base import FinetuneOptions
from training.finetune.config import FinetuneConfig, parse_freeze
from training.finetune.data import IGNORE_INDEX, Encoded, TaskData, collate, load_task_data
from training.finetune.heads import TaskModel, apply_freeze, load_encoder
from training.finetune.metrics import classification_scores, entity_scores, regression_scores
from training.finetune.subsets import class_balanced_subset
from training.methods.bert import bert_config_from_section
from training.models.bert import BertForPreTraining
from training.models.bert_config import BertConfig


@dataclass
class ModelSource:
    """Where the encoder comes from: its architecture, weights (None: random init) and tokenizer."""

    location: str
    """``--model`` as given (``none`` for the random-init baseline)."""
    model_config: BertConfig
    state_dict: dict[str, torch.Tensor] | None
    """Pre-trained weights under the pre-training names (tied aliases included), or None."""
    tokenizer_path: Path
    """The tokenizer's file: spm.model, tokenizer.json or a WordPiece vocab.txt."""
    tokenizer: TextTokenizer
    special_ids: SpecialIds
    """The ids inputs are framed with: the export's recorded ones, or the tokenizer's."""


def _tokenizer(path: str) -> tuple[Path, TextTokenizer]:
    """The tokenizer file at ``path`` (a file or a tokenizer directory) and the tokenizer it holds."""
    chosen, _ = find_tokenizer_file(path)
    return Path(chosen), load_tokenizer(chosen)


def _model_special_ids(model: str, tokenizer: TextTokenizer) -> SpecialIds:
    """The special ids an export's config.json records (checked against its tokenizer), else its own."""
    from training.export.bert import export_special_ids
    from training.export.files import CONFIG_FILE, read_export_config

    if Path(model, CONFIG_FILE).is_file():
        return export_special_ids(read_export_config(Path(model)), tokenizer)
    return tokenizer.special_ids


def resolve_source(model: str, tokenizer: str | None, config: FinetuneConfig) -> ModelSource:
    """Read ``--model``: an export or run directory (its own tokenizer), or ``none``.

    ``none`` builds the config's ``model:`` architecture with the vocabulary of ``--tokenizer`` (or the
    config's ``tokenizer``). With a pre-trained model the model's own tokenizer is used; a ``--tokenizer``
    that is a different file is refused rather than silently ignored.

    Raises:
        UserError: No tokenizer for ``none``, a tokenizer that disagrees with the model, or a
            ``task.max_seq_len`` beyond the model's position table.
    """
    max_len = config.task.max_seq_len
    if model == "none":
        if tokenizer is None:
            raise UserError(
                "--model none needs a tokenizer: pass --tokenizer PATH or set `tokenizer:` in the config"
            )
        path, loaded = _tokenizer(tokenizer)
        special = loaded.special_ids
        model_config = bert_config_from_section(
            config.model, loaded.vocab_size, max_len, next_sentence_head=False, pad_token_id=special.pad
        )
        return ModelSource(model, model_config, None, path, loaded, special)
    from training.export.bert_read import load_encoder_weights

    model_config, state_dict, model_tokenizer = load_encoder_weights(model)
    loaded = load_tokenizer(str(model_tokenizer))
    if tokenizer is not None and _tokenizer(tokenizer)[1].sha256 != loaded.sha256:
        raise UserError(
            f"--tokenizer {tokenizer}: differs from the tokenizer of --model {model} ({model_tokenizer})"
        )
    if max_len > model_config.max_position_embeddings:
        raise UserError(
            f"task.max_seq_len {max_len} exceeds the {model_config.max_position_embeddings} positions of --model {model}"
        )
    special = _model_special_ids(model, loaded)
    return ModelSource(model, model_config, state_dict, Path(model_tokenizer), loaded, special)


def write_task_export(
    out_dir: Path,
    task_state: dict[str, torch.Tensor],
    source: ModelSource,
    config: FinetuneConfig,
    labels: list[str] | None,
    facts: dict[str, Any],
) -> None:
    """An export directory of the fine-tuned model that ``--model`` and the exporter's readers accept.

    The encoder weights are the fine-tuned ``bert.*``; the pre-training heads (MLM, and the sentence
    head when the source had one) are carried over unchanged from the source (freshly initialised for
    ``none``), so the encoder part is a complete pre-training export. The task head's weights are added
    to the same model.safetensors under ``head.*``; config.json describes the task under ``finetune``.
    """
    from training.export.bert import TIED_ALIASES, retie, write_export

    if source.state_dict is not None:
        base, export_config = source.state_dict, source.model_config
    else:
        export_config = source.model_config
        base = BertForPreTraining(export_config).state_dict()
    full = {name: tensor for name, tensor in base.items() if name not in TIED_ALIASES}
    full.update({name: tensor for name, tensor in task_state.items() if name.startswith("bert.")})
    head = {
        name: tensor.float().contiguous() for name, tensor in task_state.items() if name.startswith("head.")
    }
    task = {
        "type": config.task.type,
        "labels": labels,
        "pooling": config.task.pooling,
        "max_seq_len": config.task.max_seq_len,
        "freeze": config.train.freeze,
        "head_weights": sorted(head),
        "columns": {
            key: getattr(config.task, key) for key in ("text", "text_pair", "label", "tokens", "tags")
        },
        "base_model": source.location,
        **facts,
    }
    card = {"source": f"fine-tuned from {source.location}", "metrics": facts}
    # The head is a top-level name beside bert./cls., which the writer stores as it is.
    write_export(
        out_dir,
        retie({**full, **head}),
        export_config,
        source.tokenizer_path,
        card=card,
        extra_config={"finetune": task},
    )


def decode_predictions(logits: torch.Tensor, batch: Sequence[Encoded], task_type: str) -> list[Any]:
    """Class indices, real values, or for ``tokens`` one tag index per word (truncated words: -1)."""
    if task_type == "regression":
        return logits.float().tolist()
    if task_type != "tokens":
        return logits.argmax(-1).tolist()
    best = logits.argmax(-1)  # (batch, seq)
    decoded = []
    for row, item in enumerate(batch):
        first_pieces = [pos for pos, label in enumerate(item.label) if label != IGNORE_INDEX]  # type: ignore[union-attr]
        tags = [int(best[row, pos]) for pos in first_pieces]
        decoded.append(tags + [-1] * (item.words - len(tags)))
    return decoded


def score(
    task_type: str, predictions: list[Any], data: TaskData
) -> tuple[dict[str, float], list[Any], list[Any]]:
    """Metrics of the evaluation predictions, and predictions and labels as names (or values)."""
    if task_type == "regression":
        labels = [float(item.label) for item in data.eval]  # type: ignore[arg-type]
        return regression_scores(predictions, labels), predictions, labels
    names = data.labels or []
    if task_type == "tokens":
        # Words cut off by truncation are predicted "O": they count as missed entities, not as absent.
        predicted = [[names[tag] if tag >= 0 else "O" for tag in row] for row in predictions]
        gold = [example.tags for example in data.eval_examples]
        return entity_scores(predicted, gold), predicted, gold
    gold_ids = [int(item.label) for item in data.eval]  # type: ignore[arg-type]
    scores = classification_scores(predictions, gold_ids)
    return scores, [names[index] for index in predictions], [names[index] for index in gold_ids]


def build_model(config: FinetuneConfig, source: ModelSource, data: TaskData) -> tuple[TaskModel, list[str]]:
    """The task model, its pre-trained weights loaded, with the freezing applied; and what trains."""
    task = config.task
    outputs = 1 if task.type == "regression" else len(data.labels or [])
    model = TaskModel(source.model_config, task.type, outputs, config.train.head_dropout, task.pooling)
    if source.state_dict is not None:
        load_encoder(model, source.state_dict, source.location)
    trainable = apply_freeze(model, parse_freeze(config.train.freeze))
    return model, trainable


LABELLED_TYPES = ("classification", "pair")
"""Task types whose training rows can be subsampled per class (``train.label_fraction``)."""


def subsample_train(data: TaskData, config: FinetuneConfig) -> TaskData:
    """The task data with a class-balanced share ``train.label_fraction`` of the training rows.

    Raises:
        UserError: A fraction below 1 for a task without class labels.
    """
    fraction = config.train.label_fraction
    if fraction >= 1.0:
        return data
    if config.task.type not in LABELLED_TYPES:
        raise UserError(
            f"train.label_fraction {fraction}: only {', '.join(LABELLED_TYPES)} and image tasks have classes "
            f"to sample from, not {config.task.type}"
        )
    labels = np.array([int(item.label) for item in data.train], dtype=np.int64)  # type: ignore[arg-type]
    keep = class_balanced_subset(labels, fraction, config.train.seed)
    return dataclasses.replace(data, train=[data.train[i] for i in keep])


class TextTask:
    """A text task: BERT source, encoded rows, the task model and the BERT-format export of the best epoch."""

    def __init__(self, config: FinetuneConfig, options: FinetuneOptions) -> None:
        if Path(options.train_path, "manifest.json").is_file():
            raise UserError(
                f"--train {options.train_path}: a shard directory; image shards need task.type image "
                f"(configs/finetune-images.yaml), task.type {config.task.type} reads labelled text files"
            )
        self.config = config
        self.source = resolve_source(options.model, options.tokenizer or config.tokenizer, config)
        source = self.source
        data = load_task_data(
            options.train_path, options.eval_path, source.tokenizer, config.task, source.special_ids
        )
        self.data = subsample_train(data, config)
        self.model, self.trainable = build_model(config, self.source, self.data)

    @property
    def labels(self) -> list[str] | None:
        """Class names (None for regression)."""
        return self.data.labels

    @property
    def train_rows(self) -> int:
        return len(self.data.train)

    @property
    def eval_rows(self) -> int:
        return len(self.data.eval)

    def batch(
        self, indices: Sequence[int], split: str, epoch: int, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Model inputs of rows ``indices`` of ``split`` (``train`` or ``eval``) on ``device``."""
        rows = self.data.train if split == "train" else self.data.eval
        tensors = collate([rows[i] for i in indices], self.config.task.type, self.source.special_ids.pad)
        return {key: value.to(device) for key, value in tensors.items()}

    def predictions(self, logits: torch.Tensor, indices: Sequence[int]) -> list[Any]:
        """Predictions of evaluation rows ``indices`` from their logits."""
        return decode_predictions(logits, [self.data.eval[i] for i in indices], self.config.task.type)

    def score(self, predictions: list[Any]) -> tuple[dict[str, float], list[Any], list[Any]]:
        """Metrics, and predictions and labels as names (or values), of all evaluation rows."""
        return score(self.config.task.type, predictions, self.data)

    def write_best(self, out_dir: Path, state: dict[str, torch.Tensor], facts: dict[str, Any]) -> None:
        """The export directory of the best epoch."""
        write_task_export(out_dir, state, self.source, self.config, self.data.labels, facts)

    def describe(self) -> str:
        """The task's part of the start-up line."""
        truncated = sum(item.truncated for item in self.data.train + self.data.eval)
        labels = len(self.data.labels) if self.data.labels else "regression"
        return (
            f"task {self.config.task.type} | model {self.source.location} | labels {labels} | "
            f"train rows {len(self.data.train)} | eval rows {len(self.data.eval)} | truncated rows {truncated}"
        )
