"""The bucket shuffle of `prepare text` through run files: spill the token blobs, size the splits,
partition every run by (split, bucket group).

The documents leave the runner at the spill: what the runner moves and groups from there on are
:class:`~data_pipeline.text.runs.Section` records and per-run document summaries, so no stage holds
the corpus in memory, on any runner.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.pvalue import AsSingleton, TaggedOutput
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils.windowed_value import WindowedValue

from data_pipeline.text import splits
from data_pipeline.text.codec import document_token_count
from data_pipeline.text.documents import TokenizedDocument
from data_pipeline.text.runs import (
    RUN_BYTES,
    BucketedDocument,
    Section,
    encode_document,
    read_documents,
    write_sections,
)

# Buckets (~1000 documents each) per group key of the bucket shuffle: few keys for the runner to
# group, one bucket at a time in memory.
BUCKETS_PER_GROUP = 32
# The output of the spill stage that carries the per-run document summaries.
SUMMARY = "summary"


def open_stored(path: str) -> Any:
    """The file as stored (the readers decompress it themselves)."""
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def write_run(temp_dir: str, kind: str, sections: list[tuple[Any, list[bytes]]]) -> list[tuple[Any, Section]]:
    """A new run file of ``sections`` under ``temp_dir``; a unique name, so a retried bundle never collides."""
    path = FileSystems.join(temp_dir, f"{kind}-{uuid.uuid4().hex}.run")
    with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as sink:
        return write_sections(sink, sections, path)


def in_global_window(value: Any) -> WindowedValue:
    """``value`` as ``finish_bundle`` must emit it: the job runs in the global window throughout."""
    return GlobalWindows.windowed_value(value)


class _SpillDocumentsFn(beam.DoFn):
    """Token blobs -> run files of about ``RUN_BYTES``: a :class:`Section` per run, and on the ``SUMMARY``
    output the run's :data:`~data_pipeline.text.splits.DocumentSummary`.

    The documents leave the runner here: what follows carries file sections, and the summaries (24
    bytes per document, combined before they reach the runner) from which the bucket and shard
    counts are derived.
    """

    def __init__(self, temp_dir: str, val_fraction: float) -> None:
        self.temp_dir = temp_dir
        self.val_fraction = val_fraction
        self.buffer: list[TokenizedDocument] = []
        self.size = 0

    def start_bundle(self) -> None:
        self.buffer, self.size = [], 0

    def process(self, record: TokenizedDocument) -> Iterator[Any]:
        self.buffer.append(record)
        self.size += len(record[3])
        if self.size >= RUN_BYTES:
            section, summary = self._flush()
            yield section
            yield TaggedOutput(SUMMARY, summary)

    def finish_bundle(self) -> Iterator[Any]:
        if self.buffer:
            section, summary = self._flush()
            yield in_global_window(section)
            yield TaggedOutput(SUMMARY, in_global_window(summary))

    def _flush(self) -> tuple[Section, splits.DocumentSummary]:
        records, self.buffer, self.size = self.buffer, [], 0
        encoded = [encode_document(BucketedDocument(0, *record)) for record in records]
        [(_, section)] = write_run(self.temp_dir, "documents", [(None, encoded)])
        summary = splits.summarize_documents(
            (splits.split_of(record[0], self.val_fraction), record[0], document_token_count(record[3]))
            for record in records
        )
        return section, summary


class _TotalsFn(beam.CombineFn):
    """Run summaries -> ``{split: (unique documents, tokens)}``."""

    def create_accumulator(self) -> splits.DocumentSummary:
        return {}

    def add_input(
        self, summary: splits.DocumentSummary, element: splits.DocumentSummary
    ) -> splits.DocumentSummary:
        return splits.merge_summaries([summary, element])

    def merge_accumulators(self, summaries: Iterable[splits.DocumentSummary]) -> splits.DocumentSummary:
        return splits.merge_summaries(summaries)

    def extract_output(self, summary: splits.DocumentSummary) -> dict[str, tuple[int, int]]:
        return splits.summary_totals(summary)


class _PartitionRunFn(beam.DoFn):
    """One document run -> a run file sorted by (split, bucket, hash, source, index), one section per
    (split, bucket group); out: ``((split, group), Section)``."""

    def __init__(self, temp_dir: str, val_fraction: float) -> None:
        self.temp_dir = temp_dir
        self.val_fraction = val_fraction

    def process(
        self, run: Section, totals: dict[str, tuple[int, int]]
    ) -> Iterator[tuple[tuple[str, int], Section]]:
        val_fraction = self.val_fraction
        keyed = []
        for document in read_documents(run, open_stored):
            split = splits.split_of(document.doc_hash, val_fraction)
            bucket = splits.bucket_of(document.doc_hash, splits.bucket_count(totals[split][0]))
            keyed.append((split, document._replace(bucket=bucket)))
        keyed.sort()
        groups: dict[tuple[str, int], list[bytes]] = {}
        for split, document in keyed:
            groups.setdefault((split, document.bucket // BUCKETS_PER_GROUP), []).append(
                encode_document(document)
            )
        yield from write_run(self.temp_dir, "buckets", list(groups.items()))


class SpillToBuckets(beam.PTransform):
    """Token blobs -> ``((split, bucket group), Section)`` records, and the split totals as a side input.

    ``expand`` returns ``(sections, totals)``: ``totals`` is ``AsSingleton`` of ``{split: (unique
    documents, tokens)}``, which sets the bucket count (``splits.bucket_count``) and the shard count.

    Args:
        temp_dir: This run's scratch directory (every worker must reach it).
        val_fraction: Share of documents in the val split.
    """

    def __init__(self, temp_dir: str, val_fraction: float) -> None:
        super().__init__()
        self.temp_dir = temp_dir
        self.val_fraction = val_fraction

    def expand(self, tokens: beam.PCollection) -> tuple[beam.PCollection, AsSingleton]:
        spill = _SpillDocumentsFn(self.temp_dir, self.val_fraction)
        runs = tokens | "Spill" >> beam.ParDo(spill).with_outputs(SUMMARY, main="runs")
        totals = AsSingleton(runs[SUMMARY] | "Totals" >> beam.CombineGlobally(_TotalsFn()))
        partition = _PartitionRunFn(self.temp_dir, self.val_fraction)
        return runs.runs | "Partition" >> beam.ParDo(partition, totals=totals), totals
