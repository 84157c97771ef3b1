"""HuggingFace tokenizers end to end: `pretrain tokenizer --kind wordpiece` -> `prepare text` -> the manifest
-> `pretrain train` -> `pretrain export --format hf`; and special ids that are not 0-4 (bert-base layout)
carried from the tokenizer through the manifest into framing and masking."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.errors import UserError
from data_pipeline.formats.text import SPECIAL_TOKENS, read_shard
from data_pipeline.text.tokenizer_kinds import load_tokenizer
from launch.cli import main
from training.data.text import text_loader
from training.masking import IGNORE_INDEX

REPO = Path(__file__).resolve().parent.parent
LOCAL = ["--", "--direct_running_mode=in_memory", "--direct_num_workers=1"]
WORDS = ["river", "stone", "morning", "light", "quiet", "field", "early", "winter", "garden", "market", "small", "house", "north", "road", "green", "paper", "letter", "window", "summer", "city", "bright", "tower", "open", "water", "island", "school", "friend", "music", "table", "unbelievable", "reconstruction", "international"]
# The bert-base-uncased layout: [PAD] 0, [unused0-98] 1-99, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103.
BERT_BASE_SPECIALS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}


def write_corpus(directory: Path) -> Path:
    rng = np.random.default_rng(11)
    directory.mkdir(parents=True)
    documents = []
    for _ in range(160):
        sentences = [
            " ".join(rng.choice(WORDS, int(rng.integers(4, 12)))).capitalize() + f" {rng.integers(0, 99)}."
            for _ in range(int(rng.integers(6, 14)))
        ]
        documents.append(json.dumps({"text": " ".join(sentences)}) + "\n")
    (directory / "a.jsonl").write_text("".join(documents))
    return directory


def prepare(corpus: Path, tokenizer: Path, output: Path, *extra: str) -> dict:
    args = ["prepare", "text", str(corpus), "--tokenizer", str(tokenizer), "--output", str(output),
            "--seq-len", "48", "--val-fraction", "0.1", "--shard-mb", "0.01", *extra, *LOCAL]
    assert main(args) == 0
    return json.loads((output / "manifest.json").read_text())


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hf-tokenizers")
    write_corpus(root / "corpus")
    out = str(root / "wordpiece")
    args = ["tokenizer", str(root / "corpus"), "--out", out, "--vocab-size", "200", "--kind", "wordpiece"]
    assert main(args) == 0
    return root


@pytest.fixture(scope="module")
def bert_base_vocab(workdir: Path) -> Path:
    """The trained WordPiece pieces laid out as bert-base-uncased lays out its vocab.txt."""
    vocab = (workdir / "wordpiece" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    pieces = vocab[len(SPECIAL_TOKENS) :]
    lines = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]", *pieces]
    directory = workdir / "bert-base-layout"
    directory.mkdir()
    (directory / "vocab.txt").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def wordpiece_run(workdir: Path) -> Path:
    """Shards prepared with the trained WordPiece, a 3-step bert-tiny run on them, its hf export."""
    prepare(workdir / "corpus", workdir / "wordpiece", workdir / "shards")
    run_cli("train", "--config", "configs/bert-tiny.yaml", "--data", str(workdir / "shards"),
            "--run-dir", str(workdir / "run"), "--log-every", "1",
            "--set", "train.total_steps=3", "--set", "train.val_every=0", "--set", "train.save_every=3",
            "--set", "deepspeed.train_batch_size=16", "--set", "deepspeed.train_micro_batch_size_per_gpu=8",
            "--set", "deepspeed.scheduler.params.warmup_num_steps=1", "--set", "data.num_workers=0")
    run_cli("export", str(workdir / "run"), "--out", str(workdir / "hf"), "--format", "hf")
    return workdir


def test_wordpiece_prepare_train_export(wordpiece_run: Path) -> None:
    root = wordpiece_run
    tokenizer = load_tokenizer(str(root / "wordpiece"))
    manifest = json.loads((root / "shards" / "manifest.json").read_text())
    tokenizer_json = (root / "wordpiece" / "tokenizer.json").read_bytes()
    assert manifest["tokenizer"] == {
        "kind": "wordpiece",
        "path": "tokenizer/tokenizer.json",
        "sha256": hashlib.sha256(tokenizer_json).hexdigest(),
        "vocab_size": 200,
        "special_ids": tokenizer.special_ids.as_tokens(),
    }
    copied = root / "shards" / "tokenizer"
    assert sorted(path.name for path in copied.iterdir()) == ["tokenizer.json", "vocab.txt"]
    assert (copied / "vocab.txt").read_bytes() == (root / "wordpiece" / "vocab.txt").read_bytes()

    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) == 3 and all(np.isfinite(losses))

    exported = root / "hf"
    assert (exported / "tokenizer.json").read_bytes() == tokenizer_json
    assert (exported / "vocab.txt").is_file() and not (exported / "spm.model").exists()
    config = json.loads((exported / "config.json").read_text())
    assert config["pretrain"]["tokenizer"]["kind"] == "wordpiece"
    assert config["pretrain"]["tokenizer"]["special_ids"] == tokenizer.special_ids.as_tokens()
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(exported))
    ids = hf("river stone", "green paper")["input_ids"]
    content = tokenizer.encode(["river stone", "green paper"])
    special = tokenizer.special_ids
    assert ids == [special.cls, *content[0], special.sep, *content[1], special.sep]
    assert hf.mask_token_id == special.mask and hf.pad_token_id == special.pad


def test_finetune_from_a_wordpiece_export(wordpiece_run: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    for name, rows in (("train.csv", 48), ("eval.csv", 16)):
        lines = ["text,label"]
        for _ in range(rows):
            length = int(rng.integers(2, 12))
            lines.append(f"{' '.join(rng.choice(WORDS, length))},{'long' if length > 6 else 'short'}")
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    sets = ["deepspeed.train_batch_size=16", "deepspeed.train_micro_batch_size_per_gpu=8",
            "deepspeed.scheduler.params.warmup_num_steps=1", "train.epochs=1", "train.eval_batch_size=16"]
    args = ["finetune", "--config", "configs/finetune-classification.yaml",
            "--model", str(wordpiece_run / "hf"), "--train", str(tmp_path / "train.csv"),
            "--eval", str(tmp_path / "eval.csv"), "--run-dir", str(tmp_path / "ft")]
    run_cli(*args, *(item for value in sets for item in ("--set", value)))
    best = tmp_path / "ft" / "best"
    assert (best / "tokenizer.json").read_bytes() == (wordpiece_run / "hf" / "tokenizer.json").read_bytes()
    config = json.loads((best / "config.json").read_text())
    assert config["pretrain"]["tokenizer"]["special_ids"] == load_tokenizer(str(best)).special_ids.as_tokens()


def test_bert_base_special_ids_reach_framing_and_masking(
    workdir: Path, bert_base_vocab: Path, tmp_path: Path
) -> None:
    manifest = prepare(workdir / "corpus", bert_base_vocab, tmp_path / "shards", "--objective", "none")
    assert manifest["tokenizer"]["special_ids"] == BERT_BASE_SPECIALS
    assert manifest["tokenizer"]["kind"] == "wordpiece" and manifest["tokenizer"]["vocab_size"] == 299
    tokens = np.concatenate(
        [chunk.tokens for shard in manifest["splits"]["train"]["shards"]
         for chunk in read_shard(str(tmp_path / "shards" / shard["path"]))]
    )
    # Document boundaries in packed (`none`) content are the tokenizer's [SEP], never [unused2] (id 3).
    assert (tokens == 102).any() and not ((tokens >= 1) & (tokens <= 99)).any()

    loader = text_loader(str(tmp_path / "shards"), global_batch_size=16, micro_batch_size=16, num_workers=0)
    batch = next(iter(loader))
    ids, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
    attention = batch["attention_mask"].numpy().astype(bool)
    assert (ids[:, 0] == 101).all() and (ids[~attention] == 0).all()
    last = attention.sum(axis=1) - 1
    assert (ids[np.arange(len(ids)), last] == 102).all()
    selected = labels != IGNORE_INDEX
    assert selected.any() and not np.isin(labels[selected], [0, 101, 102, 103]).any()
    assert (ids[selected] == 103).mean() > 0.5
    replaced = ids[selected & (ids != 103) & (ids != labels)]
    assert not np.isin(replaced, list(BERT_BASE_SPECIALS.values())).any()


def test_loader_refuses_special_ids_that_disagree_with_the_tokenizer(
    workdir: Path, bert_base_vocab: Path, tmp_path: Path
) -> None:
    prepare(workdir / "corpus", bert_base_vocab, tmp_path / "shards")
    path = tmp_path / "shards" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["tokenizer"]["special_ids"] = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    path.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"special ids \{'\[PAD\]': 0, '\[UNK\]': 100.*manifest special_ids"):
        text_loader(str(tmp_path / "shards"), global_batch_size=16, micro_batch_size=16, num_workers=0)
    manifest["tokenizer"].pop("special_ids")
    path.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"tokenizer.special_ids must be an object, got None"):
        text_loader(str(tmp_path / "shards"), global_batch_size=16, micro_batch_size=16, num_workers=0)
