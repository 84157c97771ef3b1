"""The `prepare text` Beam job: one composite per stage, thin DoFns over the pure functions they call.

read -> clean -> tokenise -> (split, bucket) -> de-dup + examples -> global shuffle -> shards
                                                                    rejects/<reason>.jsonl
                                                                    manifest.json
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.pvalue import AsDict, TaggedOutput
from apache_beam.utils.windowed_value import WindowedValue

from data_pipeline.beam_common import (
    COUNT,
    REJECTS,
    ProgressReporter,
    WriteManifest,
    WriteRejects,
    atomic_sink,
    make_pipeline,
    needs_rebalance,
    stored_path,
    tag_reject,
)
from data_pipeline.formats.manifest import build_manifest
from data_pipeline.formats.text import DEFAULT_CHUNK_SEQUENCES, token_dtype, write_chunks
from data_pipeline.rejects import Reject
from data_pipeline.text import examples as ex
from data_pipeline.text.codec import (
    document_token_count,
    encode_example_blobs,
    pack_example,
    pack_keyed_examples,
    sorted_example_blobs,
    unpack_document,
)
from data_pipeline.text.documents import CleanDocument, TokenizedDocument, clean_document, tokenize_texts
from data_pipeline.text.readers import ReaderOptions, read_records
from data_pipeline.text.tokenizer import load_processor

# Documents (and at most characters) per SentencePiece call: enough that the per-call cost vanishes,
# few enough to hold in memory.
TOKENIZE_BATCH = 64
TOKENIZE_BATCH_CHARS = 4_000_000


@dataclass(frozen=True)
class JobConfig:
    """Everything the stages need; plain data, pickled into the DoFns."""

    output: str
    """Output directory, local or any Beam filesystem URL."""
    model_proto: bytes
    """The serialized SentencePiece model (shipped to workers inside the DoFns)."""
    vocab_size: int
    """Pieces in the model; picks the token dtype."""
    reader: ReaderOptions
    """Input format and field choices."""
    min_doc_chars: int
    """Shorter normalised documents are ``too_short`` rejects."""
    example: ex.ExampleOptions
    """Objective and sequence lengths."""
    dupe_factor: int
    """Example-building passes over every document."""
    seed: int
    """Seeds example building and the shuffle keys."""
    val_fraction: float
    """Share of documents (by hash) in the val split."""
    shard_mb: float
    """Target shard size in MiB."""

    @property
    def token_dtype(self) -> np.dtype:
        return token_dtype(self.vocab_size)


# ----------------------------------------------------------------------------------------------- read


class _ReadFileFn(beam.DoFn):
    """Stream one input file through the readers: documents out, rejects to the dead-letter output."""

    def __init__(self, reader: ReaderOptions) -> None:
        self.reader = reader
        self.documents = Metrics.counter("read", "documents")
        self.progress: ProgressReporter | None = None
        self.read = [0, 0]  # documents, characters read by this worker

    def setup(self) -> None:
        self.progress = ProgressReporter("read")

    def process(self, path: str) -> Iterator[Any]:
        def opener(name: str) -> Any:
            return FileSystems.open(name, compression_type=CompressionTypes.UNCOMPRESSED)

        records = 0
        for record in read_records(path, opener, self.reader):
            records += 1
            if isinstance(record, Reject):
                yield tag_reject(record)
                continue
            self.documents.inc()
            self._report(len(record.text))
            yield record
        yield TaggedOutput(COUNT, records)

    def _report(self, characters: int) -> None:
        self.read[0] += 1
        self.read[1] += characters
        if self.progress is not None:
            self.progress.tick(lambda: f"{self.read[0]:,} documents, {self.read[1] / 1e6:,.1f} M characters")


class ReadDocuments(beam.PTransform):
    """Input paths -> :class:`Document` records, :class:`Reject` records and per-file record counts."""

    def __init__(self, paths: list[str], reader: ReaderOptions) -> None:
        super().__init__()
        self.paths = paths
        self.reader = reader

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.pvalue.DoOutputsTuple:
        return (
            pbegin
            | "Paths" >> beam.Create(self.paths)
            # Spread the files over workers: Create alone would hand them all to one bundle.
            | "Spread" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(_ReadFileFn(self.reader)).with_outputs(REJECTS, COUNT, main="documents")
        )


# ------------------------------------------------------------------------------------ clean, tokenise


class _CleanFn(beam.DoFn):
    def __init__(self, min_doc_chars: int) -> None:
        self.min_doc_chars = min_doc_chars

    def process(self, document: tuple[str, int, str]) -> Iterator[Any]:
        cleaned = clean_document(*document, self.min_doc_chars)
        yield tag_reject(cleaned) if isinstance(cleaned, Reject) else cleaned


class _TokenizeFn(beam.DoFn):
    """Sentence-split and encode documents in batches (``TOKENIZE_BATCH``); one model per DoFn instance.

    Documents wait in a batch (with their own timestamp, window and pane) until it is full or the
    bundle ends; every output is a function of its document alone, so batching changes no byte of the
    job.
    """

    def __init__(self, model_proto: bytes, dtype: np.dtype) -> None:
        self.model_proto = model_proto
        self.dtype = dtype
        self.processor: Any = None
        self.batch: list[WindowedValue] = []
        self.batch_chars = 0

    def setup(self) -> None:
        self.processor = load_processor(model_proto=self.model_proto)

    def start_bundle(self) -> None:
        self.batch, self.batch_chars = [], 0

    def process(
        self, document: CleanDocument, held: Any = beam.DoFn.WindowedValueParam
    ) -> Iterator[WindowedValue]:
        self.batch.append(held)
        self.batch_chars += len(document[3])  # the text
        if len(self.batch) >= TOKENIZE_BATCH or self.batch_chars >= TOKENIZE_BATCH_CHARS:
            yield from self._flush()

    def finish_bundle(self) -> Iterator[WindowedValue]:
        yield from self._flush()

    def _flush(self) -> Iterator[WindowedValue]:
        batch, self.batch, self.batch_chars = self.batch, [], 0
        blobs = tokenize_texts(self.processor, [held.value[3] for held in batch], self.dtype)
        for held, blob in zip(batch, blobs):
            doc_hash, source, index, _ = held.value
            yield held.with_value(TokenizedDocument(doc_hash, source, index, blob))


class CleanDocuments(beam.PTransform):
    """Documents -> normalised ``(hash, source, index, text)`` and ``too_short`` reject records.

    Exact de-duplication by hash happens later, inside each bucket of ``BuildExamples``: every copy
    of a text falls in the same bucket, so the text needs no shuffle of its own.
    """

    def __init__(self, min_doc_chars: int) -> None:
        super().__init__()
        self.min_doc_chars = min_doc_chars

    def expand(self, documents: beam.PCollection) -> beam.pvalue.DoOutputsTuple:
        return documents | "Clean" >> beam.ParDo(_CleanFn(self.min_doc_chars)).with_outputs(
            REJECTS, main="clean"
        )


class TokenizeDocuments(beam.PTransform):
    """Clean documents -> ``(hash, source, index, token blob)``: sentences, one encode call per batch."""

    def __init__(self, model_proto: bytes, dtype: np.dtype) -> None:
        super().__init__()
        self.model_proto = model_proto
        self.dtype = dtype

    def expand(self, documents: beam.PCollection) -> beam.PCollection:
        return documents | "Tokenize" >> beam.ParDo(_TokenizeFn(self.model_proto, self.dtype))


# ------------------------------------------------------------------------------- de-dup and examples


def _add_pair(left: Iterable[tuple[int, int]]) -> tuple[int, int]:
    samples = tokens = 0
    for count, size in left:
        samples += count
        tokens += size
    return samples, tokens


class _BuildBucketFn(beam.DoFn):
    """One bucket: exact de-dup, ``dupe_factor`` passes of example building, examples batched per shard."""

    def __init__(self, config: JobConfig) -> None:
        self.config = config

    def process(
        self,
        element: tuple[tuple[str, int], Iterable[TokenizedDocument]],
        totals: dict[str, tuple[int, int]],
    ) -> Iterator[Any]:
        (split, bucket), records = element
        kept, duplicates = ex.select_representatives(records)
        representative = {doc_hash: (source, index) for doc_hash, source, index, _ in kept}
        for doc_hash, source, index, _ in duplicates:
            kept_source, kept_index = representative[doc_hash]
            yield tag_reject(Reject("duplicate", source, index, f"same text as {kept_source}:{kept_index}"))
        yield TaggedOutput(COUNT, len(kept))
        config = self.config
        shards = ex.planned_shards(
            totals[split][1], config.dupe_factor, config.example, config.token_dtype.itemsize, config.shard_mb
        )
        documents = [unpack_document(blob) for _, _, _, blob in kept]
        hashes = [doc_hash for doc_hash, _, _, _ in kept]
        capped, capped_hashes = ex.capped_documents(documents, hashes, config.example)
        dtype = config.token_dtype
        per_shard: dict[int, list[tuple[int, bytes]]] = {}
        for dupe in range(config.dupe_factor):
            keyed = ex.build_pass_examples(
                capped, capped_hashes, config.example, config.seed, split, bucket, dupe
            )
            for sort_key, example in keyed:
                item = (sort_key, pack_example(example, dtype))
                per_shard.setdefault(sort_key % shards, []).append(item)
        for shard, items in sorted(per_shard.items()):
            yield ((split, shard), pack_keyed_examples(items))


class BuildExamples(beam.PTransform):
    """Token blobs -> ``((split, shard), examples batch)``, duplicate rejects and the kept count.

    Documents are grouped by (split, bucket of their hash): every copy of a text lands in the same
    bucket, so de-duplication and random-next sampling both need one bucket in memory, never the
    corpus. A side input of kept documents and tokens per split sets the bucket count (~1000
    documents each) and the shard count (``--shard-mb``); an example's shard is its sort key modulo
    that count, which makes the shard assignment a global shuffle.
    """

    def __init__(self, config: JobConfig) -> None:
        super().__init__()
        self.config = config

    def expand(self, tokens: beam.PCollection) -> beam.pvalue.DoOutputsTuple:
        val_fraction = self.config.val_fraction
        totals = (
            tokens
            | "SizeOfDocument"
            >> beam.Map(lambda r: (ex.split_of(r[0], val_fraction), r[0], document_token_count(r[3])))
            | "UniqueDocuments" >> beam.Distinct()
            | "PerSplit" >> beam.Map(lambda unique: (unique[0], (1, unique[2])))
            | "SumPerSplit" >> beam.CombinePerKey(_add_pair)
        )

        def bucket_key(record: TokenizedDocument, totals: dict[str, tuple[int, int]]) -> Any:
            split = ex.split_of(record[0], val_fraction)
            return (split, ex.bucket_of(record[0], ex.bucket_count(totals[split][0]))), record

        return (
            tokens
            | "KeyByBucket" >> beam.Map(bucket_key, totals=AsDict(totals))
            | "GroupBuckets" >> beam.GroupByKey()
            | "Build"
            >> beam.ParDo(_BuildBucketFn(self.config), totals=AsDict(totals)).with_outputs(
                REJECTS, COUNT, main="examples"
            )
        )


# ------------------------------------------------------------------------------------ shuffle, write


class _WriteShardFn(beam.DoFn):
    """Sort one shard's examples by key and write it under a temporary name, renamed when complete."""

    def __init__(self, config: JobConfig) -> None:
        self.config = config

    def process(self, element: tuple[tuple[str, int], Iterable[bytes]]) -> Iterator[Any]:
        (split, shard), batches = element
        ordered = sorted_example_blobs(batches)
        dtype = self.config.token_dtype
        # Chunks straight from the packed blobs: building an Example per sequence cost more than
        # the whole tar write.
        chunks = (
            encode_example_blobs(ordered[start : start + DEFAULT_CHUNK_SEQUENCES], dtype)
            for start in range(0, len(ordered), DEFAULT_CHUNK_SEQUENCES)
        )
        relative = f"{split}-{shard:06d}.tar"
        with atomic_sink(stored_path(self.config.output, relative)) as sink:
            stats = write_chunks(sink, relative, f"{split}-{shard:06d}", chunks)
        yield (split, stats.to_json())


