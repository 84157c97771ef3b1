"""The `prepare text` Beam job: one composite per stage, thin DoFns over the pure functions they call.

read -> clean -> tokenise -> (split, bucket) -> de-dup + examples -> global shuffle -> shards
                                                                    rejects/<reason>.jsonl
                                                                    manifest.json
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.pvalue import TaggedOutput
from apache_beam.utils.windowed_value import WindowedValue

from data_pipeline.beam_common import (
    COUNT,
    REJECTS,
    WriteManifest,
    WriteRejects,
    atomic_sink,
    make_pipeline,
    needs_rebalance,
    new_temp_dir,
    remove_temp_dirs,
    stored_path,
    tag_reject,
)
from data_pipeline.formats.manifest import DEFAULT_TOKENIZER_KIND, build_manifest
from data_pipeline.formats.text import DEFAULT_CHUNK_SEQUENCES, token_dtype, write_chunks
from data_pipeline.rejects import Reject
from data_pipeline.text import examples as ex
from data_pipeline.text.codec import encode_example_blobs, pack_example, unpack_document
from data_pipeline.text.documents import CleanDocument, TokenizedDocument, clean_document, tokenize_texts
from data_pipeline.text.readers import ReaderOptions
from data_pipeline.text.reading import ReadDocuments
from data_pipeline.text.runs import (
    RUN_BYTES,
    Section,
    documents_by_bucket,
    encode_example,
    merged_documents,
    merged_examples,
)
from data_pipeline.text.shuffle import SpillToBuckets, in_global_window, open_stored, write_run
from data_pipeline.text.splits import planned_shards, select_representatives
from data_pipeline.text.tokenizer_kinds import tokenizer_from_copy

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
    """The tokenizer's main file: spm.model or tokenizer.json bytes (shipped to workers inside the DoFns)."""
    vocab_size: int
    """Ids in the tokenizer's vocabulary; picks the token dtype."""
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
    temp_dir: str = ""
    """This run's own directory of run files (``run_job`` makes it under the output or ``--temp-dir``)."""
    tokenizer_kind: str = DEFAULT_TOKENIZER_KIND
    """What ``model_proto`` holds: ``sentencepiece``, ``wordpiece``, ``bpe`` or ``unigram``."""

    @property
    def token_dtype(self) -> np.dtype:
        return token_dtype(self.vocab_size)


# ------------------------------------------------------------------------------------ clean, tokenise


class _CleanFn(beam.DoFn):
    def __init__(self, min_doc_chars: int) -> None:
        self.min_doc_chars = min_doc_chars

    def process(self, document: tuple[str, int, str]) -> Iterator[Any]:
        cleaned = clean_document(*document, self.min_doc_chars)
        yield tag_reject(cleaned) if isinstance(cleaned, Reject) else cleaned


class _TokenizeFn(beam.DoFn):
    """Sentence-split and encode documents in batches (``TOKENIZE_BATCH``); one tokenizer per DoFn instance.

    Documents wait in a batch (with their own timestamp, window and pane) until it is full or the
    bundle ends; every output is a function of its document alone, so batching changes no byte of the
    job.
    """

    def __init__(self, model_proto: bytes, dtype: np.dtype, kind: str = DEFAULT_TOKENIZER_KIND) -> None:
        self.model_proto = model_proto
        self.dtype = dtype
        self.kind = kind
        self.processor: Any = None
        self.batch: list[WindowedValue] = []
        self.batch_chars = 0

    def setup(self) -> None:
        # One encoding thread per worker, as for SentencePiece: the job runs a worker per core already.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.processor = tokenizer_from_copy(self.kind, self.model_proto, "<prepare text job>")

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

    def __init__(self, model_proto: bytes, dtype: np.dtype, kind: str = DEFAULT_TOKENIZER_KIND) -> None:
        super().__init__()
        self.model_proto = model_proto
        self.dtype = dtype
        self.kind = kind

    def expand(self, documents: beam.PCollection) -> beam.PCollection:
        return documents | "Tokenize" >> beam.ParDo(_TokenizeFn(self.model_proto, self.dtype, self.kind))


