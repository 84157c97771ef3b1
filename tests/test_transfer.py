"""An honest transfer test: pre-training on unlabelled text must beat random init on a task that needs it.

The synthetic language has topics; each topic owns its own words, and every sentence of the unlabelled
corpus talks about a single topic. The task is "which topic is this sentence about?", with a handful of
labelled sentences whose words come from one half of each topic's vocabulary, while every evaluation
sentence uses only the *other* half. Nothing in the labelled data links an evaluation word to a topic:
a randomly initialised encoder can only guess (chance is 1/topics), and only the co-occurrence statistics
that masked-language-model pre-training extracts from the unlabelled corpus put the unseen words next to
the seen words of their topic. A tiny BERT is pre-trained by the real trainer (one process, DeepSpeed on
CPU), then fine-tuned from its run directory and from ``--model none`` with the same config and seeds.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from shard_fixtures import spm_model_bytes

from data_pipeline.formats.location import file_sha256
from data_pipeline.formats.manifest import FORMAT_NAME, MANIFEST_NAME
from data_pipeline.formats.text import SPECIAL_TOKENS, Example, write_shard

REPO = Path(__file__).resolve().parent.parent
TOPICS = 4
WORDS_PER_TOPIC = 24
SEEDS = (1, 2, 3)
LABELLED_PER_TOPIC = 4
# A very small encoder: the test is about transfer, not capacity.
ENCODER = [
    "model.hidden_size=64",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=2",
    "model.intermediate_size=128",
    "model.dropout=0.0",
]
PRETRAIN = [
    *ENCODER,
    "model.next_sentence_head=false",
    "deepspeed.train_batch_size=32",
    "deepspeed.train_micro_batch_size_per_gpu=32",
    "deepspeed.zero_optimization.stage=0",
    "deepspeed.optimizer.params.lr=0.002",
    "deepspeed.scheduler.params.warmup_max_lr=0.002",
    "deepspeed.scheduler.params.warmup_num_steps=20",
    "train.total_steps=300",
    "train.val_every=0",
    "train.save_every=300",
    "train.log_every=50",
    "data.num_workers=0",
    "data.mask_prob=0.2",
]
FINETUNE = [
    *ENCODER,
    "task.pooling=mean",
    "train.epochs=15",
    "train.patience=0",
    "train.metric=accuracy",
    "deepspeed.train_batch_size=16",
    "deepspeed.train_micro_batch_size_per_gpu=16",
    "deepspeed.optimizer.params.lr=0.001",
    "deepspeed.scheduler.params.warmup_max_lr=0.001",
    "deepspeed.scheduler.params.warmup_num_steps=3",
    "train.log_every=1000",
]

pytestmark = pytest.mark.slow


def lexicon(rng: np.random.Generator) -> list[list[str]]:
    """``TOPICS`` lists of distinct made-up words."""
    letters = list("bcdfghjklmnpqrstvwxz")
    vowels = list("aeiou")
    words: set[str] = set()
    while len(words) < TOPICS * WORDS_PER_TOPIC:
        words.add("".join(rng.choice(letters) + rng.choice(vowels) for _ in range(int(rng.integers(2, 4)))))
    ordered = sorted(words)
    rng.shuffle(ordered)
    return [ordered[t * WORDS_PER_TOPIC : (t + 1) * WORDS_PER_TOPIC] for t in range(TOPICS)]


def sentence(rng: np.random.Generator, words: list[str]) -> str:
    return " ".join(rng.choice(words, int(rng.integers(6, 12))))


def train_tokenizer(corpus: list[str], out: Path) -> Path:
    """A real SentencePiece model with the BERT specials at ids 0-4; big enough for whole-word pieces."""
    out.write_bytes(spm_model_bytes(corpus, TOPICS * WORDS_PER_TOPIC + 60))
    return out


def write_shards(root: Path, corpus: list[str], processor: spm.SentencePieceProcessor, seq_len: int) -> None:
    """Train/val shards (MLM only, one sentence per example) and their manifest."""
    vocab = processor.get_piece_size()
    examples = [
        Example(np.asarray(ids[: seq_len - 2]), np.asarray([], dtype=np.int64))
        for ids in processor.encode(corpus)
    ]
    splits = {}
    for split, part in (("train", examples[:-64]), ("val", examples[-64:])):
        with open(root / f"{split}-000000.tar", "wb") as handle:
            stats = write_shard(handle, f"{split}-000000.tar", f"{split}-000000", part, vocab, 256)
        splits[split] = {"samples": stats.samples, "tokens": stats.tokens, "shards": [stats.to_json()]}
    manifest = {
        "format": FORMAT_NAME,
        "splits": splits,
        "seq_len": seq_len,
        "objective": "none",
        "seed": 0,
        "tokenizer": {
            "path": "tokenizer/spm.model",
            "sha256": file_sha256(str(root / "tokenizer" / "spm.model")),
            "vocab_size": vocab,
            "special_ids": {t: i for i, t in enumerate(SPECIAL_TOKENS)},
        },
        "documents": {"read": len(corpus), "kept": len(corpus), "rejected": {}},
    }
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")


def write_task(path: Path, rows: list[tuple[str, int]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows((text, f"topic{label}") for text, label in rows)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Corpus, tokenizer, shards and the labelled task files."""
    root = tmp_path_factory.mktemp("transfer")
    rng = np.random.default_rng(0)
    topics = lexicon(rng)
    corpus = [sentence(rng, topics[int(rng.integers(TOPICS))]) for _ in range(4000)]
    (root / "data" / "tokenizer").mkdir(parents=True)
    spm_path = train_tokenizer(corpus, root / "data" / "tokenizer" / "spm.model")
    processor = spm.SentencePieceProcessor(model_file=str(spm_path))
    write_shards(root / "data", corpus, processor, seq_len=32)
    half = WORDS_PER_TOPIC // 2
    labelled = [
        (sentence(rng, topics[t][:half]), t) for t in range(TOPICS) for _ in range(LABELLED_PER_TOPIC)
    ]
    held_out = [(sentence(rng, topics[t][half:]), t) for t in range(TOPICS) for _ in range(40)]
    write_task(root / "train.csv", labelled)
    write_task(root / "eval.csv", held_out)
    return root


