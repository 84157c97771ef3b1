"""The `prepare images` Beam job: one composite per stage, thin DoFns over ``decode`` and ``sources``.

read -> decode + validate + resize + re-encode -> (split, shard) -> de-dup + sort -> shards
                                                                   rejects/<reason>.jsonl
                                                                   manifest.json
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.pvalue import AsDict, TaggedOutput

from data_pipeline.beam_common import (
    COUNT,
    REJECTS,
    ProgressReporter,
    WriteManifest,
    WriteRejects,
    make_pipeline,
    needs_rebalance,
    stored_path,
    tag_reject,
    write_atomically,
)
from data_pipeline.formats.images import sample_tar_bytes, write_image_shard
from data_pipeline.formats.manifest import build_image_manifest
from data_pipeline.images import decode as im
from data_pipeline.images.sources import ImageSource, ParquetColumns, RawImage, iter_parquet_images
from data_pipeline.rejects import Reject
from data_pipeline.text.splits import shard_count


@dataclass(frozen=True)
class ImageJobConfig:
    """Everything the stages need; plain data, pickled into the DoFns."""

    output: str
    options: im.ImageOptions
    columns: ParquetColumns
    classes: tuple[str, ...]
    seed: int
    val_fraction: float
    shard_mb: float


# ----------------------------------------------------------------------------------------------- read


def _open(path: str) -> Any:
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def read_source(source: ImageSource, columns: ParquetColumns) -> Iterator[RawImage | Reject]:
    """The raw images of one source; a file that cannot be read is one ``unreadable_file`` record."""
    try:
        with _open(source.path) as handle:
            if not source.parquet:
                yield RawImage(source.path, None, source.label, handle.read())
                return
            # pyarrow needs to seek; a stream that cannot is read into memory first.
            seekable = handle if getattr(handle, "seekable", lambda: False)() else io.BytesIO(handle.read())
            yield from iter_parquet_images(source.path, seekable, columns.image, columns.label)
    except OSError as error:
        yield Reject("unreadable_file", source.path, None, f"{type(error).__name__}: {error}")


class _ReadImagesFn(beam.DoFn):
    def __init__(self, columns: ParquetColumns) -> None:
        self.columns = columns

    def process(self, source: ImageSource) -> Iterator[Any]:
        records = 0
        for record in read_source(source, self.columns):
            records += 1
            yield tag_reject(record) if isinstance(record, Reject) else record
        yield TaggedOutput(COUNT, records)


class ReadImages(beam.PTransform):
    """Sources -> :class:`images.RawImage` records, reject records and per-source record counts."""

    def __init__(self, sources: list[ImageSource], columns: ParquetColumns) -> None:
        super().__init__()
        self.sources = sources
        self.columns = columns

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.pvalue.DoOutputsTuple:
        return (
            pbegin
            | "Sources" >> beam.Create(self.sources)
            # Spread the sources over workers: Create alone would hand them all to one bundle.
            | "Spread" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(_ReadImagesFn(self.columns)).with_outputs(REJECTS, COUNT, main="images")
        )


# --------------------------------------------------------------------------------------------- decode


class _DecodeFn(beam.DoFn):
    """Decode, validate, normalise and re-encode one image; place it in its split and shuffle order."""

    def __init__(self, config: ImageJobConfig) -> None:
        self.config = config
        self.class_index: dict[str, int] = {}
        self.decoded = 0
        self.progress: ProgressReporter | None = None

    def setup(self) -> None:
        self.class_index = {name: index for index, name in enumerate(self.config.classes)}
        self.progress = ProgressReporter("decode")

    def process(self, raw: RawImage) -> Iterator[Any]:
        config = self.config
        self._report()
        encoded = im.process_image(raw.data, config.options)
        if isinstance(encoded, im.DecodeFailure):
            yield tag_reject(Reject(encoded.reason, raw.source, raw.offset, encoded.detail))
            return
        digest = im.content_digest(raw.data)
        split, sort_key = im.place_image(digest, config.seed, config.val_fraction)
        # Every label was listed before the job (folder names, parquet label columns).
        label = -1 if raw.label is None else self.class_index[raw.label]
        offset = -1 if raw.offset is None else raw.offset
        yield split, im.KeptImage(sort_key, digest, raw.source, offset, label, encoded)

    def _report(self) -> None:
        self.decoded += 1
        if self.progress is not None:
            self.progress.tick(lambda: f"{self.decoded:,} images")


class DecodeImages(beam.PTransform):
    """Raw images -> ``(split, KeptImage)`` and reject records (``REJECTS``)."""

    def __init__(self, config: ImageJobConfig) -> None:
        super().__init__()
        self.config = config

    def expand(self, raw: beam.PCollection) -> beam.pvalue.DoOutputsTuple:
        return raw | "Decode" >> beam.ParDo(_DecodeFn(self.config)).with_outputs(REJECTS, main="images")


# ------------------------------------------------------------------------------------ shuffle, write


class _WriteImageShardFn(beam.DoFn):
    """De-duplicate and sort one shard's images, write it under a temporary name, rename when complete."""

    def __init__(self, output: str) -> None:
        self.output = output

    def process(self, element: tuple[tuple[str, int], Iterable[im.KeptImage]]) -> Iterator[Any]:
        (split, shard), images = element
        kept, duplicates = im.keep_first_copies(images)
        for duplicate, original in duplicates:
            detail = f"same bytes as {im.where(original.source, original.offset)}"
            offset = None if duplicate.offset < 0 else duplicate.offset
            yield tag_reject(Reject("duplicate", duplicate.source, offset, detail))
        relative = f"{split}-{shard:06d}.tar"
        buffer = io.BytesIO()
        stats = write_image_shard(buffer, relative, kept)
        write_atomically(stored_path(self.output, relative), buffer.getvalue())
        yield TaggedOutput(COUNT, len(kept))
        yield split, stats


