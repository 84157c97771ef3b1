"""``python -m training``: the ``pretrain train`` command for launchers that start a module per rank.

    deepspeed --num_gpus 2 --module training --config configs/bert-tiny.yaml --data DATA --run-dir RUN
    torchrun --nproc_per_node 2 -m training --config configs/bert-tiny.yaml --data DATA --run-dir RUN
    deepspeed --num_gpus 2 --module training --config configs/simclr-tiny.yaml --data IMAGE_SHARDS --run-dir RUN

The DeepSpeed launcher appends ``--local_rank=N``; it is accepted and ignored, because every launcher
also sets RANK/WORLD_SIZE/LOCAL_RANK in the environment, which is where the rank is read from.
"""

from __future__ import annotations

import argparse
import sys

from data_pipeline.errors import UserError
from training import commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training", description="DeepSpeed pre-training on prepared shards"
    )
    commands.add_arguments(parser)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.passthrough = []
    try:
        return commands.run(args)
    except UserError as error:
        print(f"pretrain train: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
