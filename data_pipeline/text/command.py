"""`pretrain prepare text`: run the Beam job that turns text corpora into shuffled WebDataset shards.

    pretrain prepare text corpus/*.jsonl.gz wiki.xml.bz2 --tokenizer tok/ --output shards/
    pretrain prepare text 'gs://bucket/text/*' --tokenizer tok/spm.model --output gs://bucket/shards \\
        -- --runner=DataflowRunner --project=P --region=R --temp_location=gs://bucket/tmp
    pretrain prepare text /shared/corpus --tokenizer /shared/tok --output /shared/shards \\
        -- --runner DaskRunner --dask_client_address tcp://HOST:8786
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from data_pipeline.command_common import (
    JobResult,
    beam_arguments,
    clear_previous_outputs,
    hide_optional_gcp_warning,
    job_outcome,
    recorded_options,
    written_manifest,
)
from data_pipeline.errors import UserError
from data_pipeline.formats.manifest import TOKENIZER_DIR, tokenizer_entry
from data_pipeline.formats.text import SENTENCE_TASKS
from data_pipeline.tables import format_table
from data_pipeline.text.examples import ExampleOptions
from data_pipeline.text.tokenizer_command import add_reader_arguments, reader_options
from data_pipeline.text.tokenizer_kinds import TextTokenizer, load_tokenizer, main_file

DEFAULT_MIN_DOC_CHARS = 200


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `pretrain prepare text`."""
    parser.epilog = (
        "Beam pipeline options go after a bare `--`. Without --runner the job runs locally on the "
        "DirectRunner with --direct_running_mode=multi_processing --direct_num_workers=<all cores>; "
        "--runner DaskRunner [--dask_client_address tcp://HOST:8786] runs it on a Dask cluster (a local "
        "one without an address)."
    )
    parser.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="files, directories, globs or filesystem URLs"
    )
    parser.add_argument(
        "--tokenizer",
        required=True,
        help="a SentencePiece .model, a HuggingFace tokenizer.json or BERT vocab.txt, or a directory "
        "holding spm.model, tokenizer.json or vocab.txt",
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
        "--objective", choices=SENTENCE_TASKS, default="nsp", help="sentence-pair task of the examples"
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
    parser.add_argument(
        "--temp-dir",
        default="",
        help="where the job's run files go (about twice the tokenised corpus, deleted at the end); "
        "defaults to the output directory. Every worker must reach it",
    )
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


def without_key(options: dict[str, object], key: str) -> dict[str, object]:
    """``options`` less ``key``."""
    return {name: value for name, value in options.items() if name != key}


def read_file_any(path: str) -> bytes | None:
    """A file's bytes on any Beam filesystem (local paths included); None when there is no such file."""
    from apache_beam.io.filesystems import FileSystems

    if os.path.isdir(path):
        return None
    try:
        if not FileSystems.exists(path):
            return None
        with FileSystems.open(path) as handle:
            return handle.read()
    except Exception as error:
        raise UserError(f"--tokenizer: cannot read {path}: {error}") from error


def copy_tokenizer(tokenizer: TextTokenizer, output: str) -> str:
    """Write the tokenizer's files under ``output/tokenizer/``; returns the main file's relative path."""
    from apache_beam.io.filesystems import FileSystems

    from data_pipeline.beam_common import write_atomically

    for name, data in tokenizer.files().items():
        write_atomically(FileSystems.join(output, TOKENIZER_DIR, name), data)
    return f"{TOKENIZER_DIR}/{main_file(tokenizer)[0]}"


def prepare(args: argparse.Namespace, beam_args: list[str]) -> JobResult:
    """Expand inputs, check formats and tokenizer, copy the tokenizer, run the job, read the manifest."""
    from data_pipeline.inputs import expand_inputs
    from data_pipeline.text import pipeline
    from data_pipeline.text.readers import detect_format

    reader = reader_options(args)
    files = expand_inputs(args.inputs)
    for input_file in files:
        detect_format(input_file.path, reader)  # an unknown extension fails here, before any work
    tokenizer = load_tokenizer(args.tokenizer, read_file_any)
    special = tokenizer.special_ids
    clear_previous_outputs(args.output)
    copy_path = copy_tokenizer(tokenizer, args.output)
    config = pipeline.JobConfig(
        output=args.output,
        model_proto=main_file(tokenizer)[1],
        vocab_size=tokenizer.vocab_size,
        reader=reader,
        min_doc_chars=args.min_doc_chars,
        example=ExampleOptions(args.objective, args.seq_len, args.short_seq_prob, sep_id=special.sep),
        dupe_factor=args.dupe_factor,
        seed=args.seed,
        val_fraction=args.val_fraction,
        shard_mb=args.shard_mb,
        temp_dir=args.temp_dir,
        tokenizer_kind=tokenizer.kind,
    )
    entry = tokenizer_entry(
        tokenizer.sha256, tokenizer.vocab_size, special.as_tokens(), tokenizer.kind, copy_path
    )
    static = {
        "tokenizer": entry,
        "seq_len": args.seq_len,
        "objective": args.objective,
        "seed": args.seed,
        # Where the scratch files went changes no output byte: not a recorded option.
        "options": recorded_options(argparse.Namespace(**without_key(vars(args), "temp_dir")), beam_args),
    }
    print(
        f"pretrain prepare text: {len(files)} input files, Beam options {' '.join(beam_args)}",
        file=sys.stderr,
    )
    pipeline.run_job([f.path for f in files], config, static, beam_args)
    return JobResult(written_manifest(args.output), len(files), sum(f.size_bytes for f in files))


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


def run(args: argparse.Namespace) -> int:
    """Run `pretrain prepare text`; the exit status."""
    _check_ranges(args)
    hide_optional_gcp_warning()
    beam_args = beam_arguments(list(getattr(args, "passthrough", [])), os.cpu_count() or 1)
    started = time.monotonic()
    result = prepare(args, beam_args)
    print(summary_table(result, time.monotonic() - started))
    return job_outcome(result.manifest["documents"], "document", "prepare text", args)
