"""``pretrain export``: ZeRO 0/2/3 checkpoints of a real 2-process DeepSpeed run -> safetensors equal to the
live weights; dtype casts; transformers loading with equal logits; the HF tokenizer against SentencePiece;
refusals.

The ZeRO runs use one DeepSpeed launcher start: this file, run as a script under the launcher, trains with the
real trainer (``training.trainer.build`` / ``fit``) once per stage and, after the last step, writes the live
model's gathered fp32 weights from rank 0 as the reference the export must reproduce.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file, save_file
from shard_fixtures import generate_text, make_shard_dir, train_tokenizer

from data_pipeline.errors import UserError
from launch.cli import main as cli_main
from training.export import bert, bert_read, checkpoints, files
from training.models.bert import BertForPreTraining
from training.models.bert_config import bert_config

REPO = Path(__file__).resolve().parent.parent

STAGES = (0, 2, 3)
STEPS = 2
LIVE_WEIGHTS = "live_weights.safetensors"
TIMEOUT_S = 900  # one launcher start (JIT of a CPU op on the first DeepSpeed start) plus three tiny runs
TINY = [
    "model.hidden_size=32",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=2",
    "model.intermediate_size=64",
    "deepspeed.train_batch_size=16",
    "deepspeed.train_micro_batch_size_per_gpu=4",
    "deepspeed.optimizer.params.lr=0.003",
    "deepspeed.scheduler.params.warmup_num_steps=1",
    # A constant LR from the first step, so that every step moves the weights away from their init.
    "deepspeed.scheduler.params.warmup_min_lr=0.003",
    "deepspeed.scheduler.params.warmup_max_lr=0.003",
    "train.val_every=0",
    "train.total_steps=10",
    "train.log_every=1",
    "data.num_workers=0",
]
SAMPLE_TEXTS = [
    "Price 12,345.67 dollars in 2024, 3rd place.",
    "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３, the ﬁne ligature and ½ (NFKC).",
    "café naïve résumé Zürich e\u0301",
    "  leading, trailing  and   many   spaces  ",
    "tab\there, a\nnewline, ideographic\u3000space",
    "unseen characters 日本語 😀 fall back to bytes",
    "x1y22z333",
    "",
]


# ----------------------------------------------------------------------------- the launcher side


def _train_and_dump(argv: list[str]) -> int:
    """Per stage: train with the real trainer, then write the gathered live weights from rank 0."""
    import deepspeed

    from training import engine as ds
    from training.commands import add_arguments, overrides_of
    from training.config import load_config
    from training.trainer import RunOptions, build

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args(argv)
    for stage in STAGES:
        config = load_config(args.config, [*overrides_of(args), f"deepspeed.zero_optimization.stage={stage}"])
        run_dir = Path(args.run_dir) / f"stage{stage}"
        options = RunOptions(data_dir=args.data, run_dir=run_dir, max_steps=args.max_steps, resume="never")
        trainer, plan = build(config, options)
        trainer.resume(plan)
        trainer.fit()
        module = trainer.engine.module
        # ZeRO-3 holds 1/world of each parameter per rank: gather the full tensors (a no-op below stage 3).
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            if trainer.env.is_main:
                live = {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
                save_file(bert.untie(live), str(run_dir / LIVE_WEIGHTS))
        trainer.close()
    ds.teardown_distributed()
    return 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shard_dir(tmp_path_factory.mktemp("export"), n_train=64, n_val=16, n_shards=2, seq_len=32)


@pytest.fixture(scope="module")
def runs(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``runs/stage{0,2,3}``: 2-process runs of STEPS steps with their checkpoints and live weights."""
    root = tmp_path_factory.mktemp("runs")
    command = [
        "deepspeed",
        "--num_gpus",
        "2",
        "--master_port",
        str(_free_port()),
        str(Path(__file__)),
        "--config",
        str(REPO / "configs" / "bert-tiny.yaml"),
        "--data",
        str(data),
        "--run-dir",
        str(root),
        "--max-steps",
        str(STEPS),
    ]
    for item in TINY:
        command += ["--set", item]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return root


