"""BERT weights to export or fine-tune from: a run's checkpoint (consolidated) or an export directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from data_pipeline.errors import UserError
from data_pipeline.formats.location import file_sha256
from data_pipeline.formats.manifest import read_manifest
from training import checkpoint as ckpt
from training.export.bert import (
    check_state_dict,
    export_tokenizer_path,
    model_builder,
    model_config_from_dict,
    retie,
)
from training.export.checkpoints import consolidate, final_metrics, find_checkpoint
from training.export.files import CONFIG_FILE, WEIGHTS_FILE, read_export_config, read_weights
from training.models.bert_config import BertConfig


def manifest_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """The model card's data section: objective, sequence length, split sizes and the tokenizer."""
    summary: dict[str, Any] = {
        "objective": manifest.get("objective"),
        "seq_len": manifest.get("seq_len"),
    }
    for split, entry in sorted((manifest.get("splits") or {}).items()):
        summary[f"{split} samples"] = entry.get("samples")
        summary[f"{split} tokens"] = entry.get("tokens")
        summary[f"{split} shards"] = len(entry.get("shards") or [])
    tokenizer = manifest.get("tokenizer") or {}
    summary["tokenizer vocab_size"] = tokenizer.get("vocab_size")
    summary["tokenizer sha256"] = tokenizer.get("sha256")
    return {key: value for key, value in summary.items() if value is not None}


def run_tokenizer(state: dict[str, Any], tag_dir: Path, tokenizer: Path | None = None) -> tuple[Path, dict]:
    """The SentencePiece model of a run and its data manifest (empty when the data folder is gone).

    Args:
        state: The checkpoint's trainer state (``data_dir``, ``tokenizer_sha256``).
        tag_dir: The checkpoint, for messages.
        tokenizer: An explicit spm.model, for runs whose data folder moved. Defaults to the manifest's.

    Raises:
        UserError: No tokenizer can be found, or its sha256 is not the one the run was trained with.
    """
    manifest: dict[str, Any] = {}
    data_dir = state.get("data_dir")
    if data_dir and Path(data_dir, "manifest.json").is_file():
        manifest = read_manifest(str(data_dir))
    if tokenizer is None:
        if not manifest:
            raise UserError(
                f"checkpoint {tag_dir}: its data folder {data_dir!r} (with the tokenizer) is not there; "
                "pass --tokenizer PATH/spm.model"
            )
        tokenizer = Path(data_dir) / manifest["tokenizer"].get("path", "tokenizer/spm.model")
    if not tokenizer.is_file():
        raise UserError(f"tokenizer {tokenizer}: no such file")
    expected = state.get("tokenizer_sha256")
    actual = file_sha256(str(tokenizer))
    if expected and actual != expected:
        raise UserError(
            f"tokenizer {tokenizer}: sha256 {actual}, but checkpoint {tag_dir} was trained with {expected}"
        )
    return tokenizer, manifest


def run_checkpoint_state(run_dir: Path, step: int | None = None) -> tuple[Path, dict[str, Any], BertConfig]:
    """A run's complete checkpoint before any weights are read: (tag folder, trainer state, model config).

    Args:
        run_dir: The training run directory.
        step: The checkpoint's step. Defaults to the newest complete (and sound) checkpoint.

    Raises:
        UserError: As :func:`~training.export.checkpoints.find_checkpoint`, a trainer state without the
            model config or ZeRO stage, or a checkpoint of another method than BERT.
    """
    tag_dir = find_checkpoint(run_dir, step)
    state = ckpt.read_trainer_state(tag_dir)
    if "model_config" not in state or "zero_stage" not in state:
        raise UserError(f"checkpoint {tag_dir}: trainer state lacks model_config or zero_stage")
    method = state.get("objective", "bert")  # checkpoints from before SimCLR are BERT's
    if method != "bert":
        raise UserError(f"checkpoint {tag_dir}: a {method!r} run, not a BERT one")
    model_config = model_config_from_dict(state["model_config"], str(tag_dir / ckpt.TRAINER_STATE_NAME))
    return tag_dir, state, model_config