class WriteShards(beam.PTransform):
    """Gather each shard's batches, sort its examples by key, write it: the global shuffle's last step."""

    def __init__(self, config: JobConfig) -> None:
        super().__init__()
        self.config = config

    def expand(self, batches: beam.PCollection) -> beam.PCollection:
        return (
            batches | "GroupShards" >> beam.GroupByKey() | "Write" >> beam.ParDo(_WriteShardFn(self.config))
        )


def build_pipeline(
    pipeline: beam.Pipeline,
    paths: list[str],
    config: JobConfig,
    static: dict[str, Any],
    rebalance: bool = False,
) -> None:
    """Add every stage of the job to ``pipeline``.

    Args:
        pipeline: An empty pipeline.
        paths: Input files, already expanded and sorted.
        config: The job configuration.
        static: Manifest fields known before the job runs (tokenizer, seq_len, objective, seed, options).
        rebalance: Reshuffle the documents after reading, for inputs of fewer files than workers.
            Defaults to False.
    """
    read = pipeline | "ReadDocuments" >> ReadDocuments(paths, config.reader)
    documents = read.documents
    if rebalance:
        # Fewer files than workers: spread the documents, or one worker would tokenise a whole file.
        documents = documents | "Rebalance" >> beam.Reshuffle()
    cleaned = documents | "CleanDocuments" >> CleanDocuments(config.min_doc_chars)
    tokens = cleaned.clean | "TokenizeDocuments" >> TokenizeDocuments(config.model_proto, config.token_dtype)
    short_rejects = cleaned[REJECTS]
    # Only the tokenizer needs the model: Beam bz2-compresses every pickled DoFn and every worker
    # unpacks it again, so the later stages get a copy of the config without the model.
    without_model = replace(config, model_proto=b"")
    built = tokens | "BuildExamples" >> BuildExamples(without_model)
    shards = built.examples | "WriteShards" >> WriteShards(without_model)
    rejects = (read[REJECTS], short_rejects, built[REJECTS]) | "AllRejects" >> beam.Flatten()
    reject_counts = rejects | "WriteRejects" >> WriteRejects(config.output)
    counts = {
        "read": read[COUNT] | "SumRead" >> beam.CombineGlobally(sum),
        "kept": built[COUNT] | "SumKept" >> beam.CombineGlobally(sum),
    }
    _ = {"shards": shards, "reject_counts": reject_counts, **counts} | "WriteManifest" >> WriteManifest(
        config.output, static, build_manifest
    )


def run_job(paths: list[str], config: JobConfig, static: dict[str, Any], beam_args: list[str]) -> None:
    """Build the job, run it to completion; a failed job raises what the runner raised."""
    pipeline, workers = make_pipeline(beam_args)
    build_pipeline(pipeline, paths, config, static, rebalance=needs_rebalance(len(paths), workers))
    pipeline.run().wait_until_finish()
