"""`prepare text` throughput side by side with raw SentencePiece and the HuggingFace run_mlm recipe.

    python benchmarks/prepare_text.py                 # 200 MB corpus, all cores
    python benchmarks/prepare_text.py --mb 20         # quick check
    python benchmarks/prepare_text.py --corpus DIR    # your own .jsonl files ({"text": ...} per line)
    python benchmarks/prepare_text.py --workdir W     # keep (and on a rerun reuse) corpus and tokenizer
    python benchmarks/prepare_text.py --sizes 200,1000,2000 --cores 2 --workdir W   # the scaling table

The generated corpus is real English prose without any download: sentences harvested from the
docstrings of the installed Python packages (``ast``), recombined by a seeded rng into unique
documents, written as jsonl files. On that same text and the same cores it measures:
  ours        `pretrain prepare text` end to end (read, clean, de-dup, split, tokenise, NSP examples,
              global shuffle, shards, manifest) on the multi-process DirectRunner
  raw SPM     SentencePiece batch encoding of the same texts with all cores: the tokenising limit
  HF          datasets + tokenizers, the run_mlm recipe: load_dataset("json"), tokenize (batched,
              num_proc = cores), group_texts into 128-token blocks. The tokenizer is a tokenizers-native
              Unigram built from the same spm pieces and scores (nmt_nfkc-like normalizer, Metaspace, byte fallback);
              the share of documents it encodes id for id like SentencePiece is printed.
Every MB/s uses the same numerator: the corpus size in MB (1e6 bytes). Peak RSS is summed over the
process tree of each run (the `pretrain` process and its workers, not this script), sampled every 0.2 s.

``--sizes`` prints the scaling table instead: ours at each corpus size (MB/s and peak RSS, which must
stay flat), ours on the Dask runner (a local cluster of ``--cores`` worker processes) at the first
size, and raw SentencePiece on the first size's texts as the baseline of the ratio column.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import psutil

from data_pipeline.text.sentences import split_sentences

ROOT = Path(__file__).resolve().parents[1]
VOCAB_SIZE = 8000
BLOCK_SIZE = 128


# ------------------------------------------------------------------------------------------- corpus


def harvest_sentences(limit: int = 150_000, max_files: int = 6000) -> list[str]:
    """Unique prose sentences from docstrings of installed packages, in a deterministic order."""
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    found: set[str] = set()
    for index, path in enumerate(sorted(site.rglob("*.py"))):
        if index >= max_files or len(found) >= limit:
            break
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node)
                if docstring:
                    found.update(s for s in split_sentences(" ".join(docstring.split())) if _is_prose(s))
    return sorted(found)


def _is_prose(sentence: str) -> bool:
    words = sentence.split()
    letters = sum(c.isalpha() or c == " " for c in sentence)
    return (
        30 <= len(sentence) <= 300
        and len(words) >= 5
        and sentence[0].isupper()
        and sentence[-1] in ".!?"
        and letters >= 0.85 * len(sentence)
    )


def write_corpus(directory: Path, megabytes: float, files: int, seed: int = 0) -> list[Path]:
    """jsonl files of unique documents (8-40 harvested sentences in paragraphs) until ``megabytes``."""
    sentences = harvest_sentences()
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"part-{i:03d}.jsonl" for i in range(files)]
    written, target, doc = 0, megabytes * 1e6, 0
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(open(path, "w", encoding="utf-8")) for path in paths]
        while written < target:
            chosen = rng.choices(sentences, k=rng.randint(8, 40))
            paragraphs = [" ".join(chosen[i : i + rng.randint(3, 6)]) for i in range(0, len(chosen), 5)]
            line = json.dumps({"text": "\n\n".join(paragraphs)}, ensure_ascii=False) + "\n"
            handles[doc % files].write(line)
            written += len(line.encode("utf-8"))
            doc += 1
    print(f"corpus: {doc:,} documents, {written / 1e6:,.1f} MB from {len(sentences):,} harvested sentences")
    return paths


def corpus_texts(paths: list[Path]) -> Iterator[str]:
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                yield json.loads(line)["text"]


# --------------------------------------------------------------------------------------- measuring


class PeakRss:
    """Peak of the summed RSS of this process's children (and theirs), sampled in a thread.

    Args:
        interval: Seconds between samples. Defaults to 0.2.
        include_self: Count this process too (a run inside it, like raw SPM). Defaults to True.
    """

    def __init__(self, interval: float = 0.2, include_self: bool = True) -> None:
        self.interval = interval
        self.include_self = include_self
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = me.memory_info().rss if self.include_self else 0
            for child in me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    @contextlib.contextmanager
    def sampling(self) -> Iterator[None]:
        """Sample while the ``with`` block runs."""
        self._thread.start()
        try:
            yield
        finally:
            self._stop.set()
            self._thread.join()


def cpu_seconds() -> float:
    """User + system CPU time of this process and of every child it has waited for."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


