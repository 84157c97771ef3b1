"""Corpus readers: every format and compression, wiki dumps, and every kind of bad input."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import random
import tracemalloc
from pathlib import Path
from typing import IO

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from fixtures_text import EXPECTED_WIKI_RECORDS, WIKI_DUMP, multistream_parts, wiki_page

from data_pipeline.errors import UserError
from data_pipeline.rejects import Reject
from data_pipeline.text.readers import Document, ReaderOptions, compression_of, detect_format, read_records
from data_pipeline.text.streams import MAX_DOC_BYTES, PREVIEW_BYTES

COMPRESSORS = {
    "": lambda data: data,
    ".gz": gzip.compress,
    ".bz2": bz2.compress,
    ".zst": lambda data: zstandard.ZstdCompressor().compress(data),
}


def read(path: Path, **options: str) -> list[Document | Reject]:
    return list(read_records(str(path), options=ReaderOptions(**options)))


def summary(records: list[Document | Reject]) -> list[tuple[str, int | None, str]]:
    """(``doc`` or the reject reason, index or offset, text or payload) per record."""
    return [
        ("doc", r.index, r.text) if isinstance(r, Document) else (r.reason, r.offset, r.payload)
        for r in records
    ]


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(COMPRESSORS[path.suffix if path.suffix in COMPRESSORS else ""](data))
    return path


def random_lines(count: int, seed: int = 0) -> list[str]:
    """Lines of random words: text that compresses poorly, so compressed files span many blocks."""
    rng = random.Random(seed)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(4000)
    ]
    return [" ".join(rng.choice(words) for _ in range(12)) for _ in range(count)]


# --- format detection -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("a.txt", "txt"),
        ("gs://bucket/b.TXT.gz", "txt"),
        ("c.jsonl", "jsonl"),
        ("c.ndjson.zst", "jsonl"),
        ("d.parquet", "parquet"),
        ("e.xml", "wiki"),
        ("enwiki-latest-pages-articles-multistream.xml.bz2", "wiki"),
        ("enwiki-20240101-pages-articles1.xml-p1p41242.bz2", "wiki"),
        ("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2", "wiki"),
        ("gs://dumps/ENWIKI-LATEST-PAGES-ARTICLES27.XML-P1P2.BZ2", "wiki"),
        ("f.json", "jsonl"),
    ],
)
def test_detect_format_from_extension(path: str, expected: str) -> None:
    assert detect_format(path, ReaderOptions()) == expected


def test_detect_format_override_wins() -> None:
    assert detect_format("data.csv", ReaderOptions(input_format="txt")) == "txt"
    assert detect_format("data.jsonl", ReaderOptions(input_format="txt")) == "txt"


def test_detect_format_unknown_extension_names_path() -> None:
    with pytest.raises(UserError, match=r"corpus/data\.csv\.gz: cannot tell the input format.*'\.csv'"):
        detect_format("corpus/data.csv.gz", ReaderOptions())


def test_bad_options_are_user_errors() -> None:
    with pytest.raises(UserError, match="--input-format 'csv'"):
        ReaderOptions(input_format="csv")
    with pytest.raises(UserError, match="--txt-docs 'line'"):
        ReaderOptions(txt_docs="line")


@pytest.mark.parametrize(
    ("path", "expected"),
    [("a.gz", "gz"), ("a.jsonl.BZ2", "bz2"), ("a.zst", "zst"), ("a.zstd", "zst"), ("a.txt", None)],
)
def test_compression_of(path: str, expected: str | None) -> None:
    assert compression_of(path) == expected


# --- txt ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", list(COMPRESSORS))
def test_txt_file_mode_is_one_document(tmp_path: Path, suffix: str) -> None:
    path = write(tmp_path / f"doc.txt{suffix}", "First line.\n\nSecond paragraph, é.\n".encode())
    assert summary(read(path)) == [("doc", 0, "First line.\n\nSecond paragraph, é.\n")]


def test_txt_paragraph_mode_splits_on_blank_lines(tmp_path: Path) -> None:
    data = b"\xef\xbb\xbfOne a.\r\nOne b.\r\n\r\n \t\r\n\nTwo.\n\n\nThree"
    path = write(tmp_path / "doc.txt", data)
    assert summary(read(path, txt_docs="paragraph")) == [
        ("doc", 0, "One a.\nOne b."),
        ("doc", 1, "Two."),
        ("doc", 2, "Three"),
    ]


def test_txt_invalid_utf8_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.txt", b"caf\xe9 au lait")
    assert summary(read(path)) == [("invalid_utf8", 0, "caf\ufffd au lait")]


def test_txt_paragraph_invalid_utf8_rejects_only_that_paragraph(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.txt", b"good one\n\nbad \xff\xfe here\n\ngood two\n")
    assert summary(read(path, txt_docs="paragraph")) == [
        ("doc", 0, "good one"),
        ("invalid_utf8", 1, "bad \ufffd\ufffd here"),
        ("doc", 2, "good two"),
    ]


# --- jsonl --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", list(COMPRESSORS))
def test_jsonl_custom_field_and_compression(tmp_path: Path, suffix: str) -> None:
    lines = [json.dumps({"body": "alpha", "id": 1}), "", json.dumps({"body": "beta ✓"})]
    path = write(tmp_path / f"docs.jsonl{suffix}", ("\n".join(lines) + "\n").encode())
    assert summary(read(path, text_field="body")) == [("doc", 0, "alpha"), ("doc", 2, "beta ✓")]


def test_jsonl_bad_lines_are_rejected_by_reason(tmp_path: Path) -> None:
    lines = [
        b'{"text": "ok"}',
        b"{not json",
        b'["a list"]',
        b'{"title": "no text"}',
        b'{"text": 42}',
        b'{"text": "caf\xe9"}',
        b'{"text": "lone \\ud800 surrogate"}',
        b"   ",
        b'{"text": "last, no newline"}',
    ]
    path = write(tmp_path / "bad.jsonl", b"\n".join(lines))
    assert summary(read(path)) == [
        ("doc", 0, "ok"),
        ("malformed_json", 1, "{not json"),
        ("missing_field", 2, '["a list"]'),
        ("missing_field", 3, '{"title": "no text"}'),
        ("not_text", 4, '{"text": 42}'),
        ("invalid_utf8", 5, '{"text": "caf\ufffd"}'),
        ("invalid_utf8", 6, '{"text": "lone \\ud800 surrogate"}'),
        ("doc", 8, "last, no newline"),
    ]


def test_gzip_members_and_zstd_frames_concatenated(tmp_path: Path) -> None:
    first, second = b'{"text": "one"}\n', b'{"text": "two"}\n'
    gz = tmp_path / "multi.jsonl.gz"
    gz.write_bytes(gzip.compress(first) + gzip.compress(second))
    zst = tmp_path / "multi.jsonl.zst"
    compressor = zstandard.ZstdCompressor()
    zst.write_bytes(compressor.compress(first) + compressor.compress(second))
    for path in (gz, zst):
        assert summary(read(path)) == [("doc", 0, "one"), ("doc", 1, "two")]


# --- parquet ------------------------------------------------------------------------------------------


def write_parquet(path: Path, table: pa.Table, row_group_size: int = 2) -> Path:
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def test_parquet_custom_column_null_cells_and_row_groups(tmp_path: Path) -> None:
    table = pa.table({"id": [1, 2, 3, 4, 5], "body": ["a", None, "c", "d", "e"]})
    path = write_parquet(tmp_path / "t.parquet", table)
    assert summary(read(path, text_column="body")) == [
        ("doc", 0, "a"),
        ("missing_field", 1, ""),
        ("doc", 2, "c"),
        ("doc", 3, "d"),
        ("doc", 4, "e"),
    ]


def test_parquet_missing_column_lists_columns(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "t.parquet", pa.table({"id": [1], "body": ["a"]}))
    assert summary(read(path)) == [("missing_column", None, "no column 'text'; columns: id, body")]


def test_parquet_non_string_column_and_binary_cells(tmp_path: Path) -> None:
    numbers = write_parquet(tmp_path / "n.parquet", pa.table({"text": [1, 2]}))
    assert summary(read(numbers)) == [("not_text", None, "column 'text' has type int64, not string")]
    binary = write_parquet(
        tmp_path / "b.parquet", pa.table({"text": pa.array([b"ok", b"\xff"], pa.binary())})
    )
    assert summary(read(binary)) == [("doc", 0, "ok"), ("invalid_utf8", 1, "\ufffd")]


def test_parquet_compressed_and_not_seekable(tmp_path: Path) -> None:
    plain = write_parquet(tmp_path / "t.parquet", pa.table({"text": ["x", "y", "z"]}))
    compressed = write(tmp_path / "t.parquet.gz", plain.read_bytes())
    assert summary(read(compressed)) == [("doc", 0, "x"), ("doc", 1, "y"), ("doc", 2, "z")]

    class OneWay(io.RawIOBase):
        """A stream that can only be read forward, as some object stores give."""

        def __init__(self, data: bytes) -> None:
            self._data = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
            return self._data.readinto(buffer)

    records = read_records(str(plain), opener=lambda path: OneWay(Path(path).read_bytes()))  # type: ignore[arg-type]
    assert [r.text for r in records if isinstance(r, Document)] == ["x", "y", "z"]


def test_parquet_corrupt_and_empty(tmp_path: Path) -> None:
    corrupt = write(tmp_path / "c.parquet", b"PAR1 this is not a parquet file PAR1")
    [reject] = read(corrupt)
    assert (reject.reason, reject.offset) == ("corrupt_file", None)
    no_rows = write_parquet(tmp_path / "e.parquet", pa.table({"text": pa.array([], pa.string())}))
    assert summary(read(no_rows)) == [("empty_file", 0, "")]


# --- MediaWiki XML ------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".bz2", ".gz"])
def test_wiki_dump_articles_and_rejects(tmp_path: Path, suffix: str) -> None:
    path = write(tmp_path / f"enwiki-pages-articles.xml{suffix}", WIKI_DUMP.encode())
    assert summary(read(path)) == EXPECTED_WIKI_RECORDS


def test_wiki_multistream_bz2(tmp_path: Path) -> None:
    path = tmp_path / "enwiki-latest-pages-articles-multistream.xml.bz2"
    path.write_bytes(b"".join(bz2.compress(part.encode()) for part in multistream_parts()))
    assert summary(read(path)) == EXPECTED_WIKI_RECORDS


def test_shortened_split_dump_name_is_read_as_wiki(tmp_path: Path) -> None:
    # A real dump file name that README's `*pages-articles*.xml*.bz2` promises to recognise.
    name = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    path = write(tmp_path / name, WIKI_DUMP.encode())  # bz2-compressed by its suffix
    assert summary(read(path)) == EXPECTED_WIKI_RECORDS


def test_wiki_truncated_xml_yields_good_pages_then_corrupt_stream(tmp_path: Path) -> None:
    dump = WIKI_DUMP.encode()
    cut = dump.index(b"<title>Lyon</title>")
    path = write(tmp_path / "cut.xml", dump[:cut])
    records = summary(read(path))
    assert records[:-1] == EXPECTED_WIKI_RECORDS[:-1]
    assert records[-1][0] == "corrupt_stream"
    assert records[-1][1] == cut  # a plain file: every byte was read before the end was found


def test_wiki_without_ns_elements_uses_title_prefix(tmp_path: Path) -> None:
    old = WIKI_DUMP.replace("<ns>0</ns>", "").replace("<ns>1</ns>", "").replace("<ns>10</ns>", "")
    path = write(tmp_path / "old.xml", old.encode())
    assert summary(read(path)) == EXPECTED_WIKI_RECORDS


# --- damaged streams, empty and missing files -----------------------------------------------------------


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".zst"])
def test_truncated_stream_yields_intact_records_then_one_corrupt_stream(tmp_path: Path, suffix: str) -> None:
    lines = random_lines(6000)
    data = "".join(json.dumps({"text": line}) + "\n" for line in lines).encode()
    if suffix == ".bz2":  # 100 kB blocks, so the first half of the file holds whole blocks
        compressed = bz2.compress(data, compresslevel=1)
    else:
        compressed = COMPRESSORS[suffix](data)
    path = tmp_path / f"cut.jsonl{suffix}"
    path.write_bytes(compressed[: len(compressed) // 2])
    records = read(path)
    documents = [r for r in records if isinstance(r, Document)]
    rejects = [r for r in records if isinstance(r, Reject)]
    assert 0 < len(documents) < len(lines)
    assert [d.text for d in documents] == lines[: len(documents)]
    assert records[-1] is rejects[0] and len(rejects) == 1
    assert rejects[0].reason == "corrupt_stream"
    assert 0 < rejects[0].offset <= len(compressed) // 2  # type: ignore[operator]


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".zst"])
def test_garbage_compressed_file_is_corrupt_stream(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"junk.jsonl{suffix}"
    path.write_bytes(b"this was never compressed\n" * 10)
    [reject] = read(path)
    assert reject.reason == "corrupt_stream"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "name",
    [
        "empty.txt",
        "empty.jsonl",
        "empty.xml",
        "empty.parquet",
        "empty.txt.gz",
        "empty.jsonl.bz2",
        "empty.jsonl.zst",
    ],
)
def test_empty_file(tmp_path: Path, name: str) -> None:
    path = write(tmp_path / name, b"")
    assert summary(read(path)) == [("empty_file", 0, "")]


def test_missing_file_is_unreadable(tmp_path: Path) -> None:
    [reject] = read(tmp_path / "nope.jsonl")
    assert isinstance(reject, Reject)
    assert (reject.reason, reject.offset) == ("unreadable_file", None)
    assert "FileNotFoundError" in reject.payload and "nope.jsonl" in reject.payload


def test_opener_failure_is_unreadable() -> None:
    def refuse(path: str) -> IO[bytes]:
        raise PermissionError(f"403 Forbidden: {path}")

    assert summary(list(read_records("gs://b/x.txt", opener=refuse))) == [
        ("unreadable_file", None, "PermissionError: 403 Forbidden: gs://b/x.txt")
    ]


# --- over-long documents: rejected, memory bounded -------------------------------------------------------

HUGE_BYTES = 50 * 1024 * 1024


def write_huge_line(path: Path, prefix: bytes, suffix: bytes) -> None:
    """A 50 MB single line, written in pieces so the test itself never holds it."""
    piece = b"word " * (1024 * 1024 // 5)
    with path.open("wb") as file:
        file.write(prefix)
        for _ in range(HUGE_BYTES // len(piece)):
            file.write(piece)
        file.write(suffix)


def peak_memory_reading(path: Path, **options: str) -> tuple[list[tuple[str, int | None, str]], int]:
    tracemalloc.start()
    try:
        records = summary(read(path, **options))
        return records, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_huge_jsonl_line_is_too_long_and_memory_stays_bounded(tmp_path: Path) -> None:
    path = tmp_path / "huge.jsonl"
    write_huge_line(path, b'{"text": "', b'"}\n{"text": "after"}\n')
    records, peak = peak_memory_reading(path)
    assert [(reason, offset) for reason, offset, _ in records] == [("too_long", 0), ("doc", 1)]
    assert records[0][2].startswith('{"text": "word word') and len(records[0][2]) == PREVIEW_BYTES
    assert records[1][2] == "after"
    assert peak < 4 * MAX_DOC_BYTES


@pytest.mark.parametrize("txt_docs", ["file", "paragraph"])
def test_huge_txt_document_is_too_long_and_memory_stays_bounded(tmp_path: Path, txt_docs: str) -> None:
    path = tmp_path / "huge.txt"
    write_huge_line(path, b"", b"\n\nA short paragraph after it.\n")
    records, peak = peak_memory_reading(path, txt_docs=txt_docs)
    assert records[0][:2] == ("too_long", 0) and len(records[0][2]) == PREVIEW_BYTES
    if txt_docs == "paragraph":
        assert records[1:] == [("doc", 1, "A short paragraph after it.")]
    assert peak < 4 * MAX_DOC_BYTES


def test_over_long_parquet_cell_and_wiki_page_are_too_long(tmp_path: Path) -> None:
    big = "x" * (MAX_DOC_BYTES + 1)
    table = write_parquet(tmp_path / "big.parquet", pa.table({"text": [big, "ok"]}))
    assert [r[:2] for r in summary(read(table))] == [("too_long", 0), ("doc", 1)]
    dump = WIKI_DUMP.replace("</mediawiki>", wiki_page("Huge", 0, big) + "</mediawiki>")
    records = summary(read(write(tmp_path / "big.xml", dump.encode())))
    assert records[-1] == ("too_long", len(EXPECTED_WIKI_RECORDS), "x" * PREVIEW_BYTES)
