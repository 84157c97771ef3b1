"""Corpus readers: plain text, JSON lines, Parquet and MediaWiki XML, optionally gzip/bz2/zstd compressed.

Every reader streams with bounded memory and never raises for bad data: each input record comes out as
a ``Document`` or as a ``Reject`` whose ``reason`` is one of ``REJECT_REASONS``. The caller supplies the
``opener`` (Beam passes ``FileSystems.open``), so the same code reads local files and object stores.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, NamedTuple
from xml.etree import ElementTree

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from data_pipeline.errors import UserError
from data_pipeline.rejects import Reject
from data_pipeline.text.streams import (
    MAX_DOC_BYTES,
    PREVIEW_BYTES,
    READ_CHUNK,
    CountingStream,
    PeekedStream,
    Readable,
    append_capped,
    decompressed,
    is_seekable,
    iter_lines,
)
from data_pipeline.text.wikitext import clean_wikitext, iter_wiki_pages

PARQUET_BATCH_ROWS = 1024
PARQUET_SPOOL_BYTES = 64 * 1024 * 1024

FORMATS = ("txt", "jsonl", "parquet", "wiki")
TXT_DOC_MODES = ("file", "paragraph")
REJECT_REASONS = (
    "unreadable_file",  # offset None: the opener failed; payload: the error
    "empty_file",  # offset 0: nothing after decompression
    "corrupt_stream",  # offset: bytes of the stored (compressed) file read when the damage was found
    "corrupt_file",  # parquet: offset None if unreadable at open, else the first row not read
    "missing_column",  # parquet: offset None; payload lists the columns present
    "invalid_utf8",  # offset: record ordinal; payload: the record decoded with U+FFFD, first 64 KiB
    "too_long",  # offset: record ordinal; payload: the first 64 KiB of the record
    "malformed_json",  # offset: line number; payload: the line
    "missing_field",  # offset: record ordinal; payload: the line (jsonl) or "" (null parquet cell)
    "not_text",  # offset: record ordinal (jsonl) or None (parquet column of another type)
    "redirect",  # offset: page ordinal; payload: the page title
    "namespace",  # offset: page ordinal; payload: the page title
)
_COMPRESSIONS = {".gz": "gz", ".gzip": "gz", ".bz2": "bz2", ".zst": "zst", ".zstd": "zst"}
_EXTENSIONS = {
    ".txt": "txt",
    ".text": "txt",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".xml": "wiki",
}
# Wikipedia dump names, whatever follows ".xml": "enwiki-latest-pages-articles1.xml-p1p41242.bz2",
# "...-pages-articles-multistream.xml.bz2", "...pages-articles1.xml-p10p30302-shortened.bz2".
WIKI_DUMP_PATTERN = "*pages-articles*.xml*"
BOM = b"\xef\xbb\xbf"
_SURROGATE = re.compile("[\ud800-\udfff]")
# Errors a damaged compressed or XML stream raises while being read.
STREAM_ERRORS = (EOFError, OSError, zlib.error, zstandard.ZstdError, ElementTree.ParseError)


class Document(NamedTuple):
    """One input document (a named tuple: Beam encodes it compactly).

    Attributes:
        source: The input path or URL it came from.
        index: Ordinal of the record within that file, stable across runs: 0 for a txt file, the
            paragraph number, the 0-based line number of a jsonl file (blank lines count), the parquet
            row, or the ``<page>`` number of a wiki dump.
        text: Raw text; for a wiki page, the title, a blank line, and the wikitext cleaned of markup.
    """

    source: str
    index: int
    text: str


@dataclass(frozen=True)
class ReaderOptions:
    """How to read the inputs.

    Attributes:
        input_format: ``"txt"``, ``"jsonl"``, ``"parquet"`` or ``"wiki"``, overriding the file
            extension. Defaults to None (decided per file by ``detect_format``).
        txt_docs: ``"file"`` (a document per file) or ``"paragraph"`` (blank-line separated blocks).
            Defaults to ``"file"``.
        text_field: The key holding the text in a jsonl object. Defaults to ``"text"``.
        text_column: The Parquet column holding the text. Defaults to ``"text"``.
    """

    input_format: str | None = None
    txt_docs: str = "file"
    text_field: str = "text"
    text_column: str = "text"

    def __post_init__(self) -> None:
        if self.input_format is not None and self.input_format not in FORMATS:
            raise UserError(f"--input-format {self.input_format!r}: expected one of {', '.join(FORMATS)}")
        if self.txt_docs not in TXT_DOC_MODES:
            raise UserError(f"--txt-docs {self.txt_docs!r}: expected one of {', '.join(TXT_DOC_MODES)}")


def default_opener(path: str) -> IO[bytes]:
    """Open a local file as stored (still compressed)."""
    return open(path, "rb")


def compression_of(path: str) -> str | None:
    """The compression of ``path`` from its extension: ``"gz"``, ``"bz2"``, ``"zst"`` or None."""
    return _COMPRESSIONS.get(os.path.splitext(path)[1].lower())


def detect_format(path: str, options: ReaderOptions) -> str:
    """The input format of ``path``: ``options.input_format`` if set, else from the extension.

    The compression extension is ignored, so ``a.jsonl.gz`` is ``"jsonl"``; ``*.xml`` and every file
    named like a Wikipedia dump (``WIKI_DUMP_PATTERN``: ``*pages-articles1.xml-p1p41242.bz2``,
    ``*pages-articles-multistream.xml.bz2``) are ``"wiki"``.

    Raises:
        UserError: The extension names no known format and no ``input_format`` was given.
    """
    if options.input_format is not None:
        return options.input_format
    stem = path[: -len(os.path.splitext(path)[1])] if compression_of(path) else path
    extension = os.path.splitext(stem)[1].lower()
    if extension in _EXTENSIONS:
        return _EXTENSIONS[extension]
    if fnmatch.fnmatchcase(os.path.basename(path).lower(), WIKI_DUMP_PATTERN):
        return "wiki"
    known = ", ".join(sorted(_EXTENSIONS))
    raise UserError(
        f"{path}: cannot tell the input format from the extension {extension or '(none)'!r} "
        f"(known: {known}, optionally + .gz/.bz2/.zst); pass --input-format txt|jsonl|parquet|wiki"
    )


def read_records(
    path: str, opener: Callable[[str], IO[bytes]] = default_opener, options: ReaderOptions = ReaderOptions()
) -> Iterator[Document | Reject]:
    """Stream the documents of one input file, setting bad records aside as ``Reject``s.

    Args:
        path: The input path or URL, passed to ``opener`` and recorded as the ``source``.
        opener: Returns the raw binary stream of the file as stored; only its ``read`` is used, except
            that an uncompressed Parquet file is read in place when the stream is seekable. Defaults to
            ``default_opener`` (local files).
        options: Format and field choices. Defaults to ``ReaderOptions()``.

    Yields:
        ``Document``s and ``Reject``s in file order. Bad data never raises: a damaged stream yields
        every record read intact before the damage, then one ``corrupt_stream`` reject.

    Raises:
        UserError: The format cannot be told from the extension (see ``detect_format``).
    """
    input_format = detect_format(path, options)
    try:
        raw = opener(path)
    except Exception as error:  # noqa: BLE001 - object-store clients raise their own types, not OSError
        # Whatever the opener raises, the file is reported and the job goes on.
        yield Reject("unreadable_file", path, None, f"{type(error).__name__}: {error}")
        return
    with contextlib.closing(raw):
        yield from _read_stream(path, input_format, raw, options)


def _read_stream(
    path: str, input_format: str, raw: IO[bytes], options: ReaderOptions
) -> Iterator[Document | Reject]:
    """Decompress ``raw``, report an empty file, and hand the stream to the format's reader."""
    counted = CountingStream(raw)
    try:
        stream = decompressed(counted, compression_of(path))
        head = stream.read(READ_CHUNK)
        if not head:
            yield Reject("empty_file", path, 0, "")
            return
        if input_format in ("txt", "jsonl") and head.startswith(BOM):
            head = head[len(BOM) :]
        body = PeekedStream(head, stream)
        if input_format == "parquet":
            seekable = raw if compression_of(path) is None and is_seekable(raw) else None
            yield from _read_parquet(path, body, seekable, options)
        else:
            yield from _FORMAT_READERS[input_format](path, body, options)
    except STREAM_ERRORS as error:
        yield Reject("corrupt_stream", path, counted.bytes_read, f"{type(error).__name__}: {error}")