# ------------------------------------------------------------------------------- de-dup and examples


class _BuildBucketFn(beam.DoFn):
    """Bucket by bucket: exact de-dup, ``dupe_factor`` passes of example building; the examples go to
    run files (one section per shard, sorted by key) of about ``RUN_BYTES``: out ``((split, shard), Section)``."""

    def __init__(self, config: JobConfig) -> None:
        self.config = config
        self.examples: dict[tuple[str, int], list[tuple[int, bytes]]] = {}
        self.size = 0

    def start_bundle(self) -> None:
        self.examples, self.size = {}, 0

    def process(
        self,
        element: tuple[tuple[str, int], Iterable[Section]],
        totals: dict[str, tuple[int, int]],
    ) -> Iterator[Any]:
        (split, _), sections = element
        for bucket, records in documents_by_bucket(merged_documents(sections, open_stored)):
            yield from self._build_bucket(split, bucket, records, totals)
            if self.size >= RUN_BYTES:
                yield from self._flush()

    def finish_bundle(self) -> Iterator[WindowedValue]:
        for item in self._flush():
            yield in_global_window(item)

    def _build_bucket(
        self, split: str, bucket: int, records: list[TokenizedDocument], totals: dict[str, tuple[int, int]]
    ) -> Iterator[Any]:
        kept, duplicates = select_representatives(records)
        representative = {doc_hash: (source, index) for doc_hash, source, index, _ in kept}
        for doc_hash, source, index, _ in duplicates:
            kept_source, kept_index = representative[doc_hash]
            yield tag_reject(Reject("duplicate", source, index, f"same text as {kept_source}:{kept_index}"))
        yield TaggedOutput(COUNT, len(kept))
        config = self.config
        shards = planned_shards(
            totals[split][1], config.dupe_factor, config.example, config.token_dtype.itemsize, config.shard_mb
        )
        documents = [unpack_document(blob) for _, _, _, blob in kept]
        capped, capped_hashes = ex.capped_documents(documents, [record[0] for record in kept], config.example)
        dtype = config.token_dtype
        for dupe in range(config.dupe_factor):
            keyed = ex.build_pass_examples(
                capped, capped_hashes, config.example, config.seed, split, bucket, dupe
            )
            for sort_key, example in keyed:
                blob = pack_example(example, dtype)
                self.examples.setdefault((split, sort_key % shards), []).append((sort_key, blob))
                self.size += len(blob)

    def _flush(self) -> list[tuple[tuple[str, int], Section]]:
        examples, self.examples, self.size = self.examples, {}, 0
        if not examples:
            return []
        # Each section sorted like the final shard: by key, and by blob on a tie of keys.
        sections = [
            (shard, [encode_example(key, blob) for key, blob in sorted(items)])
            for shard, items in sorted(examples.items())
        ]
        return write_run(self.config.temp_dir, "examples", sections)


class BuildExamples(beam.PTransform):
    """Token blobs -> ``((split, shard), Section of sorted examples)``, duplicate rejects and the kept count.

    Documents are grouped by (split, bucket of their hash): every copy of a text lands in the same
    bucket, so de-duplication and random-next sampling both need one bucket in memory, never the
    corpus. The unique documents and tokens per split set the bucket count (~1000 documents each)
    and the shard count (``--shard-mb``); an example's shard is its sort key modulo that count,
    which makes the shard assignment a global shuffle. Documents and examples travel through run
    files under ``temp_dir``; the runner only groups their sections, so no stage holds the corpus.
    """

    def __init__(self, config: JobConfig) -> None:
        super().__init__()
        self.config = config

    def expand(self, tokens: beam.PCollection) -> beam.pvalue.DoOutputsTuple:
        config = self.config
        sections, totals = tokens | "SpillToBuckets" >> SpillToBuckets(config.temp_dir, config.val_fraction)
        return (
            sections
            | "GroupBuckets" >> beam.GroupByKey()
            | "Build"
            >> beam.ParDo(_BuildBucketFn(config), totals=totals).with_outputs(REJECTS, COUNT, main="examples")
        )