def consolidate_run_weights(
    tag_dir: Path, state: dict[str, Any], model_config: BertConfig, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The checkpoint's full state_dict (any ZeRO stage, tied aliases included) and its precision notes.

    Raises:
        UserError: As :func:`~training.export.checkpoints.consolidate`, or weights that do not fit
            ``model_config``.
    """
    state_dict, notes = consolidate(tag_dir, int(state["zero_stage"]), model_builder(model_config), dtype)
    check_state_dict(state_dict, model_config, f"checkpoint {tag_dir}")
    return state_dict, notes


def read_run_checkpoint(
    run_dir: Path, step: int | None = None, dtype: torch.dtype = torch.float32, tokenizer: Path | None = None
) -> tuple[BertConfig, dict[str, torch.Tensor], Path, dict[str, Any]]:
    """Consolidate a run's checkpoint: (model config, state_dict, spm.model path, model card facts).

    Args:
        run_dir: The training run directory.
        step: The checkpoint's step. Defaults to the newest complete checkpoint.
        dtype: Floating-point dtype of the weights. Defaults to float32.
        tokenizer: See :func:`run_tokenizer`.

    Raises:
        UserError: As :func:`run_checkpoint_state`, :func:`run_tokenizer` and
            :func:`consolidate_run_weights`.
    """
    tag_dir, state, model_config = run_checkpoint_state(run_dir, step)
    spm_model_path, manifest = run_tokenizer(state, tag_dir, tokenizer)
    state_dict, notes = consolidate_run_weights(tag_dir, state, model_config, dtype)
    training = {key: state[key] for key in ("step", "tokens_seen", "samples_seen", "epoch") if key in state}
    training.update(world_size=state.get("world_size"), zero_stage=state["zero_stage"])
    card = {
        "source": str(tag_dir),
        "training": training,
        "data": manifest_summary(manifest) if manifest else {"data folder": state.get("data_dir")},
        "metrics": {key: value for key, value in final_metrics(run_dir).items() if key != "step"},
        "notes": notes,
    }
    return model_config, state_dict, spm_model_path, card


def read_export_weights(export_dir: Path | str) -> tuple[BertConfig, dict[str, torch.Tensor]]:
    """An export directory's model config and fp32 state_dict (tied aliases included), without its tokenizer.

    Raises:
        UserError: Not an export directory, or weights that do not fit its config.
    """
    export_dir = Path(export_dir)
    config = read_export_config(export_dir)
    model_config = model_config_from_dict(config["pretrain"]["model_config"], str(export_dir / CONFIG_FILE))
    state_dict = retie(read_weights(export_dir))
    check_state_dict(state_dict, model_config, str(export_dir / WEIGHTS_FILE), task_heads=True)
    return model_config, state_dict


def load_export(export_dir: Path | str) -> tuple[BertConfig, dict[str, torch.Tensor], Path]:
    """Read an export directory back: (model config, fp32 state_dict with tied aliases, tokenizer file).

    Raises:
        UserError: Not an export directory, or weights that do not fit its config.
    """
    export_dir = Path(export_dir)
    model_config, state_dict = read_export_weights(export_dir)
    return model_config, state_dict, export_tokenizer_path(export_dir)


def load_encoder_weights(path: str) -> tuple[BertConfig, dict[str, torch.Tensor], Path]:
    """Pre-trained weights for fine-tuning, from an export directory or a run directory.

    Args:
        path: An export directory (either format), or a run directory (its newest complete checkpoint is
            consolidated on the fly).

    Returns:
        The model config, the fp32 state_dict (HF names; tied aliases included, so it loads strictly into
        ``BertForPreTraining``; a fine-tuned export gives its encoder and task head instead) and the
        SentencePiece model path.

    Raises:
        UserError: ``path`` is neither, or as :func:`load_export` / :func:`read_run_checkpoint`.
    """
    root = Path(path)
    if (root / CONFIG_FILE).is_file():
        return load_export(root)
    if (root / "checkpoints").is_dir():
        model_config, state_dict, spm_model_path, _ = read_run_checkpoint(root)
        return model_config, state_dict, spm_model_path
    raise UserError(f"{path}: neither an export directory ({CONFIG_FILE}) nor a run directory (checkpoints/)")
