"""`pretrain train --init-from`: HF equivalence of the first loss, refusals, position extension, two phases.

The first logged loss (step 1) is the loss of the first batch before any update; the test rebuilds that
batch with the public loader and computes it with transformers' own ``BertForPreTraining`` (masked LM +
next sentence, as the trainer defines its loss), or with the exported model for the two-phase runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from shard_fixtures import make_shard_dir
from test_faults import TINY, metric_rows, run, train_command

from data_pipeline.errors import UserError
from training.config import load_config
from training.data.text import text_loader
from training.export.bert_read import load_export
from training.init_weights import extend_positions, read_initial_weights
from training.masking import MaskingConfig
from training.models.bert import BertForPreTraining

transformers = pytest.importorskip("transformers")

NO_DROPOUT = ("model.dropout=0.0",)
"""The step-1 loss is compared with an eval-mode forward: no dropout in the run either."""


def hf_bert(
    out_dir: Path, vocab_size: int, positions: int, architecture: str = "BertForPreTraining"
) -> Path:
    """A tiny HuggingFace BERT saved with ``save_pretrained`` (safetensors) in ``out_dir``."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=positions,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    getattr(transformers, architecture)(config).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def vocab_of(data: Path) -> int:
    return int(json.loads((data / "manifest.json").read_text())["tokenizer"]["vocab_size"])


