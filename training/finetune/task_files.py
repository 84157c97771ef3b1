"""Task data files: the rows of csv/tsv/jsonl/parquet files and the fields a task takes from each row."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_pipeline.errors import UserError
from training.finetune.config import TaskConfig
from training.finetune.metrics import is_bio_tag

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

    Rows are named in errors the way an editor finds them: ``line N`` (the physical line, 1-based) in
    csv, tsv and jsonl files, ``row N`` (1-based) in parquet files.

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
