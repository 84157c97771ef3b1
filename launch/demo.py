"""`pretrain demo`: the whole pipeline on an embedded corpus that needs no download.

    pretrain demo                      # work files under ./demo-work
    pretrain demo --workdir /tmp/demo  # elsewhere
    pretrain demo --skip-train         # stop after tokenizer -> prepare -> inspect

The corpus is the docstrings of the Python standard library and installed packages on this machine
(real English prose about software), one document per module, standard library first.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Iterator

from data_pipeline.errors import UserError

# Enough text for a tokenizer and a few hundred training steps, small enough for minutes on 2 cores.
DEFAULT_CORPUS_MB = 6.0
REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="demo-work", help="directory for the corpus, shards and run")
    parser.add_argument("--corpus-mb", type=float, default=DEFAULT_CORPUS_MB, help="size of the embedded corpus")
    parser.add_argument("--vocab-size", type=int, default=8000, help="SentencePiece vocabulary size")
    parser.add_argument("--steps", type=int, default=300, help="pre-training steps")
    parser.add_argument("--processes", type=int, default=2, help="DeepSpeed processes for pre-training")
    parser.add_argument("--skip-train", action="store_true", help="stop after tokenizer, prepare and inspect")


def module_docstrings(source: str) -> list[str]:
    """The module, class and function docstrings of one Python source, in file order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    nodes = [tree] + [
        node
        for node in ast.walk(tree)
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    texts = (ast.get_docstring(node, clean=True) for node in nodes)
    return [text for text in texts if text and len(text) > 40]


def python_sources() -> Iterator[tuple[str, Path]]:
    """Standard-library modules first, then installed packages, each sorted by path; no test code."""
    paths = sysconfig.get_paths()
    for label, root in (("stdlib", Path(paths["stdlib"])), ("site-packages", Path(paths["purelib"]))):
        for path in sorted(root.rglob("*.py")):
            relative = path.relative_to(root)
            if label == "stdlib" and relative.parts[0] == "site-packages":
                continue
            if {"test", "tests"} & set(relative.parts) or path.stat().st_size > 2**20:
                continue
            yield f"{label}/{relative}", path


def docstring_documents(max_bytes: int) -> Iterator[dict[str, str]]:
    """One document per Python module (its docstrings joined by blank lines) up to ``max_bytes``."""
    total = 0
    for name, path in python_sources():
        try:
            docstrings = module_docstrings(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        if not docstrings:
            continue
        text = "\n\n".join(docstrings)
        yield {"id": name, "text": text}
        total += len(text.encode("utf-8"))
        if total >= max_bytes:
            return


def write_corpus(workdir: Path, corpus_mb: float) -> Path:
    """Write the embedded corpus as jsonl (once; reused when already there)."""
    path = workdir / "corpus" / "python-docstrings.jsonl"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".tmp"), "w", encoding="utf-8") as handle:
        for document in docstring_documents(int(corpus_mb * 2**20)):
            handle.write(json.dumps(document, ensure_ascii=False) + "\n")
    if path.with_suffix(".tmp").stat().st_size == 0:
        raise UserError(f"no Python docstrings found under {sysconfig.get_paths()['stdlib']}")
    os.replace(path.with_suffix(".tmp"), path)
    return path


def run_stage(title: str, argv: list[str]) -> None:
    """Run one `pretrain` subcommand in this process, with a banner and its wall time."""
    from launch.cli import main as cli_main

    print(f"\n=== {title}: pretrain {' '.join(argv)}", flush=True)
    started = time.perf_counter()
    code = cli_main(argv)
    if code != 0:
        raise UserError(f"demo stage {title!r} failed with exit code {code}")
    print(f"=== {title}: done in {time.perf_counter() - started:.1f} s", flush=True)


def train_command(data_dir: Path, run_dir: Path, steps: int, processes: int) -> list[str]:
    """The DeepSpeed launcher command for the demo's pre-training run."""
    config = REPO_CONFIGS / "bert-tiny.yaml"
    if not config.exists():
        raise UserError(f"demo config {config} not found: run the demo from a source checkout")
    return [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(processes),
        "--module", "training",
        "--config", str(config), "--data", str(data_dir), "--run-dir", str(run_dir),
        "--set", f"train.total_steps={steps}", "--resume", "never",
    ]


def print_loss_curve(run_dir: Path, points: int = 8) -> None:
    """Print a few evenly spaced logged losses so the falling curve is visible."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    train = [record for record in records if "loss" in record]
    if not train:
        raise UserError(f"{run_dir}/metrics.jsonl holds no training loss")
    stride = max(1, len(train) // points)
    print("\n  step      loss   mlm_acc")
    for record in train[::stride] + ([train[-1]] if (len(train) - 1) % stride else []):
        print(f"  {record['step']:>4}  {record['loss']:8.4f}  {record.get('mlm_acc', float('nan')):8.4f}")


def run(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(workdir, args.corpus_mb)
    print(f"embedded corpus: {corpus} ({corpus.stat().st_size / 2**20:.1f} MB of Python docstrings)")
    tokenizer_dir, data_dir = workdir / "tokenizer", workdir / "shards"
    run_stage("tokenizer", ["tokenizer", str(corpus), "--out", str(tokenizer_dir),
                            "--vocab-size", str(args.vocab_size)])
    shutil.rmtree(data_dir, ignore_errors=True)
    run_stage("prepare", ["prepare", "text", str(corpus), "--tokenizer", str(tokenizer_dir),
                          "--output", str(data_dir), "--shard-mb", "1", "--val-fraction", "0.02"])
    run_stage("inspect", ["inspect", str(data_dir), "--samples", "2"])
    if args.skip_train:
        return 0
    run_dir = workdir / "run"
    command = train_command(data_dir, run_dir, args.steps, args.processes)
    print(f"\n=== train: {' '.join(command)}", flush=True)
    environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if subprocess.run(command, env=environment).returncode != 0:
        raise UserError("demo pre-training failed; see the log above")
    print_loss_curve(run_dir)
    return 0
