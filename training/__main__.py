"""``python -m training``: the ``pretrain train`` command for launchers that start a module per rank.

    deepspeed --num_gpus 2 --module training --config configs/bert-tiny.yaml --data DATA --run-dir RUN
    torchrun --nproc_per_node 2 -m training --config configs/bert-tiny.yaml --data DATA --run-dir RUN
    deepspeed --num_gpus 2 --module training --config configs/simclr-tiny.yaml --data IMAGE_SHARDS --run-dir RUN

The DeepSpeed launcher appends ``--local_rank=N``; it is accepted and ignored, because every launcher
also sets RANK/WORLD_SIZE/LOCAL_RANK in the environment, which is where the rank is read from.

Stopping: SIGTERM, SIGINT or SIGUSR1 to any rank makes every rank finish its step, save one checkpoint
and exit 0. Under ``deepspeed``, send SIGTERM to the ``deepspeed`` command: it ends without passing the
signal on, and the ranks, seeing it gone, save and exit (no deadline). Ctrl-C in its terminal also saves,
but DeepSpeed's per-node launcher kills the ranks 30 s after passing the signal on, and its runner prints
its own KeyboardInterrupt traceback. A rank that stops answering fails the others after
``train.collective_timeout_s`` (default 600) with an error naming it, and a non-zero exit.
"""

from __future__ import annotations

import argparse
import sys

from data_pipeline.errors import UserError
from training import commands
from training.stop import RankFailure


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
    except RankFailure as error:
        print(f"pretrain train: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
