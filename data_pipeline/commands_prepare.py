"""`pretrain prepare text`: run the Beam job that turns text corpora into shuffled WebDataset shards.

    pretrain prepare text corpus/*.jsonl.gz wiki.xml.bz2 --tokenizer tok/ --output shards/
    pretrain prepare text 'gs://bucket/text/*' --tokenizer tok/spm.model --output gs://bucket/shards \\
        -- --runner=DataflowRunner --project=P --region=R --temp_location=gs://bucket/tmp
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from data_pipeline.commands_tokenizer import add_reader_arguments, hide_optional_gcp_warning, reader_options
from data_pipeline.errors import UserError
from data_pipeline.examples import OBJECTIVES, ExampleOptions
from data_pipeline.manifest import TOKENIZER_COPY, tokenizer_entry
from data_pipeline.shard_format import MANIFEST_NAME
from data_pipeline.tokenizer import (
    MODEL_FILE,
    load_processor,
    model_sha256,
    resolve_model_path,
    special_ids,
    verify_specials,
)

DEFAULT_MIN_DOC_CHARS = 200
# Options that change how fast the job runs, never what it writes: kept out of the manifest so that
# any worker count gives a byte-identical output directory.
EXECUTION_ONLY_OPTIONS = ("direct_num_workers", "direct_running_mode", "default_sdk_harness_log_level")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Beam pipeline options go after a bare `--`. Without --runner the job runs locally on the "
        "DirectRunner with --direct_running_mode=multi_processing --direct_num_workers=<all cores>."
    )
    parser.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="files, directories, globs or filesystem URLs"
    )
    parser.add_argument(
        "--tokenizer", required=True, help="a SentencePiece .model, or a directory holding spm.model"
    )
    parser.add_argument("--output", required=True, help="output directory (local path or filesystem URL)")
    add_reader_arguments(parser)
    parser.add_argument(
        "--min-doc-chars",
        type=int,
        default=DEFAULT_MIN_DOC_CHARS,
        help="documents shorter than this (after normalisation) are rejected as too_short: below about two "
        "sentences a document gives no sentence pair and is mostly boilerplate (menus, captions)",
    )
    parser.add_argument(
        "--objective", choices=OBJECTIVES, default="nsp", help="sentence-pair task of the examples"
    )
    parser.add_argument("--seq-len", type=int, default=128, help="sequence length, [CLS]/[SEP] included")
    parser.add_argument(
        "--short-seq-prob", type=float, default=0.1, help="share of pairs with a shorter target length"
    )
    parser.add_argument(
        "--dupe-factor", type=int, default=1, help="passes over the data, each cutting different examples"
    )
    parser.add_argument("--seed", type=int, default=12345, help="seed of example building and the shuffle")
    parser.add_argument(
        "--val-fraction", type=float, default=0.005, help="share of documents (by hash) in the val split"
    )
    parser.add_argument("--shard-mb", type=float, default=128.0, help="target shard size in MiB")
    parser.add_argument("--strict", action="store_true", help="exit non-zero when any record was rejected")


def _check_ranges(args: argparse.Namespace) -> None:
    checks = [
        ("--seq-len", args.seq_len, 8 <= args.seq_len <= 65535, "between 8 and 65535"),
        ("--short-seq-prob", args.short_seq_prob, 0.0 <= args.short_seq_prob <= 1.0, "in [0, 1]"),
        ("--dupe-factor", args.dupe_factor, args.dupe_factor >= 1, "at least 1"),
        ("--val-fraction", args.val_fraction, 0.0 <= args.val_fraction < 1.0, "in [0, 1)"),
        ("--shard-mb", args.shard_mb, args.shard_mb > 0, "positive"),
        ("--min-doc-chars", args.min_doc_chars, args.min_doc_chars >= 0, "at least 0"),
    ]
    for name, value, ok, expected in checks:
        if not ok:
            raise UserError(f"{name} {value}: must be {expected}")


def _option_name(arg: str) -> str:
    return arg.lstrip("-").split("=", 1)[0]


def beam_arguments(passthrough: list[str], cores: int) -> list[str]:
    """The user's Beam options, plus the local multi-process DirectRunner defaults they did not set."""
    given = {_option_name(arg) for arg in passthrough if arg.startswith("--")}
    defaults = ["--runner=DirectRunner"]
    runner = None
    for i, arg in enumerate(passthrough):
        if arg.startswith("--") and _option_name(arg) == "runner":
            runner = (
                arg.split("=", 1)[1]
                if "=" in arg
                else (passthrough[i + 1] if i + 1 < len(passthrough) else "")
            )
    if runner is None or runner in ("DirectRunner", "direct"):
        defaults += [
            "--direct_running_mode=multi_processing",
            f"--direct_num_workers={cores}",
            # Local workers otherwise log every harness step at INFO over the progress lines.
            "--default_sdk_harness_log_level=WARNING",
        ]
    return [arg for arg in defaults if _option_name(arg) not in given] + list(passthrough)


def recorded_options(args: argparse.Namespace, beam_args: list[str]) -> dict[str, Any]:
    """The option set for the manifest: inputs as given, no output path, no execution-only options."""
    options = {
        key: value for key, value in sorted(vars(args).items()) if key not in ("output", "passthrough")
    }
    options["beam"] = [arg for arg in beam_args if _option_name(arg) not in EXECUTION_ONLY_OPTIONS]
    return options