class ShardImages(beam.PTransform):
    """``(split, KeptImage)`` -> written shards' ``(split, stats)``, duplicate rejects and the kept count.

    A side input of tar bytes per split sets its shard count (``--shard-mb``); an image's shard is its
    seeded sort key modulo that count and its place in the shard the order of sort keys: together a
    global shuffle that no worker count changes.
    """

    def __init__(self, config: ImageJobConfig) -> None:
        super().__init__()
        self.config = config

    def expand(self, placed: beam.PCollection) -> beam.pvalue.DoOutputsTuple:
        shard_mb = self.config.shard_mb
        bytes_per_split = (
            placed
            | "TarBytes" >> beam.Map(lambda p: (p[0], sample_tar_bytes(len(p[1].jpeg), p[1].label >= 0)))
            | "SumPerSplit" >> beam.CombinePerKey(sum)
        )

        def shard_key(split_image: tuple[str, im.KeptImage], totals: dict[str, int]) -> Any:
            split, image = split_image
            return (split, image.sort_key % shard_count(totals[split], shard_mb)), image

        return (
            placed
            | "KeyByShard" >> beam.Map(shard_key, totals=AsDict(bytes_per_split))
            | "GroupShards" >> beam.GroupByKey()
            | "Write"
            >> beam.ParDo(_WriteImageShardFn(self.config.output)).with_outputs(REJECTS, COUNT, main="shards")
        )


def build_image_pipeline(
    pipeline: beam.Pipeline,
    sources: list[ImageSource],
    config: ImageJobConfig,
    static: dict[str, Any],
    rebalance: bool = False,
) -> None:
    """Add every stage of the image job to ``pipeline``.

    Args:
        pipeline: An empty pipeline.
        sources: Image files and parquet files, sorted.
        config: The job configuration.
        static: Manifest fields known before the job (classes, layout, sizes, seed, options).
        rebalance: Reshuffle the raw images after reading, for inputs of fewer sources than workers
            (a few parquet files). Defaults to False.
    """
    read = pipeline | "ReadImages" >> ReadImages(sources, config.columns)
    raw = read.images
    if rebalance:
        raw = raw | "Rebalance" >> beam.Reshuffle()
    decoded = raw | "DecodeImages" >> DecodeImages(config)
    written = decoded.images | "ShardImages" >> ShardImages(config)
    rejects = (read[REJECTS], decoded[REJECTS], written[REJECTS]) | "AllRejects" >> beam.Flatten()
    reject_counts = rejects | "WriteRejects" >> WriteRejects(config.output)
    counts = {
        "read": read[COUNT] | "SumRead" >> beam.CombineGlobally(sum),
        "kept": written[COUNT] | "SumKept" >> beam.CombineGlobally(sum),
    }
    manifest_inputs = {"shards": written.shards, "reject_counts": reject_counts, **counts}
    _ = manifest_inputs | "WriteManifest" >> WriteManifest(config.output, static, build_image_manifest)


def run_image_job(
    sources: list[ImageSource], config: ImageJobConfig, static: dict[str, Any], beam_args: list[str]
) -> None:
    """Build the image job and run it to completion; a failed job raises what the runner raised."""
    pipeline, workers = make_pipeline(beam_args)
    rebalance = needs_rebalance(len(sources), workers)
    build_image_pipeline(pipeline, sources, config, static, rebalance=rebalance)
    pipeline.run().wait_until_finish()
