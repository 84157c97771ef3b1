"""The BERT export layout: tied names, config.json, the model card, and the writer.

An export directory holds ``model.safetensors`` (HuggingFace ``BertForPreTraining`` names, the tied decoder
weight and bias stored once, as transformers does), ``config.json`` (our ``BertConfig`` under ``pretrain``;
for ``hf`` also transformers' BERT fields; the tokenizer's kind and special ids under ``pretrain.tokenizer``),
the tokenizer and a model card ``README.md``. The tokenizer is ``spm.model`` for SentencePiece runs (``hf``
exports add a tokenizer.json converted from it) or, for runs on a HuggingFace tokenizer, its tokenizer.json
(and vocab.txt for WordPiece) as the run used it; ``hf`` exports add tokenizer_config.json and
special_tokens_map.json.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, fields
from functools import partial
from pathlib import Path
from typing import Any

import torch

from data_pipeline.errors import UserError
from data_pipeline.formats.text import SpecialIds
from data_pipeline.text.tokenizer_kinds import TOKENIZER_JSON, TextTokenizer, load_tokenizer, main_file
from training.dtypes import DTYPES
from training.export.files import WEIGHTS_FILE, ExportFiles, card_tables, check_dtype, publish
from training.models.bert import BertForPreTraining
from training.models.bert_config import BertConfig

TOKENIZER_MODEL_FILE = "spm.model"
# The main tokenizer file of an export, in the order looked for.
TOKENIZER_FILES = (TOKENIZER_MODEL_FILE, TOKENIZER_JSON)
FORMATS = ("native", "hf")
# Tied parameters: alias -> the name that is stored. transformers saves and loads them this way.
TIED_ALIASES = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}


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


def model_builder(model_config: BertConfig) -> partial[BertForPreTraining]:
    """A function building ``BertForPreTraining(model_config)``, the model whose checkpoint is read."""
    return partial(BertForPreTraining, model_config)


def untie(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


def _config_json(
    model_config: BertConfig,
    fmt: str,
    dtype: str,
    extra_config: dict[str, Any] | None,
    tokenizer: TextTokenizer,
) -> dict:
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
    config["pretrain"] = {
        "format": fmt,
        "dtype": dtype,
        "model_config": asdict(model_config),
        "tokenizer": {
            "kind": tokenizer.kind,
            "file": main_file(tokenizer)[0],
            "sha256": tokenizer.sha256,
            "special_ids": tokenizer.special_ids.as_tokens(),
        },
    }
    return config


def export_tokenizer_path(export_dir: Path | str) -> Path:
    """The main tokenizer file of an export directory: ``spm.model``, else ``tokenizer.json``.

    Raises:
        UserError: Neither is there, naming the directory.
    """
    for name in TOKENIZER_FILES:
        if (Path(export_dir) / name).is_file():
            return Path(export_dir) / name
    raise UserError(f"{export_dir}: no tokenizer ({' or '.join(TOKENIZER_FILES)})")


def export_special_ids(config: dict[str, Any], tokenizer: TextTokenizer) -> SpecialIds:
    """The special ids an export's config.json records (``pretrain.tokenizer.special_ids``), checked
    against its tokenizer; the tokenizer's own for exports written before they were recorded.

    Raises:
        UserError: The recorded ids differ from the tokenizer's.
    """
    recorded = ((config.get("pretrain") or {}).get("tokenizer") or {}).get("special_ids")
    if recorded is None:
        return tokenizer.special_ids
    try:
        special = SpecialIds.from_tokens(recorded, "config.json pretrain.tokenizer")
    except ValueError as error:
        raise UserError(str(error)) from error
    if special != tokenizer.special_ids:
        raise UserError(
            f"config.json pretrain.tokenizer.special_ids {special.as_tokens()} differ from the tokenizer's "
            f"{tokenizer.special_ids.as_tokens()}"
        )
    return special


def check_options(fmt: str, dtype: str, model_config: BertConfig | None = None) -> None:
    """Refuse an unknown format or dtype, and ``hf`` for a pre-LN model (when its config is given).

    Raises:
        UserError: Naming the option, its value and the choices.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    check_dtype(dtype)
    if fmt == "hf" and model_config is not None and model_config.pre_layernorm:
        raise UserError(
            "--format hf: this model uses pre_layernorm, which transformers' BERT cannot represent; "
            "export with --format native"
        )


def hf_tokenizer_problem(spm_model_path: Path) -> str | None:
    """Why no equivalent HF tokenizer.json can be built from this SentencePiece model, or None.

    None as well for a tokenizer.json: the run's own HuggingFace tokenizer is exported as it is.
    """
    if Path(spm_model_path).name.endswith(".json"):
        return None
    try:
        from training.export.hf_tokenizer import read_spm_settings, unsupported_reason

        settings = read_spm_settings(spm_model_path.read_bytes(), str(spm_model_path))
    except ImportError as error:  # the tokenizers package, or protobuf for reading the model proto
        return f"cannot build it here: {error}"
    return unsupported_reason(settings)