def read_model_bytes(path: str) -> bytes:
    """The serialized model at ``path``: a ``.model`` file or a directory holding ``spm.model``, any filesystem."""
    from apache_beam.io.filesystems import FileSystems

    if os.path.exists(path):
        candidate = resolve_model_path(path)
    elif path.endswith(".model"):
        candidate = path
    else:
        candidate = FileSystems.join(path, MODEL_FILE)
    try:
        with FileSystems.open(candidate) as handle:
            return handle.read()
    except Exception as error:
        raise UserError(f"--tokenizer {path}: cannot read {candidate}: {error}") from error


def clear_previous_outputs(output: str) -> None:
    """Delete what an earlier run wrote to ``output`` (shards, rejects, manifest), so stale shards of a
    run with more shards never mix with this one's. Files of other names are left alone."""
    from apache_beam.io.filesystems import FileSystems

    patterns = ["train-*.tar", "val-*.tar", "*.tmp-*", "rejects/*.jsonl", MANIFEST_NAME]
    matches = FileSystems.match([FileSystems.join(output, *pattern.split("/")) for pattern in patterns])
    stale = [metadata.path for match in matches for metadata in match.metadata_list]
    if stale:
        FileSystems.delete(stale)


@dataclass(frozen=True)
class JobResult:
    """What the launcher reports: the written manifest and the size of the inputs."""

    manifest: dict[str, Any]
    input_files: int
    input_bytes: int


def prepare(args: argparse.Namespace, beam_args: list[str]) -> JobResult:
    """Expand inputs, check formats and tokenizer, copy the tokenizer, run the job, read the manifest."""
    from apache_beam.io.filesystems import FileSystems

    from data_pipeline import pipeline
    from data_pipeline.inputs import expand_inputs
    from data_pipeline.readers import detect_format

    reader = reader_options(args)
    files = expand_inputs(args.inputs)
    for input_file in files:
        detect_format(input_file.path, reader)  # an unknown extension fails here, before any work
    model_proto = read_model_bytes(args.tokenizer)
    processor = load_processor(model_proto=model_proto)
    verify_specials(processor, args.tokenizer)
    vocab_size = processor.GetPieceSize()
    clear_previous_outputs(args.output)
    pipeline.write_atomically(FileSystems.join(args.output, *TOKENIZER_COPY.split("/")), model_proto)
    config = pipeline.JobConfig(
        output=args.output,
        model_proto=model_proto,
        vocab_size=vocab_size,
        reader=reader,
        min_doc_chars=args.min_doc_chars,
        example=ExampleOptions(args.objective, args.seq_len, args.short_seq_prob),
        dupe_factor=args.dupe_factor,
        seed=args.seed,
        val_fraction=args.val_fraction,
        shard_mb=args.shard_mb,
    )
    static = {
        "tokenizer": tokenizer_entry(model_sha256(model_proto), vocab_size, special_ids(processor)),
        "seq_len": args.seq_len,
        "objective": args.objective,
        "seed": args.seed,
        "options": recorded_options(args, beam_args),
    }
    print(
        f"pretrain prepare text: {len(files)} input files, Beam options {' '.join(beam_args)}",
        file=sys.stderr,
    )
    pipeline.run_job([f.path for f in files], config, static, beam_args)
    with FileSystems.open(FileSystems.join(args.output, MANIFEST_NAME)) as handle:
        manifest = json.loads(handle.read())
    return JobResult(manifest, len(files), sum(f.size_bytes for f in files))


def summary_table(result: JobResult, seconds: float) -> str:
    """The end-of-run table: documents, rejects by reason, tokens, samples, shards, MB in, speed."""
    manifest = result.manifest
    documents = manifest["documents"]
    megabytes = result.input_bytes / 1e6
    rows = [
        ("input files", f"{result.input_files:,}"),
        ("documents read", f"{documents['read']:,}"),
        ("documents kept", f"{documents['kept']:,}"),
    ]
    rows += [(f"  rejected: {reason}", f"{count:,}") for reason, count in documents["rejected"].items()]
    for split, entry in manifest["splits"].items():
        rows.append(
            (
                f"{split}",
                f"{entry['samples']:,} samples, {entry['tokens']:,} tokens, {len(entry['shards'])} shards",
            )
        )
    rows += [
        ("bytes per token", f"{manifest['bytes_per_token']}"),
        ("MB in", f"{megabytes:,.1f}"),
        ("seconds", f"{seconds:,.1f}"),
        ("MB/s", f"{megabytes / seconds:,.2f}" if seconds > 0 else "-"),
    ]
    return format_table(rows)


def format_table(rows: list[tuple[str, str]]) -> str:
    """``(name, value)`` rows as two aligned columns: the end-of-run summary of every prepare job."""
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def run(args: argparse.Namespace) -> int:
    _check_ranges(args)
    hide_optional_gcp_warning()
    beam_args = beam_arguments(list(getattr(args, "passthrough", [])), os.cpu_count() or 1)
    started = time.monotonic()
    result = prepare(args, beam_args)
    print(summary_table(result, time.monotonic() - started))
    return job_outcome(result.manifest["documents"], "document", "prepare text", args)


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
