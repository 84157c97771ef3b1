"""``pretrain export``: consolidate a run's ZeRO checkpoint into a portable safetensors directory.

pretrain export runs/tiny --out exports/tiny                       # newest complete checkpoint, native fp32
pretrain export runs/base --out exports/base-hf --format hf --dtype bf16
pretrain export runs/base --out exports/base-200 --step 200
pretrain export runs/simclr --out exports/simclr-r18               # SimCLR: ResNet encoder, torchvision names
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from data_pipeline.errors import UserError
from data_pipeline.tables import format_table


def _step(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a step number >= 0, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``pretrain export``."""
    parser.add_argument("run_dir", help="training run directory (holds checkpoints/)")
    parser.add_argument("--out", required=True, help="export directory to write")
    parser.add_argument("--step", type=_step, default=None, help="checkpoint step (default: newest complete)")
    parser.add_argument("--format", default="native", help="native (our layout) or hf (transformers)")
    parser.add_argument("--dtype", default="fp32", help="stored weight dtype: fp32, bf16 or fp16")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="spm.model to include when the run's data folder has moved (checked against its sha256)",
    )


def run(args: argparse.Namespace) -> int:
    """Consolidate, cast, write; print a short summary. Imports torch and DeepSpeed only now."""
    from training.export import bert, resnet

    if getattr(args, "passthrough", None):
        raise UserError(f"pretrain export takes no arguments after `--`, got {args.passthrough}")
    bert.check_options(args.format, args.dtype)  # before the (long) consolidation
    started = time.perf_counter()
    run_dir, out_dir = Path(args.run_dir), Path(args.out)
    if resnet.run_method(run_dir, args.step) == resnet.METHOD:
        return run_simclr(args, run_dir, out_dir, started)
    return run_bert(args, run_dir, out_dir, started)


def run_bert(args: argparse.Namespace, run_dir: Path, out_dir: Path, started: float) -> int:
    """Export a BERT run in the ``native`` or ``hf`` layout, with its tokenizer."""
    from training.dtypes import DTYPES
    from training.export.bert import TIED_ALIASES, hf_tokenizer_problem, write_export
    from training.export.bert_read import read_run_checkpoint
    from training.export.files import WEIGHTS_FILE

    tokenizer = Path(args.tokenizer) if args.tokenizer else None
    model_config, state_dict, spm_model_path, card = read_run_checkpoint(
        run_dir, args.step, DTYPES[args.dtype], tokenizer
    )
    write_export(
        out_dir, state_dict, model_config, spm_model_path, fmt=args.format, dtype=args.dtype, card=card
    )
    parameters = sum(t.numel() for n, t in state_dict.items() if n not in TIED_ALIASES)
    del state_dict
    size = (out_dir / WEIGHTS_FILE).stat().st_size
    rows = [
        ("checkpoint", card["source"]),
        ("step", str(card["training"].get("step"))),
        ("format / dtype", f"{args.format} / {args.dtype}"),
        ("parameters", f"{parameters:,}"),
        ("weights", f"{out_dir / WEIGHTS_FILE} ({size / 2**20:.1f} MiB)"),
        ("files", ", ".join(sorted(path.name for path in out_dir.iterdir()))),
        ("time", f"{time.perf_counter() - started:.1f} s"),
    ]
    rows += [("note", note) for note in card.get("notes", [])]
    if args.format == "hf":
        problem = hf_tokenizer_problem(spm_model_path)
        if problem:
            rows.append(("note", f"no HF tokenizer.json: {problem}"))
    print_rows(rows)
    return 0


def print_rows(rows: list[tuple[str, str]]) -> None:
    """The summary: one ``name  value`` line per row, names padded to one width."""
    print(format_table(rows))


def run_simclr(args: argparse.Namespace, run_dir: Path, out_dir: Path, started: float) -> int:
    """Export a SimCLR run's encoder (torchvision ResNet names); ``--format``/``--tokenizer`` do not apply."""
    from training.dtypes import DTYPES
    from training.export import resnet
    from training.export.files import WEIGHTS_FILE

    if args.format != "native" or args.tokenizer:
        raise UserError(
            f"{run_dir}: a simclr run exports its ResNet encoder in torchvision's layout; "
            "--format hf and --tokenizer apply to BERT runs only"
        )
    model_config, encoder, card = resnet.read_simclr_checkpoint(run_dir, args.step, DTYPES[args.dtype])
    extra = {"pretrained_with": resnet.METHOD}
    resnet.write_resnet_export(out_dir, encoder, model_config, dtype=args.dtype, card=card, extra_config=extra)
    parameters = sum(t.numel() for t in encoder.values() if t.is_floating_point())
    size = (out_dir / WEIGHTS_FILE).stat().st_size
    rows = [
        ("checkpoint", card["source"]),
        ("step", str(card["training"].get("step"))),
        ("format / dtype", f"{resnet.EXPORT_FORMAT} (resnet{model_config['depth']}) / {args.dtype}"),
        ("parameters", f"{parameters:,} (encoder; projection head left out)"),
        ("weights", f"{out_dir / WEIGHTS_FILE} ({size / 2**20:.1f} MiB)"),
        ("files", ", ".join(sorted(path.name for path in out_dir.iterdir()))),
        ("time", f"{time.perf_counter() - started:.1f} s"),
    ]
    print_rows(rows + [("note", note) for note in card.get("notes", [])])
    return 0