def first_batches(data: Path, sets: tuple[str, ...] = ()) -> list[dict]:
    """The micro batches of optimizer step 1 of a one-process run of bert-tiny.yaml with TINY and ``sets``."""
    config = load_config(Path(__file__).resolve().parent.parent / "configs/bert-tiny.yaml", [*TINY, *sets])
    global_batch = config.deepspeed["train_batch_size"]
    micro_batch = config.deepspeed["train_micro_batch_size_per_gpu"]
    loader = text_loader(
        str(data),
        global_batch_size=global_batch,
        micro_batch_size=micro_batch,
        seed=config.train.seed,
        masking=MaskingConfig(mask_prob=config.data.mask_prob, whole_word=config.data.whole_word_mask),
        num_workers=0,
    )
    batches = iter(loader)
    return [next(batches) for _ in range(global_batch // micro_batch)]


def mean_loss(model: torch.nn.Module, batches: list[dict]) -> float:
    """The step loss as the trainer logs it: the mean over micro batches of MLM + NSP loss."""
    keys = ("input_ids", "attention_mask", "token_type_ids", "labels", "next_sentence_label")
    model.eval()
    with torch.no_grad():
        losses = [float(model(**{key: batch[key] for key in keys}).loss) for batch in batches]
    return sum(losses) / len(losses)


def first_loss(run_dir: Path) -> tuple[int, float]:
    row = next(row for row in metric_rows(run_dir) if "loss" in row)
    return row["step"], row["loss"]


def init_command(
    data: Path, run_dir: Path, init_from: Path, *extra: str, sets: tuple[str, ...] = ()
) -> list[str]:
    return train_command(data, run_dir, "--init-from", str(init_from), *extra, sets=sets)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards at seq 64 (phase 2 of the two-phase test)."""
    return make_shard_dir(tmp_path_factory.mktemp("init"), n_train=256, n_val=32, seq_len=64)


@pytest.fixture(scope="module")
def hf_dir(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hf_bert(tmp_path_factory.mktemp("hf") / "bert", vocab_of(data), positions=64)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_first_loss_from_hf_weights_equals_hf_loss(
    data: Path, hf_dir: Path, tmp_path: Path, stage: int
) -> None:
    sets = (*NO_DROPOUT, f"deepspeed.zero_optimization.stage={stage}")
    done = run(init_command(data, tmp_path / "run", hf_dir, "--max-steps", "1", sets=sets))
    assert f"initial weights from {hf_dir} (hf)" in done.stdout
    step, loss = first_loss(tmp_path / "run")
    hf_model = transformers.BertForPreTraining.from_pretrained(hf_dir)
    expected = mean_loss(hf_model, first_batches(data, NO_DROPOUT))
    print(f"step-1 loss: pretrain {loss!r}, transformers {expected!r}, difference {loss - expected:.3e}")
    assert step == 1
    assert abs(loss - expected) < 1e-5


@pytest.mark.slow
def test_contradicting_config_dimension_is_refused_naming_both(
    data: Path, hf_dir: Path, tmp_path: Path
) -> None:
    refused = run(init_command(data, tmp_path / "run", hf_dir, sets=("model.hidden_size=48",)), expect=2)
    assert "model.hidden_size=48" in refused.stderr and "hidden_size 32" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not list((tmp_path / "run").glob("checkpoints/step*"))


@pytest.mark.slow
def test_vocabulary_mismatch_is_refused(data: Path, tmp_path: Path) -> None:
    vocab = vocab_of(data)
    other = hf_bert(tmp_path / "bigger", vocab + 8, positions=64)
    refused = run(init_command(data, tmp_path / "run", other), expect=2)
    assert f"vocabulary of {vocab + 8} ids" in refused.stderr and f"vocab_size {vocab}" in refused.stderr


@pytest.mark.slow
def test_masked_lm_weights_with_short_positions_are_extended_and_get_a_fresh_sentence_head(
    data: Path, tmp_path: Path
) -> None:
    short = hf_bert(tmp_path / "mlm", vocab_of(data), positions=32, architecture="BertForMaskedLM")
    done = run(init_command(data, tmp_path / "run", short, "--max-steps", "1"))
    assert "position embeddings extended from 32 to 64 rows" in done.stdout
    assert "has no next-sentence head (pooler and classifier): initialised fresh" in done.stdout
    assert first_loss(tmp_path / "run")[0] == 1


def test_extend_positions_keeps_the_learned_rows_and_repeats_them() -> None:
    table = torch.randn(5, 3)
    extended = extend_positions(table, 12)
    assert extended.shape == (12, 3)
    assert torch.equal(extended[:5], table)
    assert all(torch.equal(extended[row], table[row % 5]) for row in range(12))
    with pytest.raises(ValueError, match="cannot shrink"):
        extend_positions(table, 4)


@pytest.fixture(scope="module")
def phase1(data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Phase 1 at seq 32 (same tokenizer as ``data``), 8 steps; its run directory and its native export."""
    root = tmp_path_factory.mktemp("phase1")
    data_32 = make_shard_dir(root, n_train=256, n_val=32, seq_len=32, name="data-32")
    run_dir = root / "run"
    run(train_command(data_32, run_dir, "--max-steps", "8"))
    export = root / "export"
    run([sys.executable, "-m", "launch.cli", "export", str(run_dir), "--out", str(export)])
    return run_dir, export


@pytest.mark.slow
def test_two_phases_start_phase_2_at_step_1_from_the_phase_1_weights(
    data: Path, phase1: tuple[Path, Path], tmp_path: Path
) -> None:
    run_dir, export = phase1
    model_config, state_dict, _ = load_export(export)
    model = BertForPreTraining(model_config)
    model.load_state_dict(state_dict)
    expected = mean_loss(model, first_batches(data, NO_DROPOUT))
    phase2 = tmp_path / "phase2"
    done = run(init_command(data, phase2, run_dir, "--max-steps", "1", sets=NO_DROPOUT))
    assert "(run)" in done.stdout and "fresh start (weights of --init-from" in done.stdout
    step, loss = first_loss(phase2)
    assert step == 1 and abs(loss - expected) < 1e-5, (loss, expected)

    from_export = tmp_path / "phase2-export"
    done = run(init_command(data, from_export, export, "--max-steps", "1", sets=NO_DROPOUT))
    assert "(export)" in done.stdout
    assert first_loss(from_export) == (1, pytest.approx(loss, abs=1e-6))

    # The same command again resumes the run: the checkpoint wins and --init-from only gives the shape.
    resumed = run(init_command(data, phase2, run_dir, "--max-steps", "2", sets=NO_DROPOUT))
    assert "is not used: the run resumes from its checkpoint" in resumed.stdout
    assert [row["step"] for row in metric_rows(phase2) if "loss" in row] == [1, 2]


@pytest.mark.slow
def test_weights_of_another_tokenizer_of_the_same_size_are_refused(
    data: Path, phase1: tuple[Path, Path], tmp_path: Path
) -> None:
    run_dir, _ = phase1
    other = make_shard_dir(tmp_path, n_train=64, n_val=16, seq_len=64, seed=1, name="other-tokenizer")
    assert vocab_of(other) == vocab_of(data)  # only the sha256 tells the tokenizers apart
    refused = run(init_command(other, tmp_path / "run", run_dir), expect=2)
    assert "sha256" in refused.stderr and str(run_dir) in refused.stderr and "Traceback" not in refused.stderr


def test_phase2_config_follows_the_recipe() -> None:
    repo = Path(__file__).resolve().parent.parent
    phase1 = load_config(repo / "configs/bert-base.yaml")
    phase2 = load_config(repo / "configs/bert-base-phase2.yaml")
    scheduler = phase2.deepspeed["scheduler"]["params"]
    assert phase2.train.total_steps * 10 == phase1.train.total_steps  # 10% of the step budget
    assert scheduler["warmup_num_steps"] == round(0.128 * phase2.train.total_steps)
    assert scheduler["warmup_max_lr"] == phase1.deepspeed["optimizer"]["params"]["lr"]
    assert phase2.deepspeed["optimizer"] == phase1.deepspeed["optimizer"]
    assert phase2.deepspeed["train_batch_size"] == phase1.deepspeed["train_batch_size"]


def test_unreadable_hf_directories_are_refused_naming_the_reason(hf_dir: Path, tmp_path: Path) -> None:
    roberta = tmp_path / "roberta"
    roberta.mkdir()
    (roberta / "config.json").write_text(json.dumps({"model_type": "roberta", "vocab_size": 50265}))
    with pytest.raises(UserError, match="model_type 'roberta'; --init-from reads BERT models only"):
        read_initial_weights(str(roberta))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UserError, match=r"pytorch_model\.bin \(pickles, which are not loaded\)"):
        read_initial_weights(str(pickled))
    with pytest.raises(UserError, match="neither a run directory"):
        read_initial_weights(str(tmp_path))
