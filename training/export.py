"""Checkpoint -> portable export: consolidate any ZeRO stage, cast, and write safetensors, config and tokenizer.

An export directory holds ``model.safetensors`` (HuggingFace ``BertForPreTraining`` names, the tied decoder
weight and bias stored once, as transformers does), ``config.json`` (our ``BertConfig`` under ``pretrain``;
for ``hf`` also transformers' BERT fields), ``spm.model`` and a model card ``README.md``; ``hf`` exports add
tokenizer.json and its configs.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from data_pipeline.errors import UserError
from data_pipeline.shard_format import file_sha256, load_manifest
from training import checkpoint as ckpt
from training.models.bert import BertConfig, BertForPreTraining

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_MODEL_FILE = "spm.model"
CARD_FILE = "README.md"
FORMATS = ("native", "hf")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Tied parameters: alias -> the name that is stored. transformers saves and loads them this way.
TIED_ALIASES = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}
MODEL_STATES_FILE = "mp_rank_00_model_states.pt"


def find_checkpoint(run_dir: Path, step: int | None = None) -> Path:
    """The complete checkpoint tag folder of ``run_dir``: the newest one, or that of ``step``.

    Raises:
        UserError: ``run_dir`` is not a run directory, has no complete checkpoint, or none at ``step``
            (listing the steps there are).
    """
    checkpoint_dir = run_dir / "checkpoints"
    if not checkpoint_dir.is_dir():
        raise UserError(f"{run_dir}: not a run directory (no checkpoints/ folder)")
    tags = ckpt.complete_tags(checkpoint_dir)
    if not tags:
        raise UserError(
            f"{checkpoint_dir}: no complete checkpoint (no tag folder holds {ckpt.COMPLETE_MARKER})"
        )
    if step is None:
        return checkpoint_dir / tags[-1]
    wanted = ckpt.tag_for_step(step)
    if wanted not in tags:
        available = ", ".join(str(ckpt.step_of_tag(tag)) for tag in tags)
        raise UserError(
            f"{checkpoint_dir}: no complete checkpoint at step {step}; available steps: {available}"
        )
    return checkpoint_dir / wanted


def _materialise(tensors: Iterable[tuple[str, Any]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors in ``dtype``, made one at a time (DeepSpeed's lazy tensors included).

    Tensors that share storage in the checkpoint (tied weights) stay shared here, so they cost once.
    """
    made: dict[int, torch.Tensor] = {}
    result: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        if id(tensor) not in made:
            value = tensor.contiguous()  # a GatheredTensor of ZeRO-3 partitions is joined here
            if value.is_floating_point():
                value = value.to(dtype)
            made[id(tensor)] = value.cpu()
        result[name] = made[id(tensor)]
    return result


def _zero_state(tag_dir: Path) -> dict[str, Any]:
    """DeepSpeed's fp32 master weights of a ZeRO 1-3 checkpoint, as lazy (not yet joined) tensors."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # DeepSpeed prints a line per step of the merge; the export prints its own summary.
    with contextlib.redirect_stdout(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name, lazy_mode=True)


def _stage0_file(tag_dir: Path) -> dict[str, Any]:
    """The model-states file of a ZeRO-0 checkpoint (module, and the optimizer with any fp32 master copy)."""
    path = tag_dir / MODEL_STATES_FILE
    if not path.is_file():
        raise UserError(f"checkpoint {tag_dir}: no {MODEL_STATES_FILE}")
    # DeepSpeed pickles its own objects (config, scheduler) beside the tensors: weights_only cannot read it.
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


ModelSpec = BertConfig | Callable[[], torch.nn.Module]
"""A BERT architecture, or a function building the (non-BERT) model whose checkpoint is read."""


def parameter_shapes(model_config: ModelSpec) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the model's parameters, in ``model.parameters()`` order (nothing allocated)."""
    with torch.device("meta"):
        model = BertForPreTraining(model_config) if isinstance(model_config, BertConfig) else model_config()
        return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def _stage0_master_weights(saved: dict[str, Any], model_config: ModelSpec) -> dict[str, torch.Tensor] | None:
    """The fp32 master weights a ZeRO-0 16-bit optimizer keeps, by parameter name; None when there are none.

    DeepSpeed's FP16/BF16 wrappers store them by position only (``fp32_groups``: one tensor per parameter;
    ``fp32_groups_flat``: one flat tensor per group), in the order of ``model.parameters()``, which is the
    order the engine received them in (``training.engine.build_engine``). Every shape is checked.
    """
    optimizer = saved.get("optimizer") or {}
    named = parameter_shapes(model_config)
    if "fp32_groups" in optimizer:
        tensors = [tensor for group in optimizer["fp32_groups"] for tensor in group]
    elif "fp32_groups_flat" in optimizer:
        flat = torch.cat([group.reshape(-1) for group in optimizer["fp32_groups_flat"]])
        sizes = [math.prod(shape) for _, shape in named]
        if flat.numel() < sum(sizes):
            return None
        tensors = list(flat[: sum(sizes)].split(sizes))
    else:
        return None
    if len(tensors) != len(named):
        return None
    weights: dict[str, torch.Tensor] = {}
    for (name, shape), tensor in zip(named, tensors):
        if tensor.numel() != math.prod(shape):
            return None
        weights[name] = tensor.reshape(shape)
    return weights