def _preview(data: bytes) -> str:
    """The first ``PREVIEW_BYTES`` of a record, undecodable bytes replaced, for a reject payload."""
    return data[:PREVIEW_BYTES].decode("utf-8", "replace")


def _text_record(path: str, index: int, data: bytes, too_long: bool) -> Document | Reject:
    """A txt document from its bytes: ``too_long`` and ``invalid_utf8`` are rejects."""
    if too_long:
        return Reject("too_long", path, index, _preview(data))
    try:
        return Document(path, index, data.decode("utf-8"))
    except UnicodeDecodeError:
        return Reject("invalid_utf8", path, index, _preview(data))


def _read_txt(path: str, stream: Readable, options: ReaderOptions) -> Iterator[Document | Reject]:
    """A txt file: one document, or one per blank-line separated paragraph."""
    if options.txt_docs == "paragraph":
        yield from _read_paragraphs(path, stream)
        return
    data = bytearray()
    while len(data) <= MAX_DOC_BYTES and (chunk := stream.read(READ_CHUNK)):
        data += chunk
    # The rest of an over-long file is never read: nothing in it could be kept.
    yield _text_record(path, 0, bytes(data), len(data) > MAX_DOC_BYTES)


def _read_paragraphs(path: str, stream: Readable) -> Iterator[Document | Reject]:
    """Documents of blank-line separated blocks, numbered from 0 in file order."""
    paragraph = bytearray()
    too_long = False
    index = 0
    for line, line_too_long in iter_lines(stream):
        if line.strip():
            if paragraph and not too_long:
                paragraph += b"\n"
            if line_too_long and not too_long:
                paragraph += line  # Only a preview of the line: enough for the payload.
                too_long = True
            too_long = append_capped(paragraph, line, too_long, MAX_DOC_BYTES)
            continue
        if paragraph or too_long:
            yield _text_record(path, index, bytes(paragraph), too_long)
            index += 1
            paragraph.clear()
            too_long = False
    if paragraph or too_long:
        yield _text_record(path, index, bytes(paragraph), too_long)


