"""``pretrain train``: DeepSpeed pre-training on prepared shards (one process, or one per rank under a launcher).

pretrain train --config configs/bert-tiny.yaml --data DATA --run-dir runs/tiny
deepspeed --num_gpus 8 --module training --config configs/bert-base.yaml --data DATA --run-dir runs/base
torchrun --nproc_per_node 8 -m training --config configs/bert-base.yaml --data DATA --run-dir runs/base
pretrain train --config configs/simclr-tiny.yaml --data IMAGE_SHARDS --run-dir runs/simclr-tiny
deepspeed --num_gpus 2 --module training --config configs/simclr-resnet18.yaml --data IMAGE_SHARDS --run-dir runs/r18
pretrain train --config configs/bert-base.yaml --data MY_SHARDS --run-dir runs/domain --init-from HF_BERT_DIR
deepspeed --num_gpus 8 --module training --config configs/bert-base-phase2.yaml --data SHARDS_512 \
    --run-dir runs/phase2 --init-from runs/phase1
pretrain train --config MIXTURE.yaml --run-dir runs/mix    (the config lists data.sources; no --data)

The method follows the config: a ``simclr:`` section trains SimCLR on `pretrain prepare images` shards,
otherwise BERT trains on `pretrain prepare text` shards.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from data_pipeline.errors import UserError
from training.data.files import DEFAULT_VERIFY, VERIFY_MODES

if TYPE_CHECKING:
    from training.config import Config


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``pretrain train`` (the same as ``python -m training``)."""
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/bert-tiny.yaml")
    parser.add_argument(
        "--data",
        default=None,
        help="prepared shard directory (holds manifest.json); left out when the config mixes data.sources",
    )
    parser.add_argument("--run-dir", required=True, help="output: metrics, checkpoints, traces, config.yaml")
    parser.add_argument(
        "--max-steps",
        type=_positive,
        default=None,
        help="stop (and save) at this step; the LR schedule still follows train.total_steps",
    )
    parser.add_argument("--log-every", type=_positive, default=None, help="override train.log_every")
    parser.add_argument("--save-every", type=_positive, default=None, help="override train.save_every")
    parser.add_argument(
        "--resume",
        default="auto",
        help="auto (latest complete checkpoint of --run-dir, if any), never, or a checkpoint tag dir",
    )
    parser.add_argument(
        "--init-from",
        default=None,
        metavar="PATH",
        help="start BERT from these weights (a run directory, a `pretrain export` directory or a HuggingFace "
        "BertForPreTraining/BertForMaskedLM directory); the model shape comes from PATH, the optimizer, "
        "schedule, data position and step start fresh; a checkpoint in --run-dir is resumed instead",
    )
    parser.add_argument(
        "--trace-samples",
        action="store_true",
        help="append the id of every consumed sample to RUN_DIR/trace/rankNNNNN.txt",
    )
    parser.add_argument(
        "--verify-shards",
        choices=VERIFY_MODES,
        default=DEFAULT_VERIFY,
        help="check shards against the manifest: full (size at start, sha256 when first read; default), "
        "size (size only), none (trust the files)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set deepspeed.zero_optimization.stage=3 (repeatable)",
    )


def overrides_of(args: argparse.Namespace) -> list[str]:
    """``--set`` items plus the dedicated flags, which apply last (so they win)."""
    overrides = list(args.overrides)
    if args.log_every is not None:
        overrides.append(f"train.log_every={args.log_every}")
    if args.save_every is not None:
        overrides.append(f"train.save_every={args.save_every}")
    return overrides


def data_location(data: str | None, config: Config) -> str:
    """The data directory of a run: ``--data``, or for a mixture (``data.sources``) the first source's.

    In a mixture the first source supplies the validation split and the tokenizer that exports copy
    (every source shares it).

    Raises:
        UserError: Both or neither of ``--data`` and ``data.sources`` name the data, or a SimCLR
            config lists ``data.sources``.
    """
    sources = config.data.sources
    if data is not None and sources:
        raise UserError(
            f"--data {data} and data.sources ({len(sources)} sources in the config) both name the data; "
            "give --data for one data set or data.sources for a mixture, not both"
        )
    if data is None and not sources:
        raise UserError("pretrain train needs --data DIR, or data.sources in the config for a mixture")
    if sources and config.simclr is not None:
        raise UserError("data.sources (a mixture) is for BERT's text shards; a simclr run reads one --data")
    return data if data is not None else str(sources[0].path)


def run(args: argparse.Namespace) -> int:
    """Load the config, then train (imports DeepSpeed only now, so ``--help`` stays fast)."""
    from training.config import load_config
    from training.trainer import RunOptions, train

    if getattr(args, "passthrough", None):
        raise UserError(f"pretrain train takes no arguments after `--`, got {args.passthrough}")
    config = load_config(args.config, overrides_of(args))
    options = RunOptions(
        data_dir=data_location(args.data, config),
        run_dir=Path(args.run_dir),
        max_steps=args.max_steps,
        resume=args.resume,
        trace_samples=args.trace_samples,
        verify_shards=args.verify_shards,
        init_from=args.init_from,
    )
    return train(config, options)
