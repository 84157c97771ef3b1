"""``pretrain finetune``: data framing, every task end to end (random init and from an export), freezing,
and clear errors for bad inputs. Runs happen in this process under the real DeepSpeed engine (one rank)."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file
from shard_fixtures import generate_text, train_tokenizer

from data_pipeline.errors import UserError
from launch.cli import build_parser, main
from training.finetune.commands import run_finetune
from training.finetune.config import FinetuneConfig, TaskConfig, config_from_dict, parse_freeze
from training.finetune.data import IGNORE_INDEX, Encoded, collate, frame, label_vocab, load_task_data
from training.finetune.heads import TaskModel, apply_freeze, load_encoder, trainable_prefixes
from training.finetune.loop import epoch_order, eval_shard, rank_micro_batches
from training.finetune.task_files import read_task_file
from training.models.bert import BertForPreTraining
from training.models.bert_config import bert_config

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "model.hidden_size=32",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=2",
    "model.intermediate_size=64",
    "deepspeed.train_batch_size=16",
    "deepspeed.train_micro_batch_size_per_gpu=8",
    "deepspeed.optimizer.params.lr=0.002",
    "deepspeed.scheduler.params.warmup_max_lr=0.002",
    "deepspeed.scheduler.params.warmup_num_steps=2",
    "train.eval_batch_size=16",
]
CONFIGS = {
    "classification": "finetune-classification.yaml",
    "pair": "finetune-pair.yaml",
    "regression": "finetune-classification.yaml",
    "tokens": "finetune-tokens.yaml",
}


def write_csv(path: Path, header: list[str], rows: list[list[Any]], delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer, an export directory of a tiny (untrained) BERT, and one small dataset per task."""
    root = tmp_path_factory.mktemp("finetune")
    spm_path = root / "spm.model"
    spm_path.write_bytes(train_tokenizer(320, 0))
    vocab = spm.SentencePieceProcessor(model_file=str(spm_path)).get_piece_size()
    from training.export.bert import write_export

    config = bert_config(
        None,
        vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        next_sentence_head=True,
    )
    torch.manual_seed(0)
    write_export(root / "export", BertForPreTraining(config).state_dict(), config, spm_path)
    texts = generate_text(0, sentences=96)
    # Classification: does the sentence hold more than 10 words? (csv, string labels)
    rows = [[text, "long" if len(text.split()) > 10 else "short"] for text in texts]
    write_csv(root / "cls-train.csv", ["text", "label"], rows[:64])
    write_csv(root / "cls-eval.csv", ["text", "label"], rows[64:])
    # Pair: is the second text the first one's successor? (jsonl, integer labels)
    pairs = [
        {"text": a, "text_pair": b if i % 2 else texts[(i * 7) % 96], "label": i % 2}
        for i, (a, b) in enumerate(itertools.pairwise(texts))
    ]
    write_jsonl(root / "pair-train.jsonl", pairs[:64])
    write_jsonl(root / "pair-eval.jsonl", pairs[64:])
    # Regression: the number of words (tsv).
    values = [[text, f"{len(text.split()) / 10:.2f}"] for text in texts]
    write_csv(root / "reg-train.tsv", ["text", "label"], values[:64], delimiter="\t")
    write_csv(root / "reg-eval.tsv", ["text", "label"], values[64:], delimiter="\t")
    # Tokens: words of more than 6 letters are entities (parquet with list columns; csv with strings).
    tagged = []
    for text in texts:
        words = text.rstrip(".").split()
        tags = ["B-LONG" if len(word) > 6 else "O" for word in words]
        tagged.append({"tokens": words, "tags": tags})
    pq.write_table(pa.Table.from_pylist(tagged[:64]), root / "tok-train.parquet")
    write_csv(
        root / "tok-eval.csv",
        ["text", "tags"],
        [[" ".join(row["tokens"]), " ".join(row["tags"])] for row in tagged[64:]],
    )
    return root


TASK_FILES = {
    "classification": ("cls-train.csv", "cls-eval.csv"),
    "pair": ("pair-train.jsonl", "pair-eval.jsonl"),
    "regression": ("reg-train.tsv", "reg-eval.tsv"),
    "tokens": ("tok-train.parquet", "tok-eval.csv"),
}


