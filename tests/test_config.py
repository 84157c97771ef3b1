"""The typed training config: key-path errors, --set precedence, gradient accumulation."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_pipeline.errors import UserError
from training.config import Config, apply_overrides, config_from_dict, load_config
from training.deepspeed_config import gradient_accumulation_steps, resolve_deepspeed_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

BASE = """
model: {size: tiny, dropout: 0.0}
train: {total_steps: 50, log_every: 5}
deepspeed:
  train_batch_size: 32
  train_micro_batch_size_per_gpu: 8
  zero_optimization: {stage: 1}
  scheduler: {type: WarmupDecayLR, params: {warmup_num_steps: 5}}
"""


@pytest.fixture()
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(BASE, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"train": {"global_batch_size": 4}}, r"^train\.global_batch_size: unknown key"),
        ({"train": {"total_steps": "x"}}, r"^train\.total_steps: expected int, got 'x'"),
        ({"train": {"seed": True}}, r"^train\.seed: expected int, got True"),
        ({"model": {"hidden_size": 1.5}}, r"^model\.hidden_size: expected int or NoneType, got 1\.5"),
        ({"data": {"whole_word_mask": "yes"}}, r"^data\.whole_word_mask: expected bool, got 'yes'"),
        ({"model": {"next_sentence_head": "maybe"}}, r"^model\.next_sentence_head: expected true, false or 'auto'"),
        ({"optimiser": {}}, r"^optimiser: unknown section"),
        ({"data": [1, 2]}, r"^data: expected a mapping"),
        ({"train": {"collective_timeout_s": "10m"}}, r"^train\.collective_timeout_s: expected float, got '10m'"),
        ({"train": {"collective_timeout_s": 0}}, r"^train\.collective_timeout_s: expected seconds > 0, got 0"),
    ],
)
def test_bad_keys_and_types_name_the_key_path(raw: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        config_from_dict(raw)


def test_defaults_file_and_set_precedence(config_file: Path) -> None:
    config = load_config(config_file, ["train.total_steps=100", "deepspeed.zero_optimization.stage=3",
                                       "deepspeed.bf16.enabled=true", "model.next_sentence_head=false"])
    assert config.train.total_steps == 100  # --set beats the file
    assert config.train.log_every == 5  # the file beats the default
    assert config.train.save_every == 200  # the default
    assert config.train.collective_timeout_s == 600.0  # ten minutes unless set
    assert config.model.dropout == 0.0 and isinstance(config.model.dropout, float)
    assert config.model.next_sentence_head is False
    assert config.deepspeed["zero_optimization"] == {"stage": 3}
    assert config.deepspeed["bf16"] == {"enabled": True}  # intermediate mappings are created


def test_set_checks_types_and_syntax(config_file: Path) -> None:
    with pytest.raises(UserError, match=r"^train\.total_steps: expected int, got 'ten'"):
        load_config(config_file, ["train.total_steps=ten"])
    with pytest.raises(UserError, match=r"expected KEY\.PATH=VALUE"):
        load_config(config_file, ["train.total_steps"])
    with pytest.raises(UserError, match=r"deepspeed\.train_batch_size is 32, not a mapping"):
        apply_overrides({"deepspeed": {"train_batch_size": 32}}, ["deepspeed.train_batch_size.x=1"])


def test_missing_or_broken_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"config .*nope\.yaml: cannot read"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: {total_steps: [", encoding="utf-8")
    with pytest.raises(UserError, match=r"broken\.yaml: not valid YAML"):
        load_config(broken)


@pytest.mark.parametrize(("world_size", "expected"), [(1, 4), (2, 2), (4, 1)])
def test_gradient_accumulation_is_computed(config_file: Path, world_size: int, expected: int) -> None:
    resolved = resolve_deepspeed_config(load_config(config_file), world_size)
    assert resolved["gradient_accumulation_steps"] == expected
    assert resolved["scheduler"]["params"]["total_num_steps"] == 50  # filled from train.total_steps


def test_gradient_accumulation_not_divisible_names_the_numbers(config_file: Path) -> None:
    with pytest.raises(UserError, match=r"train_batch_size=32 is not divisible by "
                                        r"train_micro_batch_size_per_gpu=8 x world size 3 = 24"):
        resolve_deepspeed_config(load_config(config_file), 3)
    assert gradient_accumulation_steps(1024, 32, 8) == 4


def test_given_accumulation_must_agree_and_schedule_length_is_kept(config_file: Path) -> None:
    config = load_config(config_file, ["deepspeed.gradient_accumulation_steps=3"])
    with pytest.raises(UserError, match=r"gradient_accumulation_steps=3 disagrees .* = 4"):
        resolve_deepspeed_config(config, 1)
    config = load_config(config_file, ["deepspeed.scheduler.params.total_num_steps=70"])
    assert resolve_deepspeed_config(config, 1)["scheduler"]["params"]["total_num_steps"] == 70


def test_batch_sizes_are_required() -> None:
    with pytest.raises(UserError, match=r"deepspeed\.train_batch_size: expected a positive int, got None"):
        resolve_deepspeed_config(Config(), 1)


@pytest.mark.parametrize("name", ["bert-tiny", "bert-base", "bert-large"])
def test_shipped_recipes_load(name: str) -> None:
    config = load_config(CONFIGS / f"{name}.yaml")
    resolved = resolve_deepspeed_config(config, 1 if name == "bert-tiny" else 8)
    assert resolved["scheduler"]["params"]["total_num_steps"] == config.train.total_steps
