"""``pretrain finetune``: fine-tune a pre-trained (or, as the baseline, a random) encoder on a labelled task.

pretrain finetune --config configs/finetune-classification.yaml --model EXPORT_OR_RUN_DIR \\
    --train train.csv --eval dev.csv --run-dir runs/sst
pretrain finetune --config configs/finetune-classification.yaml --model none --tokenizer DATA/tokenizer \\
    --train train.csv --eval dev.csv --run-dir runs/sst-baseline
deepspeed --num_gpus 8 --module training.finetune.commands --config ... --model ... --train ... --eval ... --run-dir ...

Images (``task.type: image``; --train/--eval are `pretrain prepare images` directories, the same one: its
train and val splits):
pretrain finetune --config configs/finetune-images.yaml --model exports/simclr --train IMAGES --eval IMAGES \
    --run-dir runs/probe --freeze head --label-fraction 0.1
pretrain finetune --config configs/finetune-images.yaml --model none --train IMAGES --eval IMAGES \
    --run-dir runs/probe-baseline --freeze head
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from data_pipeline.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``pretrain finetune``."""
    parser.add_argument(
        "--config", required=True, help="YAML recipe, e.g. configs/finetune-classification.yaml"
    )
    parser.add_argument(
        "--model",
        required=True,
        help="export directory, run directory (its newest checkpoint), or `none` (random init: the baseline)",
    )
    parser.add_argument(
        "--train",
        required=True,
        help="labelled training file (.csv, .tsv, .jsonl, .parquet), or an image shard directory (task.type image)",
    )
    parser.add_argument(
        "--eval",
        required=True,
        help="labelled evaluation file (same formats), or an image shard directory (the same as --train: "
        "its val split)",
    )
    parser.add_argument(
        "--run-dir", required=True, help="output: eval.json, best/, predictions.jsonl, metrics"
    )
    parser.add_argument(
        "--freeze",
        default=None,
        help="full (everything trains), head (linear probe) or top-K (last K layers + head); "
        "defaults to the config's train.freeze",
    )
    parser.add_argument(
        "--label-fraction",
        type=float,
        default=None,
        help="train on this class-balanced share of the labelled training rows (e.g. 0.01, 0.1, 1.0); "
        "defaults to the config's train.label_fraction",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="SentencePiece model (file or directory) for --model none; defaults to the config's tokenizer",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=5 (repeatable)",
    )


def run_finetune(args: argparse.Namespace) -> dict[str, Any]:
    """Load the config and fine-tune; returns eval.json's content. The process group is left up."""
    from training.finetune.base import FinetuneOptions
    from training.finetune.config import load_finetune_config
    from training.finetune.loop import finetune

    if getattr(args, "passthrough", None):
        raise UserError(f"pretrain finetune takes no arguments after `--`, got {args.passthrough}")
    overrides = list(args.overrides)
    if args.freeze is not None:
        overrides.append(f"train.freeze={args.freeze}")  # the dedicated flag wins over --set
    if getattr(args, "label_fraction", None) is not None:
        overrides.append(f"train.label_fraction={args.label_fraction}")
    config = load_finetune_config(args.config, overrides)
    options = FinetuneOptions(
        model=args.model,
        train_path=args.train,
        eval_path=args.eval,
        run_dir=Path(args.run_dir),
        tokenizer=args.tokenizer,
    )
    return finetune(config, options)


def run(args: argparse.Namespace) -> int:
    """``pretrain finetune``: fine-tune, then leave the process group (DeepSpeed is imported only now)."""
    try:
        run_finetune(args)
    finally:
        from training.engine import teardown_distributed

        teardown_distributed()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m training.finetune.commands``, for launchers that start a module per rank."""
    parser = argparse.ArgumentParser(prog="python -m training.finetune.commands", description=__doc__)
    add_arguments(parser)
    # The DeepSpeed launcher appends --local_rank; the rank is read from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.passthrough = []
    try:
        return run(args)
    except UserError as error:
        print(f"pretrain finetune: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