def cli_args(
    assets: Path, task: str, model: str, run_dir: Path, *extra: str, sets: tuple[str, ...] = ()
) -> list[str]:
    train, evaluation = TASK_FILES[task]
    args = [
        "--config",
        str(REPO / "configs" / CONFIGS[task]),
        "--model",
        model,
        "--train",
        str(assets / train),
        "--eval",
        str(assets / evaluation),
        "--run-dir",
        str(run_dir),
        *extra,
    ]
    if model == "none":
        args += ["--tokenizer", str(assets / "spm.model")]
    for item in [*TINY, f"task.type={task}", *sets]:
        args += ["--set", item]
    return args


def finetune(args: list[str]) -> dict[str, Any]:
    """One run in this process (the process group stays up for the next one)."""
    parser, _ = build_parser("finetune")
    return run_finetune(parser.parse_args(args))


# ---- data: reading, framing, batching (fast) ------------------------------------------------------


def test_frame_single_and_pair_with_truncation() -> None:
    ids, segments, cut = frame([10, 11, 12], None, 8)
    assert (ids, segments, cut) == ([2, 10, 11, 12, 3], [0] * 5, False)
    ids, segments, cut = frame([10, 11, 12, 13, 14, 15, 16], None, 6)
    assert (ids, cut) == ([2, 10, 11, 12, 13, 3], True)
    # Longest side first: A 5, B 2 with room for 4 -> A 2, B 2.
    ids, segments, cut = frame([10, 11, 12, 13, 14], [20, 21], 7)
    assert ids == [2, 10, 11, 3, 20, 21, 3]
    assert segments == [0, 0, 0, 0, 1, 1, 1]
    assert cut


def test_tokens_tags_on_first_piece_only(assets: Path) -> None:
    processor = spm.SentencePieceProcessor(model_file=str(assets / "spm.model"))
    task = TaskConfig(type="tokens", max_seq_len=64)
    examples = read_task_file(str(assets / "tok-eval.csv"), task)
    labels = label_vocab(examples, "tokens")
    assert labels == ["B-LONG", "O"]
    from training.finetune.data import encode_examples

    encoded = encode_examples("tok-eval.csv", examples[:5], processor, labels, task)
    for example, item in zip(examples, encoded):
        pieces = processor.encode(example.words)
        expected = [IGNORE_INDEX]
        for word_pieces, tag in zip(pieces, example.tags):
            expected += [labels.index(tag)] + [IGNORE_INDEX] * (len(word_pieces) - 1)
        assert item.label == expected + [IGNORE_INDEX]
        assert item.input_ids == [2, *[p for word in pieces for p in word], 3]
    assert any(len(p) > 1 for example in examples[:5] for p in processor.encode(example.words))


def test_tokens_truncation_keeps_whole_words(assets: Path) -> None:
    processor = spm.SentencePieceProcessor(model_file=str(assets / "spm.model"))
    task = TaskConfig(type="tokens", max_seq_len=8)
    from training.finetune.data import encode_examples

    examples = read_task_file(str(assets / "tok-eval.csv"), task)
    for item in encode_examples("x", examples, processor, ["B-LONG", "O"], task):
        assert len(item.input_ids) <= 8 and item.input_ids[-1] == 3
        assert sum(label != IGNORE_INDEX for label in item.label) <= item.words  # type: ignore[union-attr]


def test_label_vocab_sorted_and_shared_across_formats(assets: Path) -> None:
    task = TaskConfig(type="pair")
    assert label_vocab(read_task_file(str(assets / "pair-train.jsonl"), task), "pair") == ["0", "1"]
    numbered = [type("E", (), {"label": value})() for value in (10, 2, "2", 1.0)]
    assert label_vocab(numbered, "classification") == ["1", "2", "10"]  # type: ignore[arg-type]


def test_collate_pads_and_types() -> None:
    items = [
        Encoded([2, 7, 3], [0, 0, 0], [IGNORE_INDEX, 1, IGNORE_INDEX]),
        Encoded([2, 3], [0, 0], [IGNORE_INDEX] * 2),
    ]
    batch = collate(items, "tokens")
    assert batch["input_ids"].tolist() == [[2, 7, 3], [2, 3, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 1, -100], [-100, -100, -100]]
    regression = collate([Encoded([2, 3], [0, 0], 0.5)], "regression")
    assert regression["labels"].dtype == torch.float32


