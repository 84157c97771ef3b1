"""What the prepare commands share: Beam options, the output directory, the exit status, the summary table."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from typing import Any

from data_pipeline.errors import UserError
from data_pipeline.formats.manifest import MANIFEST_NAME
from data_pipeline.runners import STAGING_OPTIONS, option_name, option_value, resolve_runner

# Options that change how fast or where the job runs, never what it writes: kept out of the manifest so
# that any worker count, cluster or staged package gives a byte-identical output directory.
EXECUTION_ONLY_OPTIONS = (
    "direct_num_workers",
    "direct_running_mode",
    "default_sdk_harness_log_level",
    "num_workers",
    "max_num_workers",
    "parallelism",
    *STAGING_OPTIONS,
)
# Every option of the Dask runner (address, timeouts, partitioning) is execution-only too.
EXECUTION_ONLY_PREFIXES = ("dask_",)


@dataclass(frozen=True)
class JobResult:
    """What the launcher reports: the written manifest and the size of the inputs."""

    manifest: dict[str, Any]
    input_files: int
    input_bytes: int


def hide_optional_gcp_warning() -> None:
    """Drop the warning Beam logs at import when its optional GCP client libraries are absent.

    It says nothing about this job (which names no BigQuery input) yet would open every run's output.
    """
    logging.getLogger().addFilter(lambda record: "apitools not found" not in record.getMessage())


def joined_options(passthrough: list[str]) -> list[str]:
    """Beam options in ``--name=value`` form: ``["--runner", "DaskRunner"]`` -> ``["--runner=DaskRunner"]``.

    Beam takes no positional arguments, so a word that follows an option without ``=`` is its value.
    """
    joined: list[str] = []
    for arg in passthrough:
        if joined and not arg.startswith("--") and joined[-1].startswith("--") and "=" not in joined[-1]:
            joined[-1] = f"{joined[-1]}={arg}"
        else:
            joined.append(arg)
    return joined


def beam_arguments(passthrough: list[str], cores: int) -> list[str]:
    """The user's Beam options (``--name=value`` form, the runner's full name), plus the local
    multi-process DirectRunner defaults they did not set.

    Raises:
        UserError: A runner option that cannot work (see :func:`data_pipeline.runners.resolve_runner`).
    """
    given_args = joined_options(passthrough)
    given = {option_name(arg) for arg in given_args if arg.startswith("--")}
    defaults = ["--runner=DirectRunner"]
    runner = option_value(given_args, "runner")
    if runner is None or runner in ("DirectRunner", "direct"):
        defaults += [
            "--direct_running_mode=multi_processing",
            f"--direct_num_workers={cores}",
            # Local workers otherwise log every harness step at INFO over the progress lines.
            "--default_sdk_harness_log_level=WARNING",
        ]
    return resolve_runner([arg for arg in defaults if option_name(arg) not in given] + given_args)


def _execution_only(arg: str) -> bool:
    name = option_name(arg)
    return name in EXECUTION_ONLY_OPTIONS or name.startswith(EXECUTION_ONLY_PREFIXES)


def recorded_options(args: argparse.Namespace, beam_args: list[str]) -> dict[str, Any]:
    """The option set for the manifest: inputs as given, no output path, no execution-only options."""
    options = {
        key: value for key, value in sorted(vars(args).items()) if key not in ("output", "passthrough")
    }
    options["beam"] = [arg for arg in beam_args if not _execution_only(arg)]
    return options


def clear_previous_outputs(output: str) -> None:
    """Delete what an earlier run wrote to ``output`` (shards, rejects, manifest), so stale shards of a
    run with more shards never mix with this one's. Files of other names are left alone."""
    from apache_beam.io.filesystems import FileSystems

    patterns = ["train-*.tar", "val-*.tar", "*.tmp-*", "rejects/*.jsonl", MANIFEST_NAME]
    matches = FileSystems.match([FileSystems.join(output, *pattern.split("/")) for pattern in patterns])
    stale = [metadata.path for match in matches for metadata in match.metadata_list]
    if stale:
        FileSystems.delete(stale)


def written_manifest(output: str) -> dict[str, Any]:
    """The manifest a finished job wrote to ``output`` (any Beam filesystem)."""
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(FileSystems.join(output, MANIFEST_NAME)) as handle:
        return json.loads(handle.read())


def job_outcome(counts: dict[str, Any], noun: str, command: str, args: argparse.Namespace) -> int:
    """The exit status of a prepare job from its manifest's read/kept/rejected counts.

    Nothing kept is a UserError; rejects give 1 under ``--strict``, else 0.

    Args:
        counts: The manifest's ``documents`` (or ``images``) counts.
        noun: What a record is, for the messages (``document``, ``image``).
        command: The subcommand, for the messages (``prepare text``).
        args: The parsed options (``inputs``, ``output``, ``strict``).
    """
    if counts["kept"] == 0:
        raise UserError(
            f"no {noun} kept from {' '.join(args.inputs)}: {counts['read']} records read, rejected "
            f"{counts['rejected'] or 'none'}; see {args.output}/rejects/"
        )
    rejected = sum(counts["rejected"].values())
    if args.strict and rejected:
        print(
            f"pretrain {command}: --strict: {rejected} records "
            f"rejected {counts['rejected']}; see {args.output}/rejects/",
            file=sys.stderr,
        )
        return 1
    return 0
