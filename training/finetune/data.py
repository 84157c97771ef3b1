"""Labelled task data: label vocabularies, framing, batching; the files are read by ``task_files``.

Inputs are framed with the special ids of the model's tokenizer
(:class:`~data_pipeline.formats.text.SpecialIds`: from the export's config.json, or the tokenizer
itself): ``[CLS] A [SEP]`` or ``[CLS] A [SEP] B [SEP]`` with segment ids 0 for ``[CLS] A [SEP]`` and
1 for ``B [SEP]``. The defaults of :func:`frame` and :func:`collate` are the ids of this project's
SentencePiece tokenizers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sentencepiece as spm
import torch

from data_pipeline.errors import UserError
from data_pipeline.formats.text import SENTENCEPIECE_SPECIAL_IDS, SpecialIds
from data_pipeline.text.tokenizer import SentencePieceTokenizer
from data_pipeline.text.tokenizer_kinds import TextTokenizer
from training.finetune.config import TaskConfig
from training.finetune.task_files import TaskExample, read_task_file
from training.models.bert_config import IGNORE_INDEX

"""Label of positions without a target (special tokens, padding, non-first pieces of a word)."""


@dataclass
class Encoded:
    """One framed input: token and segment ids plus the target.

    ``label`` is a class index (classification, pair), a float (regression), or for ``tokens`` one entry
    per position: the tag index at the first piece of each word, ``IGNORE_INDEX`` elsewhere.
    """

    input_ids: list[int]
    token_type_ids: list[int]
    label: int | float | list[int]
    truncated: bool = False
    words: int = 0
    """``tokens`` task: words in the row (words cut off by truncation are predicted ``O``)."""


def label_key(value: Any) -> str:
    """A class label as text, so that ``1`` (jsonl) and ``"1"`` (csv) are the same class."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _sort_key(name: str) -> tuple[int, float, str]:
    try:
        return (0, float(name), name)  # numeric labels in numeric order: 2 before 10
    except ValueError:
        return (1, 0.0, name)


def label_vocab(examples: Sequence[TaskExample], task_type: str) -> list[str]:
    """The sorted label names of the training file (BIO tags for ``tokens``; ``O`` always included)."""
    if task_type == "tokens":
        names = {"O"} | {tag for example in examples for tag in example.tags}
    else:
        names = {label_key(example.label) for example in examples}
    return sorted(names, key=_sort_key)


def _class_index(path: str, where: str, name: str, index: dict[str, int]) -> int:
    if name not in index:
        raise UserError(
            f"{path} {where}: label {name!r} does not occur in the training file "
            f"(known: {', '.join(list(index)[:20])})"
        )
    return index[name]


def _regression_label(path: str, example: TaskExample) -> float:
    try:
        value = float(example.label)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise UserError(f"{path} {example.where}: label {example.label!r} is not a finite number")
    return value


def frame(
    ids_a: list[int], ids_b: list[int] | None, max_len: int, special: SpecialIds = SENTENCEPIECE_SPECIAL_IDS
) -> tuple[list[int], list[int], bool]:
    """``[CLS] A [SEP]`` or ``[CLS] A [SEP] B [SEP]`` within ``max_len``, cutting the longer side first.

    Args:
        ids_a: Content ids of the first text.
        ids_b: Of the second text, or None.
        max_len: Longest framed input.
        special: The tokenizer's ids. Defaults to those of this project's SentencePiece tokenizers.

    Returns:
        (input ids, segment ids, whether anything was cut).
    """
    cls, sep = special.cls, special.sep
    if ids_b is None:
        budget = max_len - 2
        return [cls, *ids_a[:budget], sep], [0] * (min(len(ids_a), budget) + 2), len(ids_a) > budget
    a, b = list(ids_a), list(ids_b)
    budget = max_len - 3
    truncated = len(a) + len(b) > budget
    while len(a) + len(b) > budget:
        (a if len(a) >= len(b) else b).pop()
    return [cls, *a, sep, *b, sep], [0] * (len(a) + 2) + [1] * (len(b) + 1), truncated


def _encode_tokens(
    pieces_per_word: list[list[int]], tag_ids: list[int], max_len: int, special: SpecialIds
) -> tuple[list[int], list[int], bool]:
    """Word pieces framed by [CLS]/[SEP]; each word's tag at its first piece, -100 elsewhere."""
    input_ids, labels = [special.cls], [IGNORE_INDEX]
    truncated = False
    for pieces, tag in zip(pieces_per_word, tag_ids):
        pieces = pieces or [special.unk]  # a word that encodes to nothing still needs its tag position
        if len(input_ids) + len(pieces) > max_len - 1:
            truncated = True
            break
        input_ids += pieces
        labels += [tag] + [IGNORE_INDEX] * (len(pieces) - 1)
    return input_ids + [special.sep], labels + [IGNORE_INDEX], truncated


