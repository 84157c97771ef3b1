"""The ``pretrain`` console script: one entry point, one subcommand per stage.

    pretrain tokenizer INPUT... --out DIR --vocab-size N
    pretrain prepare text INPUT... --tokenizer PATH --output DIR [-- BEAM_OPTIONS...]
    pretrain prepare images INPUT... --output DIR [--size 256] [--val-fraction F] [-- BEAM_OPTIONS...]
    pretrain inspect DIR [--samples N]
    pretrain train --config FILE --data DIR --run-dir DIR
    pretrain export RUN_DIR --out DIR [--format native|hf]
    pretrain finetune --config FILE --model PATH --train FILE --eval FILE --run-dir DIR
    pretrain demo [--workdir DIR]
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from data_pipeline.errors import UserError
from data_pipeline.tables import format_table
from training.stop import RankFailure


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless X is None/False or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS, []):
            return text
        return f"{text} (default: %(default)s)"


@dataclass(frozen=True)
class Command:
    """A subcommand: a one-line summary and the module that implements it.

    The module is imported only when its subcommand runs, so ``pretrain --help`` is instant and a
    training node without Apache Beam can still run ``pretrain train``. The module provides
    ``add_arguments(parser)`` and ``run(args) -> int``.
    """

    summary: str
    module: str


COMMANDS: dict[str, Command] = {}


def register(name: str, summary: str, module: str) -> None:
    """Add a subcommand; a duplicate name is a programming error."""
    if name in COMMANDS:
        raise ValueError(f"subcommand {name!r} registered twice")
    COMMANDS[name] = Command(summary, module)


register("tokenizer", "train a SentencePiece tokenizer with BERT specials", "data_pipeline.text.tokenizer_command")
register("prepare text", "Beam job: text corpora -> shuffled WebDataset shards", "data_pipeline.text.command")
register("prepare images", "Beam job: image folders/parquet -> shuffled WebDataset shards", "data_pipeline.images.command")
register("inspect", "print a shard directory's manifest and decoded examples", "data_pipeline.inspect_command")
register("train", "DeepSpeed pre-training on prepared shards", "training.commands")
register("export", "consolidate a checkpoint into portable safetensors (native or HF)", "training.export.command")
register("finetune", "fine-tune a pre-trained (or random) encoder on a labelled task", "training.finetune.commands")
register("demo", "run the whole pipeline on an embedded corpus", "launch.demo")


def _top_level_help() -> str:
    lines = ["usage: pretrain SUBCOMMAND [options]", "", "subcommands:"]
    lines.append(format_table([(name, command.summary) for name, command in COMMANDS.items()], indent="  "))
    lines += ["", "Run `pretrain SUBCOMMAND --help` for the options of each."]
    return "\n".join(lines)


def _find_command(argv: Sequence[str]) -> tuple[str, list[str]] | None:
    """Match the longest registered name at the start of argv (``prepare text`` before ``prepare``)."""
    for words in (2, 1):
        name = " ".join(argv[:words])
        if len(argv) >= words and name in COMMANDS:
            return name, list(argv[words:])
    return None


def build_parser(name: str) -> tuple[argparse.ArgumentParser, Callable[[argparse.Namespace], int]]:
    """The argument parser and run function of subcommand ``name``."""
    command = COMMANDS[name]
    module = importlib.import_module(command.module)
    parser = argparse.ArgumentParser(
        prog=f"pretrain {name}",
        description=command.summary,
        formatter_class=HelpFormatter,
    )
    module.add_arguments(parser)
    return parser, module.run


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_level_help())
        return 0
    found = _find_command(argv)
    if found is None:
        print(f"pretrain: unknown subcommand {' '.join(argv[:2])!r}\n\n{_top_level_help()}", file=sys.stderr)
        return 2
    name, rest = found
    # Everything after a bare `--` is passed through untouched (Beam pipeline options).
    passthrough: list[str] = []
    if "--" in rest:
        cut = rest.index("--")
        rest, passthrough = rest[:cut], rest[cut + 1 :]
    parser, run = build_parser(name)
    args = parser.parse_args(rest)
    args.passthrough = passthrough
    try:
        return int(run(args) or 0)
    except UserError as error:
        print(f"pretrain {name}: error: {error}", file=sys.stderr)
        return 2
    except RankFailure as error:
        print(f"pretrain {name}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"pretrain {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