def test_epoch_order_and_rank_shares() -> None:
    batches = epoch_order(10, 4, seed=1, epoch=1)
    assert [len(batch) for batch in batches] == [4, 4, 4]
    assert set(np.concatenate(batches).tolist()) == set(range(10))
    assert not np.array_equal(np.concatenate(epoch_order(10, 4, 1, 2)), np.concatenate(batches))
    ranks = [rank_micro_batches(np.arange(8), rank, 2, 2) for rank in (0, 1)]
    assert [m.tolist() for m in ranks[0]] == [[0, 1], [4, 5]]
    assert [m.tolist() for m in ranks[1]] == [[2, 3], [6, 7]]
    assert eval_shard(5, 1, 2).tolist() == [3, 4, 0]


def test_freeze_modes() -> None:
    assert parse_freeze("full") is None and parse_freeze("head") == 0 and parse_freeze("top-2") == 2
    for bad in ("top-0", "top", "all", "top-x"):
        with pytest.raises(UserError, match="expected full, head or top-K"):
            parse_freeze(bad)
    config = bert_config(
        None, 320, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    model = TaskModel(config, "classification", 3, 0.1, "cls")
    trainable = apply_freeze(model, 1)
    assert trainable and all(name.startswith(("head.", "bert.encoder.layer.1.")) for name in trainable)
    assert any(name.startswith("bert.encoder.layer.1.") for name in trainable)
    assert trainable_prefixes(config, None) is None
    with pytest.raises(UserError, match="--freeze top-3: the encoder has only 2 layers"):
        trainable_prefixes(config, 3)


def test_load_encoder_moves_the_pooler_to_the_head() -> None:
    config = bert_config(
        None, 320, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    pretrained = BertForPreTraining(config).state_dict()
    model = TaskModel(config, "pair", 2, 0.1, "cls")
    loaded = load_encoder(model, pretrained, "export")
    assert "head.pooler.dense.weight" in loaded
    assert torch.equal(model.head.pooler.dense.weight, pretrained["bert.pooler.dense.weight"])
    assert torch.equal(
        model.bert.encoder.layer[1].output.dense.weight,
        pretrained["bert.encoder.layer.1.output.dense.weight"],
    )
    wider = bert_config(
        None, 320, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    with pytest.raises(
        UserError, match=r"--model export: bert.embeddings.word_embeddings.weight has shape \(320, 64\)"
    ):
        load_encoder(model, BertForPreTraining(wider).state_dict(), "export")
    deeper = bert_config(
        None, 320, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    with pytest.raises(UserError, match=r"--model export: no weights for bert.encoder.layer.1"):
        load_encoder(model, BertForPreTraining(deeper).state_dict(), "export")


def test_config_errors_name_the_key() -> None:
    with pytest.raises(UserError, match="task.type 'ner'"):
        config_from_dict({"task": {"type": "ner"}})
    with pytest.raises(UserError, match="task.colour: unknown key"):
        config_from_dict({"task": {"colour": "red"}})
    with pytest.raises(UserError, match="train.metric 'pearson': a classification task reports"):
        config_from_dict({"train": {"metric": "pearson"}})
    assert isinstance(config_from_dict({}), FinetuneConfig)


# ---- bad inputs name the file and the row (no DeepSpeed needed: they fail before the engine) -------


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "missing.csv",
            "text,label\na b,x\nc d\n",
            r"missing.csv line 3: unreadable row: 1 fields, the header has 2",
        ),
        ("nolabel.csv", "text,other\na b,x\n", r"nolabel.csv line 2: column 'label' is missing"),
        ("blank.csv", "text,label\na b,\n", r"blank.csv line 2: column 'label' is empty"),
        (
            "broken.jsonl",
            '{"text": "a", "label": 1}\n{"text": \n',
            r"broken.jsonl line 2: unreadable row: not JSON",
        ),
        ("list.jsonl", "[1, 2]\n", r"list.jsonl line 1: unreadable row: expected a JSON object"),
        ("empty.csv", "", r"empty.csv: no rows"),
        ("header.csv", "text,label\n", r"header.csv: no rows"),
        ("latin.csv", "text,label\na,b\n\xe9t\xe9,x\n", r"latin.csv line 3: not UTF-8"),
        ("data.xml", "<a/>", r"data.xml: unknown data format '.xml'"),
    ],
)
def test_unreadable_files(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(UserError, match=message):
        read_task_file(str(path), TaskConfig())


def test_unknown_eval_label_names_file_and_row(assets: Path, tmp_path: Path) -> None:
    processor = spm.SentencePieceProcessor(model_file=str(assets / "spm.model"))
    evaluation = write_csv(tmp_path / "dev.csv", ["text", "label"], [["a b", "short"], ["c d", "medium"]])
    with pytest.raises(
        UserError, match=r"dev.csv line 3: label 'medium' does not occur in the training file"
    ):
        load_task_data(str(assets / "cls-train.csv"), str(evaluation), processor, TaskConfig())


def test_token_rows_checked(tmp_path: Path) -> None:
    task = TaskConfig(type="tokens")
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [{"tokens": ["a", "b"], "tags": ["O", "B-X"]}, {"tokens": ["a", "b"], "tags": ["O"]}],
    )
    with pytest.raises(UserError, match=r"t.jsonl line 2: 2 words but 1 tags"):
        read_task_file(str(path), task)
    path = write_jsonl(tmp_path / "u.jsonl", [{"tokens": ["a"], "tags": ["PER"]}])
    with pytest.raises(UserError, match=r"u.jsonl line 1: tag 'PER' is not O, B-TYPE or I-TYPE"):
        read_task_file(str(path), task)


def test_regression_label_must_be_a_number(assets: Path, tmp_path: Path) -> None:
    processor = spm.SentencePieceProcessor(model_file=str(assets / "spm.model"))
    bad = write_csv(tmp_path / "r.tsv", ["text", "label"], [["a b", "1.5"], ["c", "high"]], delimiter="\t")
    with pytest.raises(UserError, match=r"r.tsv line 3: label 'high' is not a finite number"):
        load_task_data(str(bad), str(bad), processor, TaskConfig(type="regression"))


def test_cli_prints_the_error_without_traceback(
    assets: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    evaluation = write_csv(tmp_path / "dev.csv", ["text", "label"], [["a b", "huge"]])
    args = cli_args(assets, "classification", "none", tmp_path / "run")
    args[args.index("--eval") + 1] = str(evaluation)
    assert main(["finetune", *args]) == 2
    err = capsys.readouterr().err
    assert "dev.csv line 2: label 'huge' does not occur in the training file" in err
    assert "Traceback" not in err
    assert (
        main(["finetune", *cli_args(assets, "classification", "none", tmp_path / "r2", "--freeze", "top-3")])
        == 2
    )
    assert "--freeze top-3: the encoder has only 2 layers" in capsys.readouterr().err


# ---- end to end under DeepSpeed -----------------------------------------------------------------------

EXPECTED_METRICS = {
    "classification": {"accuracy", "macro_f1", "mcc"},
    "pair": {"accuracy", "macro_f1", "mcc"},
    "regression": {"pearson", "spearman", "mse"},
    "tokens": {"entity_f1", "entity_precision", "entity_recall"},
}


def eval_rows(assets: Path, task: str) -> int:
    name = TASK_FILES[task][1]
    return len(read_task_file(str(assets / name), TaskConfig(type=task)))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("task", "model"),
    [("classification", "none"), ("pair", "export"), ("regression", "none"), ("tokens", "export")],
)
def test_task_end_to_end(assets: Path, tmp_path: Path, task: str, model: str) -> None:
    run_dir = tmp_path / "run"
    source = str(assets / "export") if model == "export" else "none"
    sets = ("train.epochs=3", "train.metric=mse") if task == "regression" else ("train.epochs=3",)
    summary = finetune(cli_args(assets, task, source, run_dir, sets=sets))
    saved = json.loads((run_dir / "eval.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert EXPECTED_METRICS[task] <= set(saved["best"]) and EXPECTED_METRICS[task] <= set(saved["final"])
    assert saved["epochs_run"] == 3 and 1 <= saved["best_epoch"] <= 3
    predictions = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert [row["index"] for row in predictions] == list(range(eval_rows(assets, task)))
    config = json.loads((run_dir / "best" / "config.json").read_text())
    assert config["finetune"]["type"] == task and config["finetune"]["epoch"] == saved["best_epoch"]
    weights = load_file(str(run_dir / "best" / "model.safetensors"))
    assert (
        any(name.startswith("head.") for name in weights)
        and "bert.embeddings.word_embeddings.weight" in weights
    )
    if task == "tokens":
        assert all(len(row["prediction"]) == len(row["label"]) for row in predictions)
        assert {tag for row in predictions for tag in row["prediction"]} <= {"O", "B-LONG"}
    if task == "regression":
        assert all(isinstance(row["prediction"], float) for row in predictions)
    else:
        assert config["finetune"]["labels"]


@pytest.mark.slow
def test_classification_learns(assets: Path, tmp_path: Path) -> None:
    """Sentence length is visible to a small random-init model: the training loss falls and eval beats chance."""
    summary = finetune(
        cli_args(
            assets, "classification", "none", tmp_path / "run", sets=("train.epochs=8", "task.pooling=mean")
        )
    )
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [record["eval_train_loss"] for record in records if "eval_train_loss" in record]
    assert losses[-1] < losses[0] - 0.05, losses
    assert summary["best"]["accuracy"] > 0.6


@pytest.mark.slow
def test_early_stopping(assets: Path, tmp_path: Path) -> None:
    """With a learning rate of 0 the metric never improves: patience 1 stops after the second epoch."""
    sets = (
        "train.epochs=5",
        "train.patience=1",
        "deepspeed.optimizer.params.lr=0.0",
        "deepspeed.scheduler.params.warmup_max_lr=0.0",
    )
    summary = finetune(cli_args(assets, "pair", "none", tmp_path / "run", sets=sets))
    assert summary["stopped_early"] and summary["epochs_run"] == 2 and summary["best_epoch"] == 1
    assert summary["best"]["accuracy"] == summary["final"]["accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("freeze", ["head", "top-1"])
def test_frozen_parameters_stay_bit_identical(assets: Path, tmp_path: Path, freeze: str) -> None:
    from training.finetune.base import FinetuneOptions
    from training.finetune.config import load_finetune_config
    from training.finetune.loop import build

    run_dir = tmp_path / "run"
    config = load_finetune_config(
        REPO / "configs" / CONFIGS["classification"], [*TINY, "train.epochs=2", f"train.freeze={freeze}"]
    )
    run = build(
        config,
        FinetuneOptions(
            str(assets / "export"), str(assets / "cls-train.csv"), str(assets / "cls-eval.csv"), run_dir
        ),
    )
    try:
        module = run.engine.module
        trainable = {name for name, parameter in module.named_parameters() if parameter.requires_grad}
        handed = {
            id(parameter) for group in run.engine.optimizer.param_groups for parameter in group["params"]
        }
        assert handed == {id(parameter) for name, parameter in module.named_parameters() if name in trainable}
        run.fit()
    finally:
        run.close()
    before = load_file(str(assets / "export" / "model.safetensors"))
    after = load_file(str(run_dir / "best" / "model.safetensors"))
    encoder = [name for name in after if name.startswith("bert.") and not name.startswith("bert.pooler.")]
    moved = {name for name in encoder if not torch.equal(before[name], after[name])}
    if freeze == "head":
        assert not moved
    else:
        assert moved and all(name.startswith("bert.encoder.layer.1.") for name in moved)
        assert all(
            name in moved for name in encoder if name.startswith("bert.encoder.layer.1.") and "weight" in name
        )
    assert float(after["head.classifier.bias"].abs().sum()) > 0  # initialised at zero, so it trained


@pytest.mark.slow
def test_two_ranks_under_the_launcher_with_zero3(assets: Path, tmp_path: Path) -> None:
    """Two ranks (DeepSpeed launcher, gloo), ZeRO-3 and top-1 freezing: every eval row predicted once,
    the frozen layers gathered back bit-identical."""
    import os
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run_dir = tmp_path / "run"
    args = cli_args(
        assets,
        "classification",
        str(assets / "export"),
        run_dir,
        "--freeze",
        "top-1",
        sets=(
            "deepspeed.zero_optimization.stage=3",
            "deepspeed.train_micro_batch_size_per_gpu=4",
            "train.epochs=2",
            "train.eval_batch_size=5",
        ),
    )
    command = [
        "deepspeed",
        "--num_gpus",
        "2",
        "--master_port",
        str(port),
        "--module",
        "training.finetune.commands",
        *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run(
        command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "world size 2" in done.stdout
    predictions = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert [row["index"] for row in predictions] == list(range(eval_rows(assets, "classification")))
    before = load_file(str(assets / "export" / "model.safetensors"))
    after = load_file(str(run_dir / "best" / "model.safetensors"))
    moved = {
        name for name in before if name.startswith("bert.") and not torch.equal(before[name], after[name])
    }
    assert moved and all(name.startswith("bert.encoder.layer.1.") for name in moved)