# ------------------------------------------------------------------------------------ shuffle, write


def _batched(items: Iterator[bytes], size: int) -> Iterator[list[bytes]]:
    batch: list[bytes] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _WriteShardFn(beam.DoFn):
    """Merge one shard's sorted example sections and write it under a temporary name, renamed when complete."""

    def __init__(self, config: JobConfig) -> None:
        self.config = config

    def process(self, element: tuple[tuple[str, int], Iterable[Section]]) -> Iterator[Any]:
        (split, shard), sections = element
        ordered = (blob for _, blob in merged_examples(sections, open_stored))
        dtype = self.config.token_dtype
        # Chunks straight from the packed blobs: building an Example per sequence cost more than
        # the whole tar write.
        chunks = (encode_example_blobs(batch, dtype) for batch in _batched(ordered, DEFAULT_CHUNK_SEQUENCES))
        relative = f"{split}-{shard:06d}.tar"
        with atomic_sink(stored_path(self.config.output, relative)) as sink:
            stats = write_chunks(sink, relative, f"{split}-{shard:06d}", chunks)
        yield (split, stats.to_json())


class WriteShards(beam.PTransform):
    """Gather each shard's sections, merge its examples in key order, write it: the global shuffle's last step."""

    def __init__(self, config: JobConfig) -> None:
        super().__init__()
        self.config = config

    def expand(self, sections: beam.PCollection) -> beam.PCollection:
        return (
            sections | "GroupShards" >> beam.GroupByKey() | "Write" >> beam.ParDo(_WriteShardFn(self.config))
        )


def build_pipeline(
    pipeline: beam.Pipeline,
    paths: list[str],
    config: JobConfig,
    static: dict[str, Any],
    workers: int | None,
) -> None:
    """Add every stage of the job to ``pipeline``.

    Args:
        pipeline: An empty pipeline.
        paths: Input files, already expanded and sorted.
        config: The job configuration.
        static: Manifest fields known before the job runs (tokenizer, seq_len, objective, seed, options).
        workers: The worker count (None when only the cluster knows it). Fewer read tasks than it
            keeps busy (see ``needs_rebalance``) reshuffle the documents after reading. That holds the
            documents in the runner on the local runner: large inputs should be splittable files
            (:func:`~data_pipeline.text.reading.plan_read_ranges`) or many files.
    """
    reading = ReadDocuments(paths, config.reader, workers)
    read = pipeline | "ReadDocuments" >> reading
    documents = read.documents
    if needs_rebalance(len(reading.ranges), workers):
        # Fewer files than workers: spread the documents, or one worker would tokenise a whole file.
        documents = documents | "Rebalance" >> beam.Reshuffle()
    cleaned = documents | "CleanDocuments" >> CleanDocuments(config.min_doc_chars)
    tokens = cleaned.clean | "TokenizeDocuments" >> TokenizeDocuments(
        config.model_proto, config.token_dtype, config.tokenizer_kind
    )
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
    """Build the job, run it to completion; a failed job raises what the runner raised.

    The run files go to a new ``_tmp-<uuid>`` directory under ``config.temp_dir`` (the output
    directory when empty), deleted once the job succeeds; the scratch directories of crashed earlier
    runs there are deleted first.
    """
    base = config.temp_dir or config.output
    remove_temp_dirs(base)
    scratch = new_temp_dir(base)
    pipeline, workers = make_pipeline(beam_args)
    build_pipeline(pipeline, paths, replace(config, temp_dir=scratch), static, workers)
    pipeline.run().wait_until_finish()
    remove_temp_dirs(base, FileSystems.split(scratch)[1])