def child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def pretrain(world: Path) -> Path:
    run_dir = world / "pretrain"
    command = [
        sys.executable,
        "-m",
        "launch.cli",
        "train",
        "--config",
        str(REPO / "configs" / "bert-tiny.yaml"),
        "--data",
        str(world / "data"),
        "--run-dir",
        str(run_dir),
    ]
    for item in PRETRAIN:
        command += ["--set", item]
    done = subprocess.run(
        command, check=False, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return run_dir


def finetune_accuracies(world: Path, model: str, seeds: tuple[int, ...]) -> list[float]:
    """Final-epoch eval accuracy per seed (no selection on the eval set); one process runs all seeds."""
    script = (
        "import sys\n"
        "from launch.cli import build_parser\n"
        "from training.finetune.commands import run_finetune\n"
        "parser, _ = build_parser('finetune')\n"
        "for seed in sys.argv[2:]:\n"
        f"    args = {['--config', str(REPO / 'configs' / 'finetune-classification.yaml'), '--model', model, '--train', str(world / 'train.csv'), '--eval', str(world / 'eval.csv')]!r}\n"
        f"    args += {['--tokenizer', str(world / 'data' / 'tokenizer' / 'spm.model')] if model == 'none' else []!r}\n"
        f"    for item in {FINETUNE!r} + [f'train.seed={{seed}}']:\n"
        "        args += ['--set', item]\n"
        "    run_finetune(parser.parse_args(args + ['--run-dir', f'{sys.argv[1]}-{seed}']))\n"
    )
    prefix = world / f"finetune-{Path(model).name}"
    command = [sys.executable, "-c", script, str(prefix), *map(str, seeds)]
    done = subprocess.run(
        command, check=False, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    results = [json.loads(Path(f"{prefix}-{seed}/eval.json").read_text()) for seed in seeds]
    return [result["final"]["accuracy"] for result in results]


def test_pretraining_transfers_to_unseen_words(world: Path) -> None:
    run_dir = pretrain(world)
    pretrained = finetune_accuracies(world, str(run_dir), SEEDS)
    baseline = finetune_accuracies(world, "none", SEEDS)
    spread = max(np.std(pretrained), np.std(baseline), 0.02)
    gap = float(np.mean(pretrained) - np.mean(baseline))
    print(
        f"pre-trained {pretrained} mean {np.mean(pretrained):.3f}; random init {baseline} "
        f"mean {np.mean(baseline):.3f}; gap {gap:.3f}, seed spread {spread:.3f}"
    )
    assert gap > 0.2, f"pre-trained {pretrained} vs random init {baseline}: gap {gap:.3f}"
    assert gap > 4 * spread, f"gap {gap:.3f} is not large compared with the seed spread {spread:.3f}"
