"""A multistream wiki dump read in ranges of its bz2 streams gives exactly the pages of a sequential read."""

from __future__ import annotations

import bz2
from pathlib import Path

import numpy as np
import pytest
from fixtures_text import wiki_page

from data_pipeline.text import ranges
from data_pipeline.text.multistream import (
    first_stream_start,
    index_path,
    is_multistream_dump,
    plan_indexed_ranges,
    stream_pages,
)
from data_pipeline.text.range_readers import read_range, split_kind
from data_pipeline.text.ranges import ReadRange, count_before, plan_ranges
from data_pipeline.text.readers import ReaderOptions, default_opener, read_records

HEADER = (
    '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.11/" version="0.11" xml:lang="en">\n'
    "  <siteinfo>\n    <sitename>Testwiki</sitename>\n  </siteinfo>\n"
)
FOOTER = "</mediawiki>\n"
NAME = "testwiki-20240101-pages-articles-multistream.xml.bz2"


def page_text(rng: np.random.Generator, i: int) -> str:
    words = ["river", "stone", "light", "music", "window", "garden", "paper", "market", "winter"]
    sentences = [
        " ".join(rng.choice(words, 8)).capitalize() + f" {i}." for _ in range(int(rng.integers(6, 12)))
    ]
    return " ".join(sentences)


def write_dump(directory: Path, streams: int = 12, pages_per_stream: int = 3, index: bool = True) -> Path:
    """A dump of a header stream, ``streams`` page streams and a footer stream, with its index."""
    rng = np.random.default_rng(7)
    path = directory / NAME
    chunks = [bz2.compress(HEADER.encode())]
    offset, lines, page = len(chunks[0]), [], 0
    for _ in range(streams):
        pages = []
        for _ in range(pages_per_stream):
            title = f"Article {page}"
            if page % 5 == 3:
                pages.append(wiki_page(title, 0, "#REDIRECT [[Article 0]]", redirect="Article 0"))
            elif page % 7 == 4:
                pages.append(wiki_page(f"Talk:{title}", 1, "A talk page."))
            else:
                pages.append(wiki_page(title, 0, page_text(rng, page)))
            lines.append(f"{offset}:{page + 1}:{title}\n")
            page += 1
        chunks.append(bz2.compress("".join(pages).encode()))
        offset += len(chunks[-1])
    chunks.append(bz2.compress(FOOTER.encode()))
    path.write_bytes(b"".join(chunks))
    if index:
        Path(index_path(str(path))).write_bytes(bz2.compress("".join(lines).encode()))
    return path


def ranged(path: Path, parts: list[ReadRange]) -> list[object]:
    """Every range read on its own, with ordinals from the counts of the ranges before it."""
    from data_pipeline.text.multistream import count_pages

    counts = {}
    for part in parts:
        with open(path, "rb") as handle:
            counts[(part.path, part.start)] = count_pages(handle, part.start, part.end or 0)
    records: list[object] = []
    for part in parts:
        before = part.before if part.before is not None else count_before(counts, part.path, part.start)
        records += read_range(str(path), default_opener, ReaderOptions(), part, before)
    return records


def test_names_and_index_path() -> None:
    assert is_multistream_dump(NAME) and split_kind(NAME, ReaderOptions()) == "streams"
    assert not is_multistream_dump("enwiki-latest-pages-articles-multistream-index.txt.bz2")
    assert index_path("/d/" + NAME) == "/d/testwiki-20240101-pages-articles-multistream-index.txt.bz2"
    assert (
        index_path("enwiki-20240101-pages-articles-multistream1.xml-p1p41242.bz2")
        == "enwiki-20240101-pages-articles-multistream-index1.txt-p1p41242.bz2"
    )


@pytest.mark.parametrize("range_bytes", [1, 300, 1000, 4000, 10**6])
def test_stream_ranges_give_the_pages_of_a_sequential_read(tmp_path: Path, range_bytes: int) -> None:
    path = write_dump(tmp_path, index=False)
    whole = list(read_records(str(path)))
    assert len(whole) == 36
    parts = plan_ranges(str(path), path.stat().st_size, True, range_bytes)
    if parts[0].is_whole:
        return
    assert ranged(path, parts) == whole


@pytest.mark.parametrize("range_bytes", [1, 700, 3000])
def test_indexed_ranges_give_the_pages_of_a_sequential_read(tmp_path: Path, range_bytes: int) -> None:
    path = write_dump(tmp_path)
    with bz2.open(index_path(str(path))) as index:
        streams = stream_pages(index)
    assert [pages for _, pages in streams] == [3] * 12
    parts = plan_indexed_ranges(str(path), path.stat().st_size, streams, range_bytes)
    assert len(parts) > 1 and all(part.before is not None for part in parts)
    assert ranged(path, parts) == list(read_records(str(path)))


def test_first_stream_start_skips_a_magic_inside_a_stream(tmp_path: Path) -> None:
    path = tmp_path / "x-multistream.xml.bz2"
    first = bz2.compress(b"<mediawiki>" + b"BZh91AY&SY" * 50)  # the magic as plain text inside
    second = bz2.compress(b"<page></page>")
    path.write_bytes(first + b"BZh91AY&SY-garbage" + second)
    with open(path, "rb") as handle:
        assert first_stream_start(handle, 1) == len(first) + len(b"BZh91AY&SY-garbage")
        assert first_stream_start(handle, len(first) + len(b"BZh91AY&SY-garbage") + 1) == path.stat().st_size


@pytest.mark.parametrize("with_index", [True, False])
def test_the_job_writes_the_same_bytes_from_stream_ranges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_index: bool
) -> None:
    """Two workers, the dump read whole and in ranges of a few streams: byte-identical output."""
    from test_distributed import digests
    from test_pipeline import SEQ_LEN, train_tokenizer

    from data_pipeline.text.reading import plan_read_ranges
    from launch.cli import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    path = write_dump(corpus, streams=20, index=with_index)
    model = train_tokenizer(corpus, tmp_path / "tok")

    def prepare(output: Path) -> int:
        args = [
            "prepare",
            "text",
            str(corpus / "*"),
            "--tokenizer",
            str(model.parent),
            "--output",
            str(output),
        ]
        args += ["--seq-len", str(SEQ_LEN), "--val-fraction", "0.1", "--shard-mb", "0.01"]
        return main([*args, "--", "--direct_num_workers=2"])

    assert prepare(tmp_path / "whole") == 0
    monkeypatch.setattr(ranges, "RANGE_BYTES", 2000)
    inputs = [str(path), *([index_path(str(path))] if with_index else [])]  # as a directory gives them
    parts = plan_read_ranges(inputs, ReaderOptions())
    assert len(parts) > 2 and all((part.before is not None) == with_index for part in parts)
    assert prepare(tmp_path / "split") == 0
    assert digests(tmp_path / "split") == digests(tmp_path / "whole")