def tiny_model(
    pre_layernorm: bool = False, next_sentence_head: bool = True, seed: int = 0
) -> BertForPreTraining:
    torch.manual_seed(seed)
    config = bert_config(
        None,
        320,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pre_layernorm=pre_layernorm,
        next_sentence_head=next_sentence_head,
    )
    return BertForPreTraining(config).eval()


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SentencePiece model trained with the project's own options (byte fallback, split digits)."""
    from data_pipeline.text.tokenizer import train_sentencepiece, trainer_options

    root = tmp_path_factory.mktemp("spm")
    (root / "text.txt").write_text("\n".join(generate_text(5, sentences=800) + SAMPLE_TEXTS * 5) + "\n")
    return Path(
        train_sentencepiece(str(root / "text.txt"), str(root / "tok"), trainer_options(400, num_threads=1))
    )


def export_cli(*args: str) -> int:
    return cli_main(["export", *args])


def batch(vocab_size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    input_ids = torch.randint(5, vocab_size, (3, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0  # a padded row
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, 6:] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


# ----------------------------------------------------------------------------- ZeRO round trips


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_export_equals_live_weights_of_two_rank_run(runs: Path, tmp_path: Path, stage: int) -> None:
    run_dir, out = runs / f"stage{stage}", tmp_path / "out"
    assert export_cli(str(run_dir), "--out", str(out)) == 0
    live = load_file(str(run_dir / LIVE_WEIGHTS))
    # Trained, not initial, weights: LayerNorm gains start at exactly 1.
    assert not torch.equal(live["bert.embeddings.LayerNorm.weight"], torch.ones(32))
    exported = load_file(str(out / files.WEIGHTS_FILE))
    assert sorted(exported) == sorted(live)
    for name, tensor in live.items():
        assert exported[name].dtype == torch.float32
        assert torch.equal(exported[name], tensor), name
    state = json.loads((run_dir / "checkpoints" / f"step{STEPS:08d}" / "trainer_state.json").read_text())
    assert state["zero_stage"] == stage and state["world_size"] == 2
    config = json.loads((out / files.CONFIG_FILE).read_text())
    assert config["pretrain"]["model_config"] == state["model_config"]
    assert (out / bert.TOKENIZER_MODEL_FILE).read_bytes() == (
        Path(state["data_dir"]) / "tokenizer/spm.model"
    ).read_bytes()
    card = (out / files.CARD_FILE).read_text()
    assert f"| step | {STEPS} |" in card and "| tokens_seen |" in card and "| objective | nsp |" in card
    assert f"| zero_stage | {stage} |" in card and "| loss |" in card


@pytest.mark.slow
def test_dtype_casts_equal_the_fp32_cast(runs: Path, tmp_path: Path) -> None:
    live = load_file(str(runs / "stage2" / LIVE_WEIGHTS))
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        out = tmp_path / dtype
        assert export_cli(str(runs / "stage2"), "--out", str(out), "--dtype", dtype) == 0
        exported = load_file(str(out / files.WEIGHTS_FILE))
        for name, tensor in live.items():
            assert exported[name].dtype == torch_dtype
            assert torch.equal(exported[name], tensor.to(torch_dtype)), name
        assert json.loads((out / files.CONFIG_FILE).read_text())["pretrain"]["dtype"] == dtype


@pytest.mark.slow
def test_step_selection_and_run_dir_loading(runs: Path, tmp_path: Path) -> None:
    run_dir = runs / "stage3"
    with pytest.raises(UserError, match=rf"no complete checkpoint at step 1; available steps: {STEPS}"):
        checkpoints.find_checkpoint(run_dir, 1)
    assert checkpoints.find_checkpoint(run_dir, STEPS).name == f"step{STEPS:08d}"
    assert export_cli(str(run_dir), "--out", str(tmp_path / "x"), "--step", "1") == 2
    config, weights, spm_model = bert_read.load_encoder_weights(str(run_dir))
    live = load_file(str(run_dir / LIVE_WEIGHTS))
    assert all(torch.equal(weights[name], tensor) for name, tensor in live.items())
    BertForPreTraining(config).load_state_dict(weights, strict=True)
    assert spm_model.name == "spm.model"


@pytest.mark.slow
def test_hf_export_of_a_run_loads_in_transformers(runs: Path, tmp_path: Path) -> None:
    import transformers

    out = tmp_path / "hf"
    assert export_cli(str(runs / "stage0"), "--out", str(out), "--format", "hf") == 0
    hf_model, info = transformers.BertForPreTraining.from_pretrained(str(out), output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    config, weights, _ = bert_read.load_encoder_weights(str(out))
    ours = BertForPreTraining(config).eval()
    ours.load_state_dict(weights, strict=True)
    inputs = batch(config.vocab_size)
    with torch.no_grad():
        expected, actual = ours(**inputs), hf_model.eval()(**inputs)
    torch.testing.assert_close(actual.prediction_logits, expected.prediction_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        actual.seq_relationship_logits, expected.seq_relationship_logits, rtol=0, atol=1e-5
    )


@pytest.mark.slow
def test_stage0_bf16_run_exports_its_fp32_master_weights(data: Path, tmp_path: Path) -> None:
    """ZeRO-0 with bf16 keeps 16-bit module weights; the export takes the optimizer's fp32 master copy."""
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "launch.cli",
        "train",
        "--config",
        str(REPO / "configs" / "bert-tiny.yaml"),
        "--data",
        str(data),
        "--run-dir",
        str(run_dir),
        "--max-steps",
        str(STEPS),
    ]
    for item in [
        *TINY,
        "deepspeed.bf16.enabled=true",
        "deepspeed.zero_optimization.stage=0",
        "deepspeed.train_batch_size=8",
    ]:
        command += ["--set", item]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    assert export_cli(str(run_dir), "--out", str(tmp_path / "out")) == 0
    exported = load_file(str(tmp_path / "out" / files.WEIGHTS_FILE))
    saved = torch.load(
        run_dir / "checkpoints" / f"step{STEPS:08d}" / checkpoints.MODEL_STATES_FILE,
        map_location="cpu",
        weights_only=False,
    )
    module = saved["module"]
    for name, tensor in exported.items():
        assert tensor.dtype == torch.float32 and module[name].dtype == torch.bfloat16
        assert torch.equal(tensor.to(torch.bfloat16), module[name]), name  # the master rounds to the module
    assert any(not torch.equal(tensor, module[name].float()) for name, tensor in exported.items())
    assert "Note:" not in (tmp_path / "out" / files.CARD_FILE).read_text()


# ----------------------------------------------------------------------------- write_export / load_export


def test_hf_export_loads_with_auto_classes_and_equal_logits(tmp_path: Path, spm_path: Path) -> None:
    import transformers

    model = tiny_model()
    bert.write_export(tmp_path / "hf", model.state_dict(), model.config, spm_path, fmt="hf")
    hf_model, info = transformers.BertForPreTraining.from_pretrained(
        str(tmp_path / "hf"), output_loading_info=True
    )
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    inputs = batch(model.config.vocab_size)
    with torch.no_grad():
        expected, actual = model(**inputs), hf_model.eval()(**inputs)
    torch.testing.assert_close(actual.prediction_logits, expected.prediction_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        actual.seq_relationship_logits, expected.seq_relationship_logits, rtol=0, atol=1e-5
    )
    encoder, auto_info = transformers.AutoModel.from_pretrained(
        str(tmp_path / "hf"), output_loading_info=True
    )
    assert type(encoder).__name__ == "BertModel"
    assert auto_info["missing_keys"] == set() and auto_info["mismatched_keys"] == set()
    # A bare encoder leaves out exactly the pre-training heads (the MLM and sentence classifiers).
    assert auto_info["unexpected_keys"] and all(
        key.startswith("cls.") for key in auto_info["unexpected_keys"]
    )
    with torch.no_grad():
        hidden = encoder.eval()(**inputs).last_hidden_state
        torch.testing.assert_close(
            hidden,
            model.bert(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"]),
            rtol=0,
            atol=1e-5,
        )


def test_mlm_only_model_exports_as_masked_lm(tmp_path: Path, spm_path: Path) -> None:
    import transformers

    model = tiny_model(next_sentence_head=False)
    bert.write_export(tmp_path / "mlm", model.state_dict(), model.config, spm_path, fmt="hf")
    hf_model, info = transformers.AutoModelForMaskedLM.from_pretrained(
        str(tmp_path / "mlm"), output_loading_info=True
    )
    assert type(hf_model).__name__ == "BertForMaskedLM"
    assert (info["missing_keys"], info["unexpected_keys"]) == (set(), set())
    inputs = batch(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(
            hf_model.eval()(**inputs).logits, model(**inputs).prediction_logits, rtol=0, atol=1e-5
        )


def test_native_export_round_trip_with_extra_config(tmp_path: Path, spm_path: Path) -> None:
    model = tiny_model(pre_layernorm=True)
    card = {"training": {"step": 7}, "notes": ["made by a test"]}
    bert.write_export(
        tmp_path / "n",
        model.state_dict(),
        model.config,
        spm_path,
        dtype="fp32",
        card=card,
        extra_config={"task": {"num_labels": 3}},
    )
    config, weights, spm_model = bert_read.load_encoder_weights(str(tmp_path / "n"))
    assert config == model.config and spm_model.read_bytes() == spm_path.read_bytes()
    for name, tensor in model.state_dict().items():
        assert torch.equal(weights[name], tensor), name
    assert weights["cls.predictions.decoder.weight"] is weights["bert.embeddings.word_embeddings.weight"]
    saved = json.loads((tmp_path / "n" / files.CONFIG_FILE).read_text())
    assert saved["task"] == {"num_labels": 3} and "model_type" not in saved
    assert "| step | 7 |" in (tmp_path / "n" / files.CARD_FILE).read_text()
    assert not list(tmp_path.glob(".n.partial*"))


def test_fine_tuned_encoder_with_task_head_exports_for_transformers(tmp_path: Path, spm_path: Path) -> None:
    import transformers

    model = tiny_model()
    weights = {name: t for name, t in model.state_dict().items() if name.startswith("bert.")}
    weights["classifier.weight"] = torch.randn(3, 32)
    weights["classifier.bias"] = torch.randn(3)
    extra = {"architectures": ["BertForSequenceClassification"], "id2label": {"0": "a", "1": "b", "2": "c"}}
    bert.write_export(tmp_path / "ft", weights, model.config, spm_path, fmt="hf", extra_config=extra)
    classifier, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(tmp_path / "ft"), output_loading_info=True
    )
    assert (info["missing_keys"], info["unexpected_keys"]) == (set(), set())
    assert classifier.config.num_labels == 3
    _, loaded, _ = bert_read.load_encoder_weights(str(tmp_path / "ft"))
    assert sorted(loaded) == sorted(weights)  # no tied aliases without the MLM head
    with pytest.raises(ValueError, match="'pretrain'"):
        bert.write_export(tmp_path / "x", weights, model.config, spm_path, extra_config={"pretrain": {}})
    weights["bert.extra.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match=r"unexpected \['bert.extra.weight'\]"):
        bert.write_export(tmp_path / "x", weights, model.config, spm_path)


def test_bf16_export_loads_back_as_the_cast(tmp_path: Path, spm_path: Path) -> None:
    model = tiny_model()
    bert.write_export(tmp_path / "b", model.state_dict(), model.config, spm_path, dtype="bf16")
    _, weights, _ = bert_read.load_export(tmp_path / "b")
    for name, tensor in model.state_dict().items():
        assert weights[name].dtype == torch.float32
        assert torch.equal(weights[name], tensor.to(torch.bfloat16).float()), name


# ----------------------------------------------------------------------------- HF tokenizer


def test_hf_tokenizer_gives_sentencepiece_ids(tmp_path: Path, spm_path: Path) -> None:
    import transformers

    model = tiny_model()
    bert.write_export(tmp_path / "hf", model.state_dict(), model.config, spm_path, fmt="hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "hf" / name).is_file()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    processor = spm.SentencePieceProcessor(model_file=str(spm_path))
    texts = SAMPLE_TEXTS + generate_text(9, sentences=40)
    for text in texts:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == processor.encode(text), text
    assert any(processor.is_byte(i) for text in SAMPLE_TEXTS for i in processor.encode(text))  # fallback used
    pair = tokenizer("one two", "three")
    a, b = processor.encode("one two"), processor.encode("three")
    assert pair["input_ids"] == [2, *a, 3, *b, 3]
    assert pair["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    assert tokenizer.mask_token_id == 4 and tokenizer.pad_token_id == 0 and tokenizer.unk_token_id == 1
    assert tokenizer.decode(processor.encode("x1y22z333 café")) == "x1y22z333 café"


def test_fixture_tokenizer_converts_too(tmp_path: Path) -> None:
    from training.export.hf_tokenizer import build_tokenizer

    (tmp_path / "spm.model").write_bytes(train_tokenizer(320, 0))
    tokenizer = build_tokenizer(tmp_path / "spm.model")
    processor = spm.SentencePieceProcessor(model_file=str(tmp_path / "spm.model"))
    for text in generate_text(2, sentences=30):
        assert tokenizer.encode(text, add_special_tokens=False).ids == processor.encode(text)


# ----------------------------------------------------------------------------- refusals


def test_bad_inputs_are_user_errors(
    tmp_path: Path, spm_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tiny_model(pre_layernorm=True)
    with pytest.raises(UserError, match="pre_layernorm.*--format native"):
        bert.write_export(tmp_path / "o", model.state_dict(), model.config, spm_path, fmt="hf")
    with pytest.raises(UserError, match="--dtype 'int8': expected one of fp32, bf16, fp16"):
        bert.write_export(tmp_path / "o", model.state_dict(), model.config, spm_path, dtype="int8")
    with pytest.raises(UserError, match="--format 'onnx'"):
        bert.write_export(tmp_path / "o", model.state_dict(), model.config, spm_path, fmt="onnx")
    weights = dict(model.state_dict())
    del weights["bert.pooler.dense.bias"]
    with pytest.raises(UserError, match=r"missing \['bert.pooler.dense.bias'\]"):
        bert.write_export(tmp_path / "o", weights, model.config, spm_path)
    with pytest.raises(UserError, match="not a run directory"):
        checkpoints.find_checkpoint(tmp_path)
    (tmp_path / "run" / "checkpoints" / "step00000003").mkdir(parents=True)  # an interrupted save
    with pytest.raises(UserError, match="no complete checkpoint"):
        checkpoints.find_checkpoint(tmp_path / "run")
    with pytest.raises(UserError, match="neither an export directory"):
        bert_read.load_encoder_weights(str(tmp_path))
    assert export_cli(str(tmp_path / "run"), "--out", str(tmp_path / "o"), "--dtype", "fp8") == 2
    assert "--dtype 'fp8'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_broken_tie_is_refused(tmp_path: Path, spm_path: Path) -> None:
    model = tiny_model()
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    weights["cls.predictions.decoder.weight"] += 1.0
    with pytest.raises(UserError, match="cls.predictions.decoder.weight differs"):
        bert.write_export(tmp_path / "o", weights, model.config, spm_path)


if __name__ == "__main__":
    sys.exit(_train_and_dump(sys.argv[1:]))