@dataclass
class Measured:
    """One run: wall seconds, CPU seconds (robust on a shared machine), peak RSS and its result."""

    name: str
    seconds: float
    cpu: float
    rss: int
    result: Any


def timed(name: str, run: Callable[[], Any], in_children: bool = False) -> Measured:
    """Measure ``run()``; ``in_children``: it runs in child processes, leave this one's RSS out."""
    rss = PeakRss(include_self=not in_children)
    with rss.sampling():
        cpu, started = cpu_seconds(), time.perf_counter()
        result = run()
        seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    return Measured(name, seconds, cpu, rss.peak, result)


def run_cli(args: list[str]) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "launch.cli", *args], check=False, cwd=ROOT, capture_output=True, text=True
    )
    if completed.returncode != 0:
        raise SystemExit(
            f"pretrain {' '.join(args[:2])} failed:\n{completed.stdout}\n{completed.stderr[-4000:]}"
        )
    print(completed.stdout.rstrip())


# ----------------------------------------------------------------------------------------- the runs


def run_ours(
    paths: list[Path], model: Path, output: Path, cores: int, beam: list[str] | None = None
) -> dict[str, Any]:
    """`pretrain prepare text` on ``paths``; ``beam`` options default to ``cores`` DirectRunner workers."""
    shutil.rmtree(output, ignore_errors=True)
    inputs = [str(path) for path in paths]
    args = ["prepare", "text", *inputs, "--tokenizer", str(model), "--output", str(output)]
    run_cli([*args, "--", *(beam if beam is not None else [f"--direct_num_workers={cores}"])])
    return json.loads((output / "manifest.json").read_text())


def run_raw_spm(texts: list[str], model: Path, cores: int) -> int:
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(model))
    tokens = 0
    for start in range(0, len(texts), 2000):
        for ids in processor.Encode(texts[start : start + 2000], num_threads=cores):
            tokens += len(ids)
    return tokens


def hf_tokenizer(model: Path) -> Any:
    """A tokenizers-native Unigram with the spm model's pieces and scores, wrapped for transformers."""
    import sentencepiece as spm
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    processor = spm.SentencePieceProcessor(model_file=str(model))
    vocab = [(processor.IdToPiece(i), processor.GetScore(i)) for i in range(processor.GetPieceSize())]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=1, byte_fallback=True))
    # SentencePiece's nmt_nfkc: NFKC, every whitespace run one space, stripped.
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )


def run_hf(paths: list[Path], model: Path, cache: Path, cores: int) -> int:
    """run_mlm.py's preprocessing: load json, tokenize, group_texts; returns the blocks produced."""
    from datasets import load_dataset

    tokenizer = hf_tokenizer(model)
    shutil.rmtree(cache, ignore_errors=True)
    raw = load_dataset("json", data_files=[str(p) for p in paths], split="train", cache_dir=str(cache))

    def tokenize(batch: dict[str, list[str]]) -> Any:
        return tokenizer(batch["text"], return_special_tokens_mask=True)

    def group_texts(examples: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total = (len(concatenated["input_ids"]) // BLOCK_SIZE) * BLOCK_SIZE
        return {
            k: [t[i : i + BLOCK_SIZE] for i in range(0, total, BLOCK_SIZE)] for k, t in concatenated.items()
        }

    tokenized = raw.map(tokenize, batched=True, num_proc=cores, remove_columns=["text"])
    grouped = tokenized.map(group_texts, batched=True, num_proc=cores)
    return len(grouped)


def hf_agreement(texts: list[str], model: Path, sample: int = 300) -> float:
    """Share of documents the HF tokenizer encodes exactly like SentencePiece."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(model))
    tokenizer = hf_tokenizer(model)
    chosen = texts[:sample]
    ours = processor.Encode(chosen)
    theirs = tokenizer(chosen, add_special_tokens=False)["input_ids"]
    return sum(a == b for a, b in zip(ours, theirs)) / len(chosen)


# ------------------------------------------------------------------------------------------- report


def report(rows: list[Measured], megabytes: float, cores: int) -> None:
    print(f"\n{megabytes:,.1f} MB, {cores} cores")
    print(
        f"{'':<10} {'seconds':>9} {'MB/s':>8} {'MB/s/core':>10} {'CPU s':>8} {'MB/CPU-s':>9} {'peak RSS GB':>12}"
    )
    for row in rows:
        speed = megabytes / row.seconds
        print(
            f"{row.name:<10} {row.seconds:>9.1f} {speed:>8.2f} {speed / cores:>10.2f} {row.cpu:>8.1f} "
            f"{megabytes / row.cpu:>9.2f} {row.rss / 2**30:>12.2f}"
        )


def corpus_in(directory: Path, megabytes: float, cores: int) -> list[Path]:
    """The jsonl files of ``directory``: reused when they hold ``megabytes`` already, else generated."""
    cached = sorted(directory.glob("*.jsonl"))
    if cached and sum(path.stat().st_size for path in cached) >= megabytes * 1e6:
        return cached
    return write_corpus(directory, megabytes, files=max(8, 2 * cores))


def tokenizer_for(paths: list[Path], model: Path) -> Path:
    """``model``, trained on ``paths`` first unless it exists."""
    if not model.exists():
        started = time.perf_counter()
        train = ["tokenizer", *map(str, paths), "--out", str(model.parent), "--vocab-size", str(VOCAB_SIZE)]
        run_cli([*train, "--max-docs", "20000"])
        print(
            f"tokenizer: {time.perf_counter() - started:.1f} s ({VOCAB_SIZE} unigram pieces, 20,000 documents)"
        )
    return model


def scaling(sizes: list[float], workdir: Path, cores: int, tokenizer: Path | None) -> None:
    """The scaling table: ours at every size, ours on Dask and raw SPM at the first size."""
    corpora = {size: corpus_in(workdir / f"corpus-{size:g}mb", size, cores) for size in sizes}
    model = tokenizer or tokenizer_for(corpora[sizes[0]], workdir / "tok" / "spm.model")
    rows: list[tuple[str, float, Measured]] = []
    for size, paths in corpora.items():
        megabytes = sum(path.stat().st_size for path in paths) / 1e6
        run = timed(
            "ours", lambda paths=paths: run_ours(paths, model, workdir / "shards", cores), in_children=True
        )
        rows.append((f"ours {size:g} MB", megabytes, run))
        print(
            f"{rows[-1][0]}: {megabytes / run.seconds:.2f} MB/s, peak RSS {run.rss / 2**30:.2f} GB",
            flush=True,
        )
    first = corpora[sizes[0]]
    megabytes = sum(path.stat().st_size for path in first) / 1e6
    if importlib.util.find_spec("distributed") is not None:
        dask = ["--runner", "DaskRunner"]
        run = timed("dask", lambda: run_ours(first, model, workdir / "shards", cores, dask), in_children=True)
        rows.append((f"ours on Dask {sizes[0]:g} MB", megabytes, run))
    texts = list(corpus_texts(first))
    raw = timed("raw SPM", lambda: run_raw_spm(texts, model, cores))
    raw_speed, raw_cpu_speed = megabytes / raw.seconds, megabytes / raw.cpu
    print(f"\nscaling, {cores} cores (raw SentencePiece on {megabytes:,.0f} MB: {raw_speed:.2f} MB/s)")
    print(
        f"{'':<22} {'MB':>8} {'seconds':>9} {'MB/s':>8} {'/ raw SPM':>10} {'CPU s':>8} "
        f"{'/ raw (CPU)':>12} {'peak RSS GB':>12}"
    )
    for name, size_mb, row in [*rows, (f"raw SPM {sizes[0]:g} MB", megabytes, raw)]:
        speed = size_mb / row.seconds
        print(
            f"{name:<22} {size_mb:>8,.0f} {row.seconds:>9.1f} {speed:>8.2f} {speed / raw_speed:>10.2f} "
            f"{row.cpu:>8.1f} {size_mb / row.cpu / raw_cpu_speed:>12.2f} {row.rss / 2**30:>12.2f}"
        )
    smallest, largest = rows[0][2].rss, rows[len(sizes) - 1][2].rss
    print(f"peak RSS at {sizes[-1]:g} MB / at {sizes[0]:g} MB: {largest / smallest:.2f} (target <= 1.25)")
    print(f"work directory: {workdir}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=200.0, help="corpus size to generate, MB")
    parser.add_argument(
        "--sizes", help="comma-separated corpus sizes in MB: print the scaling table (e.g. 200,1000,2000)"
    )
    parser.add_argument("--corpus", type=Path, help="a directory of .jsonl files to use instead")
    parser.add_argument(
        "--workdir", type=Path, help="where corpus, tokenizer and outputs go (default: a temp dir)"
    )
    parser.add_argument(
        "--cores", type=int, default=os.cpu_count() or 1, help="workers / processes / threads"
    )
    parser.add_argument("--tokenizer", type=Path, help="an existing spm.model to use instead of training one")
    parser.add_argument("--skip-hf", action="store_true", help="leave out the HuggingFace run")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.sizes:
        scaling([float(size) for size in args.sizes.split(",")], workdir, args.cores, args.tokenizer)
        return
    paths = (
        sorted(args.corpus.glob("*.jsonl"))
        if args.corpus
        else corpus_in(workdir / "corpus", args.mb, args.cores)
    )
    megabytes = sum(path.stat().st_size for path in paths) / 1e6
    texts = list(corpus_texts(paths))
    model = args.tokenizer or tokenizer_for(paths, workdir / "tok" / "spm.model")

    rows = [timed("ours", lambda: run_ours(paths, model, workdir / "shards", args.cores), in_children=True)]
    rows.append(timed("raw SPM", lambda: run_raw_spm(texts, model, args.cores)))
    if not args.skip_hf:
        try:
            rows.append(timed("HF", lambda: run_hf(paths, model, workdir / "hf-cache", args.cores)))
        except ImportError as error:
            print(f"HF run skipped: {error}")
    report(rows, megabytes, args.cores)
    by_name = {row.name: row for row in rows}
    for other, target in (("raw SPM", 0.25), ("HF", 1.0)):
        if other in by_name:
            wall = by_name[other].seconds / by_name["ours"].seconds
            cpu = by_name[other].cpu / by_name["ours"].cpu
            print(f"ours / {other}: {wall:.2f} by wall time, {cpu:.2f} by CPU time  (target >= {target})")
    if "HF" in by_name:
        print(
            f"HF tokenizer encodes {hf_agreement(texts, model):.0%} of documents id for id like SentencePiece"
        )
    manifest = by_name["ours"].result
    splits = manifest["splits"]
    print(
        f"ours wrote {sum(s['samples'] for s in splits.values()):,} NSP sequences, "
        f"{sum(s['tokens'] for s in splits.values()):,} tokens (raw SPM: {by_name['raw SPM'].result:,}; "
        f"HF blocks of {BLOCK_SIZE}: {by_name['HF'].result if 'HF' in by_name else '-'}), "
        f"{manifest['bytes_per_token']} shard bytes per token"
    )
    print(f"work directory: {workdir}")


if __name__ == "__main__":
    main()