def as_text_tokenizer(tokenizer: TextTokenizer | spm.SentencePieceProcessor) -> TextTokenizer:
    """A :class:`TextTokenizer`; a loaded SentencePiece processor is wrapped (its specials checked)."""
    if isinstance(tokenizer, spm.SentencePieceProcessor):
        return SentencePieceTokenizer(tokenizer.serialized_model_proto(), "SentencePiece processor")
    return tokenizer


def encode_examples(
    path: str,
    examples: Sequence[TaskExample],
    tokenizer: TextTokenizer | spm.SentencePieceProcessor,
    labels: list[str] | None,
    task: TaskConfig,
    special: SpecialIds | None = None,
) -> list[Encoded]:
    """Tokenise and frame the examples of one file.

    Args:
        path: The file they came from (for errors).
        examples: Its rows.
        tokenizer: The model's tokenizer (or a loaded SentencePiece processor).
        labels: The training label vocabulary (None for regression).
        task: Task type, lengths and columns.
        special: The ids to frame with. Defaults to the tokenizer's own.

    Raises:
        UserError: A label or tag that is not in the training vocabulary, or a bad regression value.
    """
    tokenizer = as_text_tokenizer(tokenizer)
    special = special or tokenizer.special_ids
    index = {name: position for position, name in enumerate(labels or [])}
    encoded: list[Encoded] = []
    for example in examples:
        if task.type == "tokens":
            tag_ids = [_class_index(path, example.where, tag, index) for tag in example.tags]
            pieces = tokenizer.encode(example.words)
            ids, targets, cut = _encode_tokens(pieces, tag_ids, task.max_seq_len, special)
            encoded.append(Encoded(ids, [0] * len(ids), targets, cut, len(example.words)))
            continue
        if task.type == "regression":
            target: int | float = _regression_label(path, example)
        else:
            target = _class_index(path, example.where, label_key(example.label), index)
        ids_a = tokenizer.encode([example.text])[0]
        ids_b = None if example.text_pair is None else tokenizer.encode([example.text_pair])[0]
        ids, segments, cut = frame(ids_a, ids_b, task.max_seq_len, special)
        encoded.append(Encoded(ids, segments, target, cut))
    return encoded


def collate(
    batch: Sequence[Encoded], task_type: str, pad_id: int = SENTENCEPIECE_SPECIAL_IDS.pad
) -> dict[str, torch.Tensor]:
    """Pad a list of inputs to its longest one (with ``pad_id``, the tokenizer's [PAD]): the model's
    keyword arguments.

    Returns:
        ``input_ids``, ``attention_mask``, ``token_type_ids`` (batch, seq) and ``labels``: (batch,) long,
        (batch,) float for regression, or (batch, seq) long with -100 on padding for ``tokens``.
    """
    longest = max(len(item.input_ids) for item in batch)
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    segments = torch.zeros((len(batch), longest), dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, item in enumerate(batch):
        length = len(item.input_ids)
        input_ids[row, :length] = torch.tensor(item.input_ids)
        segments[row, :length] = torch.tensor(item.token_type_ids)
        mask[row, :length] = 1
    if task_type == "tokens":
        labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
        for row, item in enumerate(batch):
            labels[row, : len(item.input_ids)] = torch.tensor(item.label)
    elif task_type == "regression":
        labels = torch.tensor([float(item.label) for item in batch], dtype=torch.float32)  # type: ignore[arg-type]
    else:
        labels = torch.tensor([int(item.label) for item in batch], dtype=torch.long)  # type: ignore[call-overload]
    return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": segments, "labels": labels}


@dataclass
class TaskData:
    """Both files of a task, encoded, with the label names (None for regression)."""

    train: list[Encoded]
    eval: list[Encoded]
    eval_examples: list[TaskExample]
    labels: list[str] | None


def load_task_data(
    train_path: str,
    eval_path: str,
    tokenizer: TextTokenizer | spm.SentencePieceProcessor,
    task: TaskConfig,
    special: SpecialIds | None = None,
) -> TaskData:
    """Read, check and encode the training and evaluation files; labels come from the training file.

    ``special`` are the ids to frame with (the model's); defaults to the tokenizer's own.
    """
    train_examples = read_task_file(train_path, task)
    eval_examples = read_task_file(eval_path, task)
    labels = None if task.type == "regression" else label_vocab(train_examples, task.type)
    if labels is not None and task.type != "tokens" and len(labels) < 2:
        raise UserError(f"{train_path}: a {task.type} task needs at least 2 classes, found {labels}")
    return TaskData(
        encode_examples(train_path, train_examples, tokenizer, labels, task, special),
        encode_examples(eval_path, eval_examples, tokenizer, labels, task, special),
        eval_examples,
        labels,
    )
