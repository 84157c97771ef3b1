"""The read stage of the `prepare text` job: input paths planned into byte ranges, read into documents."""

from __future__ import annotations

import bz2
import sys
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.pvalue import AsDict, TaggedOutput

from data_pipeline.beam_common import COUNT, REJECTS, ProgressReporter, tag_reject
from data_pipeline.rejects import Reject
from data_pipeline.text import ranges
from data_pipeline.text.multistream import count_pages, index_path, plan_indexed_ranges, stream_pages
from data_pipeline.text.range_readers import LINES, STREAMS, read_range, split_kind
from data_pipeline.text.ranges import ReadRange, count_before, count_newlines, plan_ranges
from data_pipeline.text.readers import ReaderOptions, read_records
from data_pipeline.text.shuffle import open_stored


class _ReadFileFn(beam.DoFn):
    """Stream one input file (or one range of a split file) through the readers: documents out,
    rejects to the dead-letter output, and the count of records read."""

    def __init__(self, reader: ReaderOptions) -> None:
        self.reader = reader
        self.documents = Metrics.counter("read", "documents")
        self.progress: ProgressReporter | None = None
        self.read = [0, 0]  # documents, characters read by this worker

    def setup(self) -> None:
        self.progress = ProgressReporter("read")

    def process(self, part: ReadRange, counts: dict[tuple[str, int], int]) -> Iterator[Any]:
        if part.is_whole:
            records = read_records(part.path, open_stored, self.reader)
        else:
            before = part.before if part.before is not None else count_before(counts, part.path, part.start)
            records = read_range(part.path, open_stored, self.reader, part, before)
        count = 0
        for record in records:
            count += 1
            if isinstance(record, Reject):
                yield tag_reject(record)
                continue
            self.documents.inc()
            self._report(len(record.text))
            yield record
        yield TaggedOutput(COUNT, count)

    def _report(self, characters: int) -> None:
        self.read[0] += 1
        self.read[1] += characters
        if self.progress is not None:
            self.progress.tick(lambda: f"{self.read[0]:,} documents, {self.read[1] / 1e6:,.1f} M characters")


class _CountFn(beam.DoFn):
    """A range of a split file -> ``((path, start), newlines or pages in it)``: where its ordinals begin."""

    def __init__(self, reader: ReaderOptions) -> None:
        self.reader = reader

    def process(self, part: ReadRange) -> Iterator[tuple[tuple[str, int], int]]:
        if part.is_whole or part.before is not None:
            return
        end = part.end or 0
        with open_stored(part.path) as handle:
            if split_kind(part.path, self.reader) == LINES:
                yield (part.path, part.start), count_newlines(handle, part.start, end)
            else:
                yield (part.path, part.start), count_pages(handle, part.start, end)


def plan_read_ranges(paths: list[str], reader: ReaderOptions, workers: int | None = None) -> list[ReadRange]:
    """What the read tasks read: a large splittable file in byte ranges, every other file whole.

    Ranges are ``ranges.RANGE_BYTES`` at most, and smaller (down to ``MIN_RANGE_BYTES``) when that
    gives ``workers`` fewer than two ranges each: enough read tasks that the documents need no
    rebalance through the runner. A multistream dump with its index beside it is cut at the streams
    the index lists, with the pages before each range; without the index its ranges find their
    streams themselves. The index of a dump is never read as an input of its own.
    """
    kinds = {path: split_kind(path, reader) for path in paths}
    # A dump's index given as an input too (a whole directory was) is its stream map, not text.
    indexes = {index_path(path) for path in paths if kinds[path] == STREAMS}
    for index in sorted(indexes & set(paths)):
        print(
            f"pretrain: {index}: a dump's stream index, used to split the dump, not read as text",
            file=sys.stderr,
        )
    paths = [path for path in paths if path not in indexes]
    splittable = [path for path in paths if kinds[path] is not None]
    sizes = {}
    if splittable:
        matches = FileSystems.match(splittable)
        sizes = {path: match.metadata_list[0].size_in_bytes for path, match in zip(splittable, matches)}
    range_bytes = ranges.RANGE_BYTES
    if workers and sizes:
        wanted = -(-sum(sizes.values()) // (2 * workers))
        range_bytes = max(min(ranges.MIN_RANGE_BYTES, range_bytes), min(range_bytes, wanted))
    planned: list[ReadRange] = []
    for path in paths:
        size = sizes.get(path, 0)
        index = index_path(path) if kinds[path] == STREAMS and size > range_bytes else None
        if index is not None and FileSystems.exists(index):
            with open_stored(index) as stored, bz2.open(stored) as lines:
                planned += plan_indexed_ranges(path, size, stream_pages(lines), range_bytes)
        else:
            planned += plan_ranges(path, size, path in sizes, range_bytes)
    return planned


class ReadDocuments(beam.PTransform):
    """Input paths -> :class:`Document` records, :class:`Reject` records and per-task record counts.

    A large uncompressed jsonl file or multistream wiki dump is read in byte ranges by several tasks
    (:mod:`~data_pipeline.text.ranges`, :mod:`~data_pipeline.text.multistream`); a first pass counts
    each range's newlines (pages), so that every record keeps its whole-file ordinal.
    """

    def __init__(self, paths: list[str], reader: ReaderOptions, workers: int | None = None) -> None:
        super().__init__()
        self.ranges = plan_read_ranges(paths, reader, workers)
        self.reader = reader

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.pvalue.DoOutputsTuple:
        parts = (
            pbegin
            | "Paths" >> beam.Create(self.ranges)
            # Spread the files over workers: Create alone would hand them all to one bundle.
            | "Spread" >> beam.Reshuffle()
        )
        counts = parts | "CountRecords" >> beam.ParDo(_CountFn(self.reader))
        return parts | "Read" >> beam.ParDo(_ReadFileFn(self.reader), counts=AsDict(counts)).with_outputs(
            REJECTS, COUNT, main="documents"
        )
