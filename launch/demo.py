"""`pretrain demo`: the whole pipeline on an embedded corpus that needs no download.

    pretrain demo                      # work files under ./demo-work
    pretrain demo --workdir /tmp/demo  # elsewhere
    pretrain demo --skip-train         # stop after tokenizer -> prepare -> inspect

Stages: corpus -> tokenizer -> prepare (Beam) -> inspect -> 2-process DeepSpeed pre-training of
bert-tiny -> HF-format export -> fine-tuning on a labelled task derived from the corpus (which package
a docstring paragraph comes from), once from the pre-trained export and once from random
initialisation, with both scores printed side by side.

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
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data_pipeline.errors import UserError

# Enough text for a tokenizer and a few hundred training steps, small enough for minutes on 2 cores.
DEFAULT_CORPUS_MB = 6.0
# The derived labelled task: paragraphs of the most frequent top-level packages, balanced.
TASK_CLASSES = 4
TASK_TRAIN_PER_CLASS = 150
TASK_EVAL_PER_CLASS = 100
REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="demo-work", help="directory for the corpus, shards and run")
    parser.add_argument("--corpus-mb", type=float, default=DEFAULT_CORPUS_MB, help="size of the embedded corpus")
    parser.add_argument("--vocab-size", type=int, default=8000, help="SentencePiece vocabulary size")
    parser.add_argument("--steps", type=int, default=1000, help="pre-training steps")
    parser.add_argument("--processes", type=int, default=2, help="DeepSpeed processes for pre-training")
    parser.add_argument("--skip-train", action="store_true", help="stop after tokenizer, prepare and inspect")
    parser.add_argument("--finetune-epochs", type=int, default=4, help="epochs of each fine-tuning run")


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
        handle.writelines(json.dumps(document, ensure_ascii=False) + "\n" for document in docstring_documents(int(corpus_mb * 2**20)))
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


def package_of(document_id: str) -> str:
    """`stdlib/email/parser.py` -> `stdlib/email`; a top-level module is its own package."""
    parts = document_id.split("/")
    return "/".join(parts[:2]).removesuffix(".py")


def paragraphs(text: str, min_chars: int = 60, max_chars: int = 600) -> list[str]:
    """Blank-line separated paragraphs of a document that are long enough to classify."""
    blocks = (" ".join(block.split()) for block in text.split("\n\n"))
    return [block[:max_chars] for block in blocks if len(block) >= min_chars]


def derive_task(corpus: Path, task_dir: Path, seed: int = 0) -> tuple[Path, Path, list[str]]:
    """A labelled task from the corpus: which package does a docstring paragraph come from?

    The packages are the TASK_CLASSES with the most paragraphs; train and eval paragraphs come from
    different modules, so the task cannot be solved by recognising a module seen in training.
    """
    by_package: dict[str, list[tuple[str, str]]] = {}
    for line in corpus.read_text(encoding="utf-8").splitlines():
        document = json.loads(line)
        for paragraph in paragraphs(document["text"]):
            by_package.setdefault(package_of(document["id"]), []).append((document["id"], paragraph))
    counts = Counter({package: len(rows) for package, rows in by_package.items()})
    classes = sorted(package for package, _ in counts.most_common(TASK_CLASSES))
    rng = np.random.default_rng(seed)
    train, evaluation = [], []
    for label in classes:
        modules = sorted({module for module, _ in by_package[label]})
        held_out = set(rng.permutation(modules)[: max(1, len(modules) // 3)].tolist())
        rows = [(module, text) for module, text in by_package[label]]
        rng.shuffle(rows)
        train += [(text, label) for module, text in rows if module not in held_out][:TASK_TRAIN_PER_CLASS]
        evaluation += [(text, label) for module, text in rows if module in held_out][:TASK_EVAL_PER_CLASS]
    task_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in (("train", train), ("eval", evaluation)):
        path = task_dir / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1], classes


def finetune_score(model: str, train: Path, evaluation: Path, run_dir: Path, extra: list[str]) -> dict:
    """Fine-tune from `model` (an export dir, or none) and return the final-epoch metrics."""
    config = REPO_CONFIGS / "finetune-classification.yaml"
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "launch.cli", "finetune", "--config", str(config), "--model", model,
               "--train", str(train), "--eval", str(evaluation), "--run-dir", str(run_dir), *extra]
    print(f"\n=== finetune: {' '.join(command[2:])}", flush=True)
    if subprocess.run(command, check=False).returncode != 0:
        raise UserError(f"demo fine-tuning from {model} failed; see the log above")
    return json.loads((run_dir / "eval.json").read_text())["final"]


def compare_transfer(workdir: Path, corpus: Path, export_dir: Path, tokenizer_dir: Path, epochs: int) -> None:
    """Fine-tune the pre-trained export and a random-init model alike; print both scores."""
    train, evaluation, classes = derive_task(corpus, workdir / "task")
    print(f"\nlabelled task: which package a docstring paragraph comes from, classes {classes}")
    common = ["--set", f"train.epochs={epochs}", "--set", "train.patience=0",
              "--set", "deepspeed.optimizer.params.lr=0.0005",
              "--set", "deepspeed.scheduler.params.warmup_max_lr=0.0005"]
    pretrained = finetune_score(str(export_dir), train, evaluation, workdir / "finetune-pretrained", common)
    baseline = finetune_score("none", train, evaluation, workdir / "finetune-random",
                              [*common, "--tokenizer", str(tokenizer_dir)])
    print("\n  init          accuracy  macro_f1       mcc")
    for name, scores in (("pre-trained", pretrained), ("random", baseline)):
        print(f"  {name:<12}  {scores['accuracy']:8.4f}  {scores['macro_f1']:8.4f}  {scores['mcc']:8.4f}")


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
    if subprocess.run(command, env=environment, check=False).returncode != 0:
        raise UserError("demo pre-training failed; see the log above")
    print_loss_curve(run_dir)
    export_dir = workdir / "export"
    shutil.rmtree(export_dir, ignore_errors=True)
    run_stage("export", ["export", str(run_dir), "--out", str(export_dir), "--format", "hf"])
    compare_transfer(workdir, corpus, export_dir, tokenizer_dir, args.finetune_epochs)
    return 0
