"""Beam pieces every prepare job shares: reject tagging and sinks, atomic writes, the manifest, progress."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

import apache_beam as beam
from apache_beam.io.filesystem import BeamIOError, CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.pvalue import AsList, AsSingleton, TaggedOutput

from data_pipeline.errors import UserError
from data_pipeline.formats.manifest import MANIFEST_NAME, document_counts, manifest_text
from data_pipeline.rejects import Reject, reject_lines
from data_pipeline.runners import staging_arguments, worker_count

REJECTS = "rejects"
COUNT = "count"
PROGRESS_SECONDS = 10.0
# A job's scratch directory: ``<base>/_tmp-<uuid>``, a name no shard, reject or manifest pattern matches.
TEMP_DIR_PREFIX = "_tmp-"


def stored_path(output: str, relative: str) -> str:
    """``output/relative`` on any Beam filesystem (``relative`` is ``/``-separated)."""
    return FileSystems.join(output, *relative.split("/"))


@contextlib.contextmanager
def atomic_sink(path: str) -> Iterator[IO[bytes]]:
    """A sink at a unique temporary name, renamed to ``path`` once the block completes.

    A retried or crashed write never shows under ``path``; an exception leaves only the temporary
    file, which the next run's clean-up removes.
    """
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    with FileSystems.create(temporary, compression_type=CompressionTypes.UNCOMPRESSED) as sink:
        yield sink
    FileSystems.rename([temporary], [path])


def new_temp_dir(base: str) -> str:
    """A new, unique scratch directory name under ``base`` (created by the first file written in it)."""
    return FileSystems.join(base, f"{TEMP_DIR_PREFIX}{uuid.uuid4().hex}")


def _matching(base: str, pattern: str) -> list[str]:
    matches = FileSystems.match([FileSystems.join(base, pattern)])
    return [metadata.path for match in matches for metadata in match.metadata_list]


def remove_temp_dirs(base: str, name: str = f"{TEMP_DIR_PREFIX}*") -> None:
    """Delete the scratch directories ``base/name`` (a glob): this run's after success, or what a crashed
    run left behind. Their files first, then the directories themselves where the filesystem has any
    (an object store has none to delete)."""
    files = _matching(base, f"{name}/*")
    if files:
        FileSystems.delete(files)
    directories = {FileSystems.split(path)[0] for path in files} | set(_matching(base, name))
    for directory in sorted(directories):
        # An object store has no directories: once its files are gone there is nothing left to delete.
        with contextlib.suppress(BeamIOError):
            FileSystems.delete([directory])


def write_atomically(path: str, payload: Iterable[bytes] | bytes) -> None:
    """Write ``payload`` (bytes, or blocks of bytes) through :func:`atomic_sink`."""
    with atomic_sink(path) as sink:
        for block in [payload] if isinstance(payload, bytes) else payload:
            sink.write(block)


def tag_reject(reject: Reject) -> TaggedOutput:
    """Count ``reject`` (Beam counter ``rejects/<reason>``) and send it to the dead-letter output."""
    Metrics.counter("rejects", reject.reason).inc()
    return TaggedOutput(REJECTS, reject)


class ProgressReporter:
    """Prints a stage's progress on this worker at most every ``PROGRESS_SECONDS``: never per element.

    Args:
        stage: The stage name shown in brackets (``read``, ``decode``).
    """

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.last_report = time.monotonic()

    def tick(self, describe: Callable[[], str]) -> None:
        """Print ``describe()`` when the interval has passed since the last line."""
        now = time.monotonic()
        if now - self.last_report >= PROGRESS_SECONDS:
            self.last_report = now
            print(f"[{self.stage}] this worker: {describe()}", file=sys.stderr)


class _WriteRejectsFn(beam.DoFn):
    def __init__(self, output: str) -> None:
        self.output = output

    def process(
        self, element: tuple[str, Iterable[tuple[str, int | None, str]]]
    ) -> Iterator[tuple[str, int]]:
        reason, records = element
        lines = reject_lines(records)
        write_atomically(stored_path(self.output, f"rejects/{reason}.jsonl"), lines)
        yield (reason, len(lines))


class WriteRejects(beam.PTransform):
    """:class:`Reject` records -> ``rejects/<reason>.jsonl`` and ``(reason, count)``."""

    def __init__(self, output: str) -> None:
        super().__init__()
        self.output = output

    def expand(self, rejects: beam.PCollection) -> beam.PCollection:
        return (
            rejects
            | "KeyByReason" >> beam.Map(lambda r: (r.reason, (r.source, r.offset, r.payload)))
            | "GroupReasons" >> beam.GroupByKey()
            | "Write" >> beam.ParDo(_WriteRejectsFn(self.output))
        )


def _write_manifest(
    _: None,
    static: dict[str, Any],
    output: str,
    shards: list[tuple[str, dict[str, Any]]],
    reject_counts: list[tuple[str, int]],
    read: int,
    kept: int,
    build: Callable[..., dict[str, Any]],
) -> str:
    documents = document_counts(read, kept, dict(reject_counts))
    manifest = build(shards=shards, documents=documents, **static)
    path = stored_path(output, MANIFEST_NAME)
    write_atomically(path, manifest_text(manifest).encode("utf-8"))
    return path


class WriteManifest(beam.PTransform):
    """The single ``manifest.json``, written once every shard and reject file is complete.

    Args:
        output: The output directory.
        static: Manifest fields known before the job runs.
        build: ``build(shards=, documents=, **static)`` makes the manifest (``build_manifest`` for
            text shards, ``build_image_manifest`` for images).
    """

    def __init__(self, output: str, static: dict[str, Any], build: Callable[..., dict[str, Any]]) -> None:
        super().__init__()
        self.output = output
        self.static = static
        self.build = build

    def expand(self, inputs: dict[str, beam.PCollection]) -> beam.PCollection:
        pipeline = inputs["shards"].pipeline
        return (
            pipeline
            | "Once" >> beam.Create([None])
            | "Write"
            >> beam.Map(
                _write_manifest,
                static=self.static,
                output=self.output,
                shards=AsList(inputs["shards"]),
                reject_counts=AsList(inputs["reject_counts"]),
                read=AsSingleton(inputs["read"]),
                kept=AsSingleton(inputs["kept"]),
                build=self.build,
            )
        )


def needs_rebalance(inputs: int, workers: int | None) -> bool:
    """Whether ``inputs`` files are too few to keep ``workers`` busy (always, when the count is unknown).

    A rebalance reshuffles the records after reading; it changes no output byte, only who does the work.
    """
    return workers is None or inputs < 2 * workers


# glibc's mallopt parameter for the number of malloc arenas.
_M_ARENA_MAX = -8
LOCAL_MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = LOCAL_MALLOC_ARENAS) -> None:
    """At most ``arenas`` glibc malloc arenas in this process and in the worker processes it starts.

    glibc gives threads their own arenas (up to 8 per core) and keeps what is freed in each: the
    local runner's many gRPC threads then hold on to memory in proportion to the data that passed
    through them. Nothing happens on another C library.
    """
    os.environ.setdefault("MALLOC_ARENA_MAX", str(arenas))
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, arenas)
    except (OSError, AttributeError):
        pass


def make_pipeline(beam_args: list[str]) -> tuple[beam.Pipeline, int | None]:
    """A pipeline for ``beam_args`` and its worker count (None when only the cluster knows it).

    A cluster runner's workers get this project's code (:func:`data_pipeline.runners.staging_arguments`).
    Beam's own DirectRunner first tries the Prism runner, which downloads a binary (and fails
    offline); a local run therefore goes straight to the FnApiRunner it would fall back to, which
    honours ``--direct_num_workers`` and ``--direct_running_mode`` itself. A local run also limits
    the malloc arenas of its processes (:func:`limit_malloc_arenas`).

    Raises:
        UserError: Beam refused the runner (an unknown ``--runner``, a runner whose extra is missing).
    """
    options = PipelineOptions(beam_args + staging_arguments(beam_args))
    runner_name = options.view_as(StandardOptions).runner
    if runner_name not in (None, "DirectRunner", "direct"):
        try:
            return beam.Pipeline(options=options), worker_count(options)
        except (ValueError, ImportError) as error:
            raise UserError(f"--runner {runner_name}: {error}") from error
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    limit_malloc_arenas()
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    provision = fn_runner.ExtendedProvisionInfo(
        beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)
    )
    runner = fn_runner.FnApiRunner(provision_info=provision)
    return beam.Pipeline(runner=runner, options=options), worker_count(options)