def write_export(
    out_dir: Path | str,
    state_dict: dict[str, torch.Tensor],
    model_config: BertConfig,
    tokenizer_path: Path | str,
    *,
    fmt: str = "native",
    dtype: str = "fp32",
    card: dict[str, Any] | None = None,
    extra_config: dict[str, Any] | None = None,
) -> None:
    """Write an export directory: model.safetensors, config.json, the tokenizer, README.md (+ HF tokenizer).

    Files are written into a temporary sibling folder and moved into ``out_dir`` when all are done, so an
    interrupted export never leaves a folder that looks complete.

    Args:
        out_dir: Destination; created, or its export files replaced.
        state_dict: Full weights with HF ``BertForPreTraining`` names (tied aliases optional); a fine-tuned
            model may leave out the ``cls.`` pre-training heads and add its own top-level task head.
        model_config: The architecture the weights belong to.
        tokenizer_path: The tokenizer the weights were trained with: a SentencePiece model, or a
            tokenizer.json (the copy in the data directory).
        fmt: ``native`` or ``hf``. Defaults to ``native``.
        dtype: ``fp32``, ``bf16`` or ``fp16``, the stored floating-point type. Defaults to ``fp32``.
        card: Facts for the model card (see :func:`card_text`). Defaults to none.
        extra_config: Keys set at the top level of config.json, after the HF fields (e.g. a fine-tuned
            model's ``architectures``, ``num_labels``, ``id2label``); ``pretrain`` is reserved.

    Raises:
        UserError: Unknown format or dtype, pre-LN with ``hf``, weights that do not fit, no tokenizer.
    """
    tokenizer_path = Path(tokenizer_path)
    check_options(fmt, dtype, model_config)
    check_state_dict(state_dict, model_config, "weights to export", task_heads=True)
    if not tokenizer_path.is_file():
        raise UserError(f"tokenizer {tokenizer_path}: no such file")
    tokenizer = load_tokenizer(str(tokenizer_path))
    config = _config_json(model_config, fmt, dtype, extra_config, tokenizer)
    card = dict(card or {})
    copies: dict[str, Path] = {}
    writers: list[Callable[[Path], None]] = []
    max_length = model_config.max_position_embeddings
    if tokenizer.kind != "sentencepiece":
        writers.append(partial(_write_trained_tokenizer, tokenizer, max_length if fmt == "hf" else None))
    else:
        copies[TOKENIZER_MODEL_FILE] = tokenizer_path
        reason = hf_tokenizer_problem(tokenizer_path) if fmt == "hf" else None
        if fmt == "hf" and reason is None:
            writers.append(partial(_write_hf_tokenizer, tokenizer_path, max_length))
        elif reason is not None:
            note = f"no HF tokenizer.json: {reason}; use {TOKENIZER_MODEL_FILE}"
            card["notes"] = [*card.get("notes", []), note]
    card["tokenizer"] = f"`{main_file(tokenizer)[0]}` ({tokenizer.kind})"
    files = ExportFiles(
        untie(state_dict), config, card_text(model_config, fmt, dtype, card), copies=copies, writers=writers
    )
    publish(out_dir, files, dtype)


def _write_hf_tokenizer(spm_model_path: Path, model_max_length: int, out_dir: Path) -> None:
    from training.export.hf_tokenizer import write_hf_tokenizer

    write_hf_tokenizer(spm_model_path, out_dir, model_max_length)


def _write_trained_tokenizer(tokenizer: TextTokenizer, model_max_length: int | None, out_dir: Path) -> None:
    from data_pipeline.text.hf_tokenizer import HFTokenizer
    from training.export.hf_tokenizer import write_trained_tokenizer

    assert isinstance(tokenizer, HFTokenizer)  # every kind but sentencepiece
    write_trained_tokenizer(tokenizer, out_dir, model_max_length)


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
            (dict: the manifest summary), ``metrics`` (dict: name -> last value), ``notes`` (list of str),
            ``tokenizer`` (str: its file and kind).
    """
    heads = "MLM + next-sentence head" if model_config.next_sentence_head else "MLM head only"
    tokenizer = card.get("tokenizer", f"`{TOKENIZER_MODEL_FILE}` (sentencepiece)")
    lines = [
        "# BERT pre-trained with `pretrain`",
        "",
        (
            f"Format `{fmt}` ({'loads with transformers.BertForPreTraining' if fmt == 'hf' else 'our layout'}), "
            f"weights stored as {dtype} in `{WEIGHTS_FILE}`, tokenizer {tokenizer}."
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
    sections = (("Training", "training"), ("Data", "data"), ("Final metrics", "metrics"))
    lines += card_tables(card, sections, _format_number)
    return "\n".join(lines) + "\n"