def read_jsonl(
    path: str, stream: Readable, options: ReaderOptions, first_line: int = 0
) -> Iterator[Document | Reject]:
    """One JSON object per line; blank lines are skipped, and the index is the 0-based line number."""
    for line_number, (line, too_long) in enumerate(iter_lines(stream), first_line):
        if too_long:
            yield Reject("too_long", path, line_number, _preview(line))
        elif line.strip():
            yield _json_record(path, line_number, line, options.text_field)


def _json_record(path: str, line_number: int, line: bytes, field: str) -> Document | Reject:
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError:
        return Reject("invalid_utf8", path, line_number, _preview(line))
    try:
        value = json.loads(decoded)
    except json.JSONDecodeError:  # Also raised for a line that is not JSON at all.
        return Reject("malformed_json", path, line_number, decoded)
    if not isinstance(value, dict) or field not in value:
        return Reject("missing_field", path, line_number, decoded)
    text = value[field]
    if not isinstance(text, str):
        return Reject("not_text", path, line_number, decoded)
    if _SURROGATE.search(text):  # "\ud800" escapes decode to text that cannot be encoded again.
        return Reject("invalid_utf8", path, line_number, decoded)
    return Document(path, line_number, text)


def _read_parquet(
    path: str, stream: Readable, seekable: IO[bytes] | None, options: ReaderOptions
) -> Iterator[Document | Reject]:
    """Rows of one Parquet column, read in batches; a non-seekable stream is spooled to disk first."""
    with contextlib.ExitStack() as stack:
        if seekable is not None:
            seekable.seek(0)
            source: IO[bytes] = seekable
        else:
            source = stack.enter_context(tempfile.SpooledTemporaryFile(max_size=PARQUET_SPOOL_BYTES))
            while chunk := stream.read(READ_CHUNK):
                source.write(chunk)
            source.seek(0)
        yield from _parquet_rows(path, source, options.text_column)


