"""Labelled task data: csv/tsv/jsonl/parquet readers, label vocabularies, framing, batching.

Rows are named in errors the way an editor finds them: ``line N`` (the physical line, 1-based) in csv,
tsv and jsonl files, ``row N`` (1-based) in parquet files. Inputs are framed with the special ids of the
model's tokenizer (:class:`~data_pipeline.formats.text.SpecialIds`: from the export's config.json, or
the tokenizer itself): ``[CLS] A [SEP]`` or ``[CLS] A [SEP] B [SEP]`` with segment ids 0 for
``[CLS] A [SEP]`` and 1 for ``B [SEP]``. The defaults of :func:`frame` and :func:`collate` are the ids
of this project's SentencePiece tokenizers.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch

from data_pipeline.errors import UserError
from data_pipeline.formats.text import SENTENCEPIECE_SPECIAL_IDS, SpecialIds
from data_pipeline.text.tokenizer import SentencePieceTokenizer
from data_pipeline.text.tokenizer_kinds import TextTokenizer
from training.finetune.config import TaskConfig
from training.finetune.metrics import is_bio_tag

IGNORE_INDEX = -100
"""Label of positions without a target (special tokens, padding, non-first pieces of a word)."""
FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


@dataclass(frozen=True)
class Row:
    """One record of a data file and where it is (``line 7`` or ``row 3``), for error messages."""

    where: str
    values: dict[str, Any]


@dataclass
class TaskExample:
    """The task's fields of one row, before tokenisation."""

    where: str
    text: str = ""
    text_pair: str | None = None
    label: Any = None
    words: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)


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


def file_format(path: str) -> str:
    """``csv``, ``tsv``, ``jsonl`` or ``parquet`` from the file name."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise UserError(f"{path}: unknown data format {suffix!r}; expected one of {', '.join(FORMATS)}")
    return FORMATS[suffix]


def _read_text(path: str) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise UserError(f"{path}: cannot read: {error.strerror or error}") from error
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise UserError(f"{path} line {line}: not UTF-8 text ({error.reason})") from error


def _delimited_rows(path: str, delimiter: str) -> list[Row]:
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter, strict=True)
    rows: list[Row] = []
    try:
        header = next(reader, None)
        for fields in reader:
            if not fields:
                continue  # a blank line
            where = f"line {reader.line_num}"
            if len(fields) != len(header or []):
                raise UserError(
                    f"{path} {where}: unreadable row: {len(fields)} fields, the header has {len(header or [])}"
                )
            rows.append(Row(where, dict(zip(header or [], fields))))
    except csv.Error as error:
        raise UserError(f"{path} line {reader.line_num}: unreadable row: {error}") from error
    return rows


def _jsonl_rows(path: str) -> list[Row]:
    rows: list[Row] = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path} line {number}: unreadable row: not JSON ({error.msg})") from error
        if not isinstance(record, dict):
            raise UserError(
                f"{path} line {number}: unreadable row: expected a JSON object, got {line[:60]!r}"
            )
        rows.append(Row(f"line {number}", record))
    return rows


def _parquet_rows(path: str) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except (OSError, pa.ArrowException) as error:
        raise UserError(f"{path}: cannot read as parquet: {error}") from error
    return [Row(f"row {number}", record) for number, record in enumerate(records, start=1)]


def read_rows(path: str) -> list[Row]:
    """Every record of a csv, tsv, jsonl or parquet file.

    Raises:
        UserError: Unknown format, unreadable file or row (naming the line), or no rows at all.
    """
    kind = file_format(path)
    if kind == "parquet":
        rows = _parquet_rows(path)
    elif kind == "jsonl":
        rows = _jsonl_rows(path)
    else:
        rows = _delimited_rows(path, "," if kind == "csv" else "\t")
    if not rows:
        raise UserError(f"{path}: no rows (an empty file)")
    return rows


def _column(path: str, row: Row, column: str) -> Any:
    value = row.values.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        state = "is empty" if column in row.values else "is missing"
        raise UserError(
            f"{path} {row.where}: column {column!r} {state} (columns: {', '.join(map(str, row.values))})"
        )
    return value


def _word_list(path: str, row: Row, column: str, value: Any) -> list[str]:
    """A list column, or a whitespace-separated string (csv/tsv have no lists)."""
    words = value.split() if isinstance(value, str) else value
    if not isinstance(words, (list, tuple)) or not all(isinstance(word, str) for word in words):
        raise UserError(f"{path} {row.where}: column {column!r} must be a list of strings, got {value!r}")
    return list(words)


def _token_example(path: str, row: Row, task: TaskConfig) -> TaskExample:
    if row.values.get(task.tokens) is not None:
        words = _word_list(path, row, task.tokens, row.values[task.tokens])
    else:
        words = _word_list(path, row, task.text, _column(path, row, task.text))
    tags = _word_list(path, row, task.tags, _column(path, row, task.tags))
    if not words or len(words) != len(tags):
        raise UserError(f"{path} {row.where}: {len(words)} words but {len(tags)} tags")
    bad = [tag for tag in tags if not is_bio_tag(tag)]
    if bad:
        raise UserError(f"{path} {row.where}: tag {bad[0]!r} is not O, B-TYPE or I-TYPE")
    return TaskExample(row.where, words=words, tags=tags)


def _text(path: str, row: Row, column: str) -> str:
    value = _column(path, row, column)
    if not isinstance(value, str):
        raise UserError(f"{path} {row.where}: column {column!r} must be text, got {value!r}")
    return value


def task_example(path: str, row: Row, task: TaskConfig) -> TaskExample:
    """The fields ``task`` needs from one row.

    Raises:
        UserError: A missing or empty column, a non-text value, or words and tags of different lengths.
    """
    if task.type == "tokens":
        return _token_example(path, row, task)
    text_pair = None
    if task.type == "pair" or (task.type == "regression" and row.values.get(task.text_pair) is not None):
        text_pair = _text(path, row, task.text_pair)
    return TaskExample(row.where, _text(path, row, task.text), text_pair, _column(path, row, task.label))


def read_task_file(path: str, task: TaskConfig) -> list[TaskExample]:
    """Read a data file and take the task's fields of every row."""
    return [task_example(path, row, task) for row in read_rows(path)]


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