def _stage0_state(tag_dir: Path, model_config: ModelSpec) -> tuple[dict[str, torch.Tensor], str | None]:
    """A ZeRO-0 checkpoint's weights, fp32 master copies preferred; and a note when only 16-bit ones exist."""
    saved = _stage0_file(tag_dir)
    module = saved["module"]
    trained = next((t.dtype for t in module.values() if t.is_floating_point()), torch.float32)
    if trained == torch.float32:
        return module, None
    master = _stage0_master_weights(saved, model_config)
    if master is not None:
        return retie({**module, **master}), None
    return module, (
        f"ZeRO-0 checkpoint of {trained} training without a readable fp32 master copy: these are its "
        f"{trained} weights"
    )


def consolidate(
    tag_dir: Path, zero_stage: int, model_config: ModelSpec, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """One full state_dict (HF names, tied aliases included) from a DeepSpeed checkpoint of any ZeRO stage.

    ZeRO 1-3 checkpoints go through DeepSpeed's own consolidation of the fp32 master weights (CPU only, no
    launcher). ZeRO 0 keeps the whole module in one file, and with bf16/fp16 training the fp32 master
    weights in its optimizer state, which are used then.

    Args:
        tag_dir: The checkpoint tag folder (``RUN_DIR/checkpoints/step00000200``).
        zero_stage: The stage it was written with (from the trainer state).
        model_config: The architecture (names the positional ZeRO-0 master weights): a ``BertConfig``,
            or a function that builds another model.
        dtype: Floating-point dtype of the result, cast tensor by tensor. Defaults to float32.

    Returns:
        The state_dict, and notes for the model card (a precision caveat), usually none.

    Raises:
        UserError: The folder lacks DeepSpeed's files.
    """
    if zero_stage == 0:
        state, note = _stage0_state(tag_dir, model_config)
        return _materialise(state.items(), dtype), [note] if note else []
    if not list(tag_dir.glob("*_optim_states.pt")):
        raise UserError(f"checkpoint {tag_dir}: ZeRO-{zero_stage} checkpoint without *_optim_states.pt files")
    try:
        lazy = _zero_state(tag_dir)
    except (FileNotFoundError, ValueError) as error:
        raise UserError(f"checkpoint {tag_dir}: DeepSpeed cannot consolidate it: {error}") from error
    return _materialise(lazy.items(), dtype), []


def check_state_dict(
    state_dict: dict[str, torch.Tensor], model_config: BertConfig, source: str, *, task_heads: bool = False
) -> None:
    """Refuse weights whose names or shapes are not those of ``BertForPreTraining(model_config)``.

    Args:
        state_dict: The weights.
        model_config: The architecture they must fit.
        source: Where they come from, for messages.
        task_heads: Accept a fine-tuned model: the encoder (``bert.``) complete, the pre-training heads
            (``cls.``) complete or absent, and other top-level names (a task head) as they are.
            Defaults to False (exactly the pre-training model).

    Raises:
        UserError: Naming ``source``, the missing and unexpected keys, or the first shape that differs.
    """
    with torch.device("meta"):  # shapes only, no memory
        expected = BertForPreTraining(model_config).state_dict()
    required = set(expected)
    if task_heads and not any(name.startswith("cls.") for name in state_dict):
        required = {name for name in expected if not name.startswith("cls.")}
    missing = sorted(required - set(state_dict))
    unexpected = sorted(
        name
        for name in set(state_dict) - set(expected)
        if not task_heads or name.startswith(("bert.", "cls."))
    )
    if missing or unexpected:
        raise UserError(
            f"{source}: weights do not fit the model config: missing {missing}, unexpected {unexpected}"
        )
    for name in required:
        if tuple(state_dict[name].shape) != tuple(expected[name].shape):
            raise UserError(
                f"{source}: {name} has shape {tuple(state_dict[name].shape)}, the model config gives "
                f"{tuple(expected[name].shape)}"
            )


def _untie(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state_dict without tied aliases; safetensors refuses two names on one storage.

    Raises:
        UserError: An alias holds other values than the tensor it is tied to (a broken tie).
    """
    for alias, stored in TIED_ALIASES.items():
        if alias in state_dict and not torch.equal(state_dict[alias], state_dict[stored]):
            raise UserError(f"weights: {alias} differs from {stored}, but the model ties them")
    return {name: tensor for name, tensor in state_dict.items() if name not in TIED_ALIASES}


def retie(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the tied aliases back (as the same tensors), so ``load_state_dict(strict=True)`` accepts it."""
    tied = dict(state_dict)
    if "cls.predictions.bias" not in tied:  # no MLM head (a fine-tuned encoder): nothing is tied
        return tied
    for alias, stored in TIED_ALIASES.items():
        tied[alias] = tied[stored]
    return tied


def model_config_from_dict(values: dict[str, Any], source: str) -> BertConfig:
    """A ``BertConfig`` from saved fields.

    Raises:
        UserError: Unknown or missing fields, naming ``source``.
    """
    known = {field.name for field in fields(BertConfig)}
    unknown = sorted(set(values) - known)
    if unknown or "vocab_size" not in values:
        raise UserError(
            f"{source}: not a BertConfig: unknown fields {unknown}, vocab_size {'vocab_size' in values}"
        )
    return BertConfig(**values)


def _config_json(model_config: BertConfig, fmt: str, dtype: str, extra_config: dict[str, Any] | None) -> dict:
    """config.json: transformers' BERT fields for ``hf``, and always our own config under ``pretrain``."""
    config: dict[str, Any] = {}
    if fmt == "hf":
        with torch.device("meta"):
            config.update(BertForPreTraining(model_config).hf_config())
        config["dtype"] = str(DTYPES[dtype]).removeprefix("torch.")
    if "pretrain" in (extra_config or {}):
        raise ValueError("extra_config must not set 'pretrain': that section is the export's own")
    # After the HF fields, so that a fine-tuned model can set e.g. its architectures and labels.
    config.update(extra_config or {})
    config["pretrain"] = {"format": fmt, "dtype": dtype, "model_config": asdict(model_config)}
    return config


def check_options(fmt: str, dtype: str, model_config: BertConfig | None = None) -> None:
    """Refuse an unknown format or dtype, and ``hf`` for a pre-LN model (when its config is given).

    Raises:
        UserError: Naming the option, its value and the choices.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if fmt == "hf" and model_config is not None and model_config.pre_layernorm:
        raise UserError(
            "--format hf: this model uses pre_layernorm, which transformers' BERT cannot represent; "
            "export with --format native"
        )


def hf_tokenizer_problem(spm_model_path: Path) -> str | None:
    """Why no equivalent HF tokenizer.json can be built from this SentencePiece model, or None."""
    try:
        from training.hf_tokenizer import read_spm_settings, unsupported_reason

        settings = read_spm_settings(spm_model_path.read_bytes(), str(spm_model_path))
    except ImportError as error:  # the tokenizers package, or protobuf for reading the model proto
        return f"cannot build it here: {error}"
    return unsupported_reason(settings)


def write_export(
    out_dir: Path | str,
    state_dict: dict[str, torch.Tensor],
    model_config: BertConfig,
    spm_model_path: Path | str,
    *,
    fmt: str = "native",
    dtype: str = "fp32",
    card: dict[str, Any] | None = None,
    extra_config: dict[str, Any] | None = None,
) -> None:
    """Write an export directory: model.safetensors, config.json, spm.model, README.md (+ HF tokenizer).

    Files are written into a temporary sibling folder and moved into ``out_dir`` when all are done, so an
    interrupted export never leaves a folder that looks complete.

    Args:
        out_dir: Destination; created, or its export files replaced.
        state_dict: Full weights with HF ``BertForPreTraining`` names (tied aliases optional); a fine-tuned
            model may leave out the ``cls.`` pre-training heads and add its own top-level task head.
        model_config: The architecture the weights belong to.
        spm_model_path: The SentencePiece model the weights were trained with.
        fmt: ``native`` or ``hf``. Defaults to ``native``.
        dtype: ``fp32``, ``bf16`` or ``fp16``, the stored floating-point type. Defaults to ``fp32``.
        card: Facts for the model card (see :func:`card_text`). Defaults to none.
        extra_config: Keys set at the top level of config.json, after the HF fields (e.g. a fine-tuned
            model's ``architectures``, ``num_labels``, ``id2label``); ``pretrain`` is reserved.

    Raises:
        UserError: Unknown format or dtype, pre-LN with ``hf``, weights that do not fit, no tokenizer.
    """
    out_dir, spm_model_path = Path(out_dir).resolve(), Path(spm_model_path)
    check_options(fmt, dtype, model_config)
    check_state_dict(state_dict, model_config, "weights to export", task_heads=True)
    if not spm_model_path.is_file():
        raise UserError(f"tokenizer {spm_model_path}: no such file")
    config = _config_json(model_config, fmt, dtype, extra_config)
    target = DTYPES[dtype]
    tensors = {
        name: tensor.detach().to(target).contiguous() if tensor.is_floating_point() else tensor.contiguous()
        for name, tensor in _untie(state_dict).items()
    }
    staging = out_dir.with_name(f".{out_dir.name}.partial{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
    del tensors
    (staging / WEIGHTS_FILE).chmod(0o644)  # safetensors creates it owner-only; an export is for sharing
    (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    shutil.copyfile(spm_model_path, staging / TOKENIZER_MODEL_FILE)
    card = dict(card or {})
    if fmt == "hf":
        reason = hf_tokenizer_problem(spm_model_path)
        if reason is None:
            from training.hf_tokenizer import write_hf_tokenizer

            write_hf_tokenizer(spm_model_path, staging, model_config.max_position_embeddings)
        else:
            card["notes"] = [
                *card.get("notes", []),
                f"no HF tokenizer.json: {reason}; use {TOKENIZER_MODEL_FILE}",
            ]
    (staging / CARD_FILE).write_text(card_text(model_config, fmt, dtype, card), encoding="utf-8")
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(staging.iterdir()):
        os.replace(path, out_dir / path.name)
    staging.rmdir()


def _format_number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def card_text(model_config: BertConfig, fmt: str, dtype: str, card: dict[str, Any]) -> str:
    """The model card: architecture, training progress, data summary and final metrics.

    Args:
        model_config: The architecture.
        fmt: The export format.
        dtype: The stored dtype.
        card: Optional facts: ``source`` (str), ``training`` (dict: step, tokens_seen, ...), ``data``
            (dict: the manifest summary), ``metrics`` (dict: name -> last value), ``notes`` (list of str).
    """
    heads = "MLM + next-sentence head" if model_config.next_sentence_head else "MLM head only"
    lines = [
        "# BERT pre-trained with `pretrain`",
        "",
        (
            f"Format `{fmt}` ({'loads with transformers.BertForPreTraining' if fmt == 'hf' else 'our layout'}), "
            f"weights stored as {dtype} in `{WEIGHTS_FILE}`, tokenizer `{TOKENIZER_MODEL_FILE}` (SentencePiece)."
        ),
        "",
        "## Architecture",
        "",
        (
            f"{model_config.num_hidden_layers} layers, hidden {model_config.hidden_size}, "
            f"{model_config.num_attention_heads} heads, feed-forward {model_config.intermediate_size}, "
            f"vocabulary {model_config.vocab_size}, {'pre' if model_config.pre_layernorm else 'post'}-LayerNorm, "
            f"{heads}."
        ),
    ]
    if card.get("source"):
        lines += ["", f"Exported from `{card['source']}`."]
    for title, key in (("Training", "training"), ("Data", "data"), ("Final metrics", "metrics")):
        section = card.get(key) or {}
        if section:
            lines += ["", f"## {title}", "", "| | |", "|---|---|"]
            lines += [f"| {name} | {_format_number(value)} |" for name, value in section.items()]
    for note in card.get("notes") or []:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


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


def final_metrics(run_dir: Path) -> dict[str, Any]:
    """The last logged value of every metric in RUN_DIR/metrics.jsonl (empty when there is no file)."""
    from training.metrics import METRICS_FILE, read_metrics

    if not (run_dir / METRICS_FILE).is_file():
        return {}
    latest: dict[str, Any] = {}
    for record in read_metrics(run_dir / METRICS_FILE):
        latest.update(record)
    return latest


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
        manifest = load_manifest(str(data_dir))
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
        UserError: As :func:`find_checkpoint`, :func:`run_tokenizer` and :func:`consolidate`.
    """
    tag_dir = find_checkpoint(run_dir, step)
    state = ckpt.read_trainer_state(tag_dir)
    if "model_config" not in state or "zero_stage" not in state:
        raise UserError(f"checkpoint {tag_dir}: trainer state lacks model_config or zero_stage")
    model_config = model_config_from_dict(state["model_config"], str(tag_dir / ckpt.TRAINER_STATE_NAME))
    spm_model_path, manifest = run_tokenizer(state, tag_dir, tokenizer)
    state_dict, notes = consolidate(tag_dir, int(state["zero_stage"]), model_config, dtype)
    check_state_dict(state_dict, model_config, f"checkpoint {tag_dir}")
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


def read_export_config(export_dir: Path) -> dict[str, Any]:
    """config.json of an export directory.

    Raises:
        UserError: Missing, unreadable, or without the ``pretrain`` section.
    """
    path = export_dir / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise UserError(f"{export_dir}: not an export directory (no {CONFIG_FILE})") from error
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON: {error}") from error
    if not isinstance(config, dict) or "model_config" not in (config.get("pretrain") or {}):
        raise UserError(f"{path}: no pretrain.model_config section (not written by `pretrain export`)")
    return config


def load_export(export_dir: Path | str) -> tuple[BertConfig, dict[str, torch.Tensor], Path]:
    """Read an export directory back: (model config, fp32 state_dict with tied aliases, spm.model path).

    Raises:
        UserError: Not an export directory, or weights that do not fit its config.
    """
    export_dir = Path(export_dir)
    config = read_export_config(export_dir)
    model_config = model_config_from_dict(config["pretrain"]["model_config"], str(export_dir / CONFIG_FILE))
    weights = export_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"{export_dir}: no {WEIGHTS_FILE}")
    state_dict: dict[str, torch.Tensor] = {}
    with safe_open(str(weights), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            tensor = handle.get_tensor(name)
            state_dict[name] = tensor.float() if tensor.is_floating_point() else tensor
    state_dict = retie(state_dict)
    check_state_dict(state_dict, model_config, str(weights), task_heads=True)
    spm_model_path = export_dir / TOKENIZER_MODEL_FILE
    if not spm_model_path.is_file():
        raise UserError(f"{export_dir}: no {TOKENIZER_MODEL_FILE}")
    return model_config, state_dict, spm_model_path


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