def _parquet_rows(path: str, source: IO[bytes], column: str) -> Iterator[Document | Reject]:
    row = 0
    try:
        parquet = pq.ParquetFile(source)
        names = parquet.schema_arrow.names
        if column not in names:
            yield Reject("missing_column", path, None, f"no column {column!r}; columns: {', '.join(names)}")
            return
        column_type = parquet.schema_arrow.field(column).type
        if not _is_text_type(column_type):
            yield Reject("not_text", path, None, f"column {column!r} has type {column_type}, not string")
            return
        if parquet.metadata.num_rows == 0:
            yield Reject("empty_file", path, 0, "")
            return
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[column]):
            for value in batch.column(0).to_pylist():
                yield _cell_record(path, row, value)
                row += 1
    except (pa.ArrowException, OSError) as error:
        yield Reject("corrupt_file", path, row if row else None, f"{type(error).__name__}: {error}")


def _is_text_type(column_type: pa.DataType) -> bool:
    return (
        pa.types.is_string(column_type)
        or pa.types.is_large_string(column_type)
        or pa.types.is_binary(column_type)
        or pa.types.is_large_binary(column_type)
    )


def _cell_record(path: str, row: int, value: str | bytes | None) -> Document | Reject:
    """A Parquet cell: null is ``missing_field``; binary cells must be UTF-8."""
    if value is None:
        return Reject("missing_field", path, row, "")
    data = value if isinstance(value, bytes) else None
    if data is not None:
        if len(data) > MAX_DOC_BYTES:
            return Reject("too_long", path, row, _preview(data))
        return _text_record(path, row, data, False)
    text = str(value)
    if len(text) * 4 > MAX_DOC_BYTES and len(text.encode("utf-8")) > MAX_DOC_BYTES:
        return Reject("too_long", path, row, _preview(text.encode("utf-8")))
    return Document(path, row, text)


def read_wiki(
    path: str, stream: Readable, options: ReaderOptions, first_ordinal: int = 0
) -> Iterator[Document | Reject]:
    """Articles of a MediaWiki XML export: the title, a blank line, then the cleaned text."""
    for page in iter_wiki_pages(stream, first_ordinal):
        if page.is_redirect:
            yield Reject("redirect", path, page.ordinal, page.title)
        elif not page.is_article:
            yield Reject("namespace", path, page.ordinal, page.title)
        elif len(page.wikitext) * 4 > MAX_DOC_BYTES and len(page.wikitext.encode("utf-8")) > MAX_DOC_BYTES:
            yield Reject("too_long", path, page.ordinal, _preview(page.wikitext.encode("utf-8")))
        else:
            yield Document(path, page.ordinal, page.title + "\n\n" + clean_wikitext(page.wikitext))


_FORMAT_READERS: dict[str, Callable[[str, Readable, ReaderOptions], Iterator[Document | Reject]]] = {
    "txt": _read_txt,
    "jsonl": read_jsonl,
    "wiki": read_wiki,
}
