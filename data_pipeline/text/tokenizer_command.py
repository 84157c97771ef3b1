"""`pretrain tokenizer`: train SentencePiece (or BERT WordPiece) with the BERT specials on a corpus sample.

pretrain tokenizer corpus/*.jsonl.gz --out tok/ --vocab-size 32000
pretrain tokenizer books/ --txt-docs paragraph --out tok/ --vocab-size 8000 --model-type bpe
pretrain tokenizer corpus/*.jsonl.gz --out tok/ --vocab-size 30522 --kind wordpiece
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Iterator

from data_pipeline.command_common import hide_optional_gcp_warning
from data_pipeline.errors import UserError
from data_pipeline.text.readers import FORMATS, TXT_DOC_MODES, ReaderOptions
from data_pipeline.text.tokenizer import (
    MODEL_TYPES,
    TRAINED_KINDS,
    VOCAB_FILE,
    SampleStats,
    load_processor,
    special_ids,
    train_sentencepiece,
    trainer_options,
    write_sentences,
)


def add_reader_arguments(parser: argparse.ArgumentParser) -> None:
    """The reader options shared by `tokenizer` and `prepare text`."""
    parser.add_argument(
        "--input-format",
        choices=FORMATS,
        default=None,
        help="input format; unset: each file's extension decides",
    )
    parser.add_argument(
        "--txt-docs",
        choices=TXT_DOC_MODES,
        default="file",
        help="a .txt document is a whole file or a paragraph",
    )
    parser.add_argument("--text-field", default="text", help="the JSON key holding the text in .jsonl inputs")
    parser.add_argument(
        "--text-column", default="text", help="the column holding the text in .parquet inputs"
    )


def reader_options(args: argparse.Namespace) -> ReaderOptions:
    """:class:`ReaderOptions` from the parsed reader arguments."""
    return ReaderOptions(args.input_format, args.txt_docs, args.text_field, args.text_column)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `pretrain tokenizer`."""
    parser.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="files, directories, globs or filesystem URLs"
    )
    parser.add_argument(
        "--out",
        required=True,
        help="local directory for spm.model and spm.vocab (wordpiece: tokenizer.json and vocab.txt)",
    )
    parser.add_argument(
        "--vocab-size", type=int, required=True, help="pieces in the vocabulary, specials included"
    )
    parser.add_argument(
        "--kind",
        choices=TRAINED_KINDS,
        default="sentencepiece",
        help="sentencepiece, or wordpiece: BERT's lowercased WordPiece trained with HuggingFace tokenizers",
    )
    parser.add_argument(
        "--model-type", choices=MODEL_TYPES, default=None, help="SentencePiece model type (default unigram)"
    )
    parser.add_argument(
        "--max-docs", type=int, default=100_000, help="documents sampled: the first N in sorted input order"
    )
    parser.add_argument("--seed", type=int, default=12345, help="seed of SentencePiece's sentence sampling")
    parser.add_argument(
        "--character-coverage", type=float, default=0.9995, help="share of characters given their own piece"
    )
    add_reader_arguments(parser)


def sample_documents(
    paths: list[str], reader: ReaderOptions, max_docs: int, stats: SampleStats
) -> Iterator[str]:
    """Normalised texts of the first ``max_docs`` documents of ``paths`` (in that order); rejects counted."""
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    from data_pipeline.rejects import Reject
    from data_pipeline.text.cleaning import normalize_text
    from data_pipeline.text.readers import read_records

    def opener(path: str):
        return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)

    for path in paths:
        for record in read_records(path, opener, reader):
            if isinstance(record, Reject):
                stats.rejected[record.reason] = stats.rejected.get(record.reason, 0) + 1
                continue
            text = normalize_text(record.text)
            if not text:
                stats.rejected["empty"] = stats.rejected.get("empty", 0) + 1
                continue
            stats.documents += 1
            yield text
            if stats.documents >= max_docs:
                return


def run(args: argparse.Namespace) -> int:
    """Run `pretrain tokenizer`; the exit status."""
    hide_optional_gcp_warning()
    from data_pipeline.inputs import expand_inputs
    from data_pipeline.text.readers import detect_format
    from data_pipeline.text.sentences import split_sentences

    if "://" in args.out:
        raise UserError(f"--out {args.out}: must be a local directory (the trainers write local files)")
    if args.max_docs < 1:
        raise UserError(f"--max-docs {args.max_docs}: must be at least 1")
    if args.kind == "wordpiece" and args.model_type is not None:
        raise UserError(f"--model-type {args.model_type}: a SentencePiece option; --kind wordpiece has none")
    options = None
    if args.kind == "sentencepiece":
        options = trainer_options(args.vocab_size, args.model_type or "unigram", args.character_coverage)
    reader = reader_options(args)
    paths = [f.path for f in expand_inputs(args.inputs)]
    for path in paths:
        detect_format(path, reader)
    started = time.monotonic()
    stats = SampleStats()
    with tempfile.TemporaryDirectory(prefix="pretrain-tokenizer-") as workdir:
        sentence_file = os.path.join(workdir, "sentences.txt")
        with open(sentence_file, "w", encoding="utf-8") as sink:
            for text in sample_documents(paths, reader, args.max_docs, stats):
                write_sentences(split_sentences(text), sink, stats)
        if stats.sentences == 0:
            raise UserError(
                f"no text read from {' '.join(args.inputs)} (rejected: {stats.rejected or 'none'})"
            )
        print(
            f"pretrain tokenizer: {stats.documents:,} documents, {stats.sentences:,} sentences, "
            f"{stats.characters / 1e6:,.1f} M characters from {len(paths)} files; rejected {stats.rejected or 'none'}",
            file=sys.stderr,
        )
        if options is None:
            return _train_wordpiece(sentence_file, args.out, args.vocab_size, started)
        model_path = train_sentencepiece(sentence_file, args.out, options, seed=args.seed)
    processor = load_processor(model_path)
    print(
        f"wrote {model_path} and {os.path.join(args.out, VOCAB_FILE)}: {processor.GetPieceSize():,} pieces "
        f"({args.model_type or 'unigram'}), specials {special_ids(processor)}, "
        f"{time.monotonic() - started:,.1f} s"
    )
    return 0


def _train_wordpiece(sentence_file: str, out_dir: str, vocab_size: int, started: float) -> int:
    """Train BERT WordPiece on the sampled sentences; write tokenizer.json and vocab.txt into ``out_dir``."""
    from data_pipeline.text.hf_tokenizer import train_wordpiece, write_wordpiece

    with open(sentence_file, encoding="utf-8") as sentences:
        trained = train_wordpiece((line.rstrip("\n") for line in sentences), vocab_size)
    written = write_wordpiece(trained, out_dir)
    names = " and ".join(os.path.join(out_dir, name) for name in written.files())
    print(
        f"wrote {names}: {written.vocab_size:,} pieces (wordpiece), "
        f"specials {written.special_ids.as_tokens()}, {time.monotonic() - started:,.1f} s"
    )
    return 0
