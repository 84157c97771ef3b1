"""Initial BERT weights for ``pretrain train --init-from PATH``: read, checked against the run, loaded.

PATH is a run directory (its newest complete checkpoint, consolidated from any ZeRO stage), a ``pretrain
export`` directory (native or hf), or a HuggingFace ``BertForPreTraining``/``BertForMaskedLM`` directory
written by ``save_pretrained`` (safetensors). Only the weights are taken: the optimizer, the schedule, the
data position and the step start fresh. The weights go into the plain model before the engine wraps it,
so every ZeRO stage works.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data_pipeline.errors import UserError
from data_pipeline.formats.location import file_sha256
from training.config import ModelConfig
from training.export.bert import (
    TIED_ALIASES,
    TOKENIZER_MODEL_FILE,
    check_state_dict,
    model_config_from_dict,
    retie,
    untie,
)
from training.export.bert_read import consolidate_run_weights, read_export_weights, run_checkpoint_state
from training.export.files import CONFIG_FILE, WEIGHTS_FILE
from training.models.bert import BertForPreTraining
from training.models.bert_config import BertConfig

HF_ARCHITECTURES = ("BertForPreTraining", "BertForMaskedLM")
"""The transformers classes whose ``save_pretrained`` directories --init-from reads."""
HF_INDEX_FILE = "model.safetensors.index.json"
SENTENCE_HEAD_PREFIXES = ("bert.pooler.", "cls.seq_relationship.")
"""Parameters of the next-sentence (NSP/SOP) head, which ``BertForMaskedLM`` lacks."""
ARCHITECTURE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
"""``model:`` keys that may be set in the config; with --init-from they must agree with PATH."""
# transformers' BERT config fields that become ours unchanged (the dropouts come from the run's config).
HF_FIELDS = (
    "vocab_size",
    *ARCHITECTURE_FIELDS,
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "initializer_range",
    "hidden_act",
    "pad_token_id",
)


@dataclass(frozen=True)
class DataFacts:
    """What the training data says about the model it needs (from its manifest)."""

    data_dir: str
    vocab_size: int
    tokenizer_sha256: str | None
    seq_len: int
    pad_token_id: int | None


@dataclass
class InitialWeights:
    """Weights read from PATH, with the architecture they fit and what is known of their tokenizer."""

    path: str
    """PATH as given, for messages."""
    kind: str
    """``run`` (a checkpoint), ``export`` or ``hf``."""
    model_config: BertConfig
    """The architecture of the weights (``next_sentence_head`` says whether they hold that head)."""
    state_dict: dict[str, torch.Tensor]
    """fp32 weights with HF ``BertForPreTraining`` names, tied aliases included."""
    tokenizer_sha256: str | None
    """sha256 of the tokenizer they were trained with, when PATH records it (runs and exports)."""
    source: str
    """What exactly was read (the checkpoint tag folder, the weights file)."""
    notes: list[str] = field(default_factory=list)
    """Caveats to print (a checkpoint with 16-bit weights only)."""


Precheck = Callable[[BertConfig, str | None], None]
"""Called with PATH's architecture and tokenizer sha256 before its weights are read; raises to refuse."""


def _accept(model_config: BertConfig, tokenizer_sha256: str | None) -> None:
    """The precheck that refuses nothing."""


def read_initial_weights(path: str, precheck: Precheck = _accept) -> InitialWeights:
    """Read PATH as a run directory, a ``pretrain export`` directory or a HuggingFace BERT directory.

    Args:
        path: --init-from PATH.
        precheck: Sees the architecture and tokenizer sha256 first, so that a mismatch is refused before
            a long consolidation. Defaults to accepting everything.

    Raises:
        UserError: PATH is none of these, its weights are damaged or do not fit its config, or as
            ``precheck``.
    """
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"--init-from {path}: no such directory")
    if (root / "checkpoints").is_dir():
        return _from_run(path, root, precheck)
    config_path = root / CONFIG_FILE
    if config_path.is_file():
        config = _read_json(config_path)
        read = _from_export if "pretrain" in config else _from_hf
        return read(path, root, config, precheck)
    raise UserError(
        f"--init-from {path}: neither a run directory (checkpoints/), a `pretrain export` directory nor a "
        f"HuggingFace model directory ({CONFIG_FILE})"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"--init-from {path}: not readable JSON: {error}") from error
    if not isinstance(value, dict):
        raise UserError(f"--init-from {path}: expected a JSON object, got {type(value).__name__}")
    return value


def _from_run(path: str, root: Path, precheck: Precheck) -> InitialWeights:
    """The newest complete, sound checkpoint of a BERT run (damaged ones passed over, as export does)."""
    tag_dir, state, model_config = run_checkpoint_state(root)
    sha256 = state.get("tokenizer_sha256")
    precheck(model_config, sha256)
    state_dict, notes = consolidate_run_weights(tag_dir, state, model_config)
    return InitialWeights(path, "run", model_config, state_dict, sha256, str(tag_dir), notes)


def _from_export(path: str, root: Path, config: dict[str, Any], precheck: Precheck) -> InitialWeights:
    """A ``pretrain export`` directory; its tokenizer sha256 from config.json, else from its spm.model."""
    sha256 = ((config.get("pretrain") or {}).get("tokenizer") or {}).get("sha256")
    if sha256 is None and (root / TOKENIZER_MODEL_FILE).is_file():
        sha256 = file_sha256(str(root / TOKENIZER_MODEL_FILE))
    saved = (config.get("pretrain") or {}).get("model_config")
    if isinstance(saved, dict):
        precheck(model_config_from_dict(saved, str(root / CONFIG_FILE)), sha256)
    model_config, state_dict = read_export_weights(root)
    # A fine-tuned export holds the encoder without the MLM head: not weights to pre-train from.
    if "cls.predictions.bias" not in state_dict:
        raise UserError(
            f"--init-from {path}: the export has no MLM head (cls.predictions.*); a fine-tuned model?"
        )
    state_dict = {name: tensor for name, tensor in state_dict.items() if name.startswith(("bert.", "cls."))}
    return InitialWeights(path, "export", model_config, state_dict, sha256, str(root / WEIGHTS_FILE))


def hf_model_config(config: dict[str, Any], source: str) -> BertConfig:
    """Our ``BertConfig`` from a transformers BERT ``config.json`` (the sentence head decided later).

    Raises:
        UserError: Not a BERT config, an architecture other than :data:`HF_ARCHITECTURES`, relative
            position embeddings, or a field of the wrong kind, naming ``source`` and the value.
    """
    if config.get("model_type") != "bert":
        raise UserError(
            f"{source}: model_type {config.get('model_type')!r}; --init-from reads BERT models only"
        )
    architectures = config.get("architectures") or []
    if architectures and not set(architectures) & set(HF_ARCHITECTURES):
        raise UserError(
            f"{source}: architectures {architectures}; --init-from needs one of "
            f"{', '.join(HF_ARCHITECTURES)} (a model with its masked-LM head)"
        )
    position_type = config.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise UserError(f"{source}: position_embedding_type {position_type!r}; only 'absolute' is supported")
    values = {key: config[key] for key in HF_FIELDS if config.get(key) is not None}
    try:
        return BertConfig(**values)
    except TypeError as error:
        raise UserError(f"{source}: not a BERT config: {error}") from error


def _hf_weight_files(root: Path) -> list[Path]:
    """The safetensors files of a ``save_pretrained`` directory (one file, or the shards of its index)."""
    if (root / WEIGHTS_FILE).is_file():
        return [root / WEIGHTS_FILE]
    if (root / HF_INDEX_FILE).is_file():
        weight_map = _read_json(root / HF_INDEX_FILE).get("weight_map") or {}
        return [root / name for name in sorted(set(weight_map.values()))]
    pickles = sorted(path.name for path in root.glob("*.bin"))
    hint = (
        f"; it holds {', '.join(pickles)} (pickles, which are not loaded): re-save it with "
        "save_pretrained(DIR, safe_serialization=True)"
        if pickles
        else ""
    )
    raise UserError(f"--init-from {root}: no {WEIGHTS_FILE} or {HF_INDEX_FILE}{hint}")


def _hf_name(name: str) -> str:
    """Older checkpoints call LayerNorm parameters gamma/beta; transformers renames them on load too."""
    if name.endswith(".gamma"):
        return name[: -len(".gamma")] + ".weight"
    if name.endswith(".beta"):
        return name[: -len(".beta")] + ".bias"
    return name


def read_hf_weights(root: Path) -> dict[str, torch.Tensor]:
    """A HuggingFace BERT directory's tensors in fp32, under ``BertForPreTraining`` names, with tied aliases.

    The position-id buffer some versions save is left out; an untied decoder that differs from the word
    embeddings is refused (this model ties them).
    """
    from safetensors import safe_open

    weights: dict[str, torch.Tensor] = {}
    for path in _hf_weight_files(root):
        if not path.is_file():
            raise UserError(f"--init-from {root}: {path.name}, listed in {HF_INDEX_FILE}, is missing")
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                if name.endswith("position_ids"):
                    continue
                tensor = handle.get_tensor(name)
                weights[_hf_name(name)] = tensor.float() if tensor.is_floating_point() else tensor
    try:
        return retie(untie(weights))
    except UserError as error:
        raise UserError(f"--init-from {root}: {error}") from error


def _from_hf(path: str, root: Path, config: dict[str, Any], precheck: Precheck) -> InitialWeights:
    """A transformers ``save_pretrained`` directory of ``BertForPreTraining`` or ``BertForMaskedLM``."""
    source = str(root / CONFIG_FILE)
    model_config = hf_model_config(config, source)
    precheck(model_config, None)
    state_dict = read_hf_weights(root)
    has_head = any(name.startswith(SENTENCE_HEAD_PREFIXES[1]) for name in state_dict)
    model_config = dataclasses.replace(model_config, next_sentence_head=has_head)
    check_state_dict(state_dict, model_config, f"--init-from {root}")
    return InitialWeights(path, "hf", model_config, state_dict, None, str(root))


def check_tokenizer(path: str, loaded: BertConfig, tokenizer_sha256: str | None, data: DataFacts) -> None:
    """Refuse weights trained with another tokenizer than the shards': vocabulary size, then sha256 if known.

    Raises:
        UserError: Naming PATH, --data and both values.
    """
    if loaded.vocab_size != data.vocab_size:
        raise UserError(
            f"--init-from {path}: the weights have a vocabulary of {loaded.vocab_size} ids, but --data "
            f"{data.data_dir} was tokenized with tokenizer.vocab_size {data.vocab_size}; prepare the data "
            "with the tokenizer of the weights"
        )
    if tokenizer_sha256 and data.tokenizer_sha256 and tokenizer_sha256 != data.tokenizer_sha256:
        raise UserError(
            f"--init-from {path}: trained with the tokenizer of sha256 {tokenizer_sha256}, but --data "
            f"{data.data_dir} was tokenized with sha256 {data.tokenizer_sha256}; prepare the data with the "
            "tokenizer of the weights"
        )


def run_architecture(
    path: str, loaded: BertConfig, section: ModelConfig, data: DataFacts, next_sentence_head: bool
) -> BertConfig:
    """The run's architecture: PATH's, with the config's dropout and activation checkpointing.

    ``model.size`` is ignored; a dimension the config sets explicitly must agree with PATH's. The
    position table grows to ``seq_len`` when PATH's is shorter; the sentence head follows the data.

    Raises:
        UserError: A ``model.`` value that contradicts PATH, naming the key and both values.
    """
    for key in ARCHITECTURE_FIELDS:
        wanted = getattr(section, key)
        if wanted is not None and wanted != getattr(loaded, key):
            raise UserError(
                f"--init-from {path}: the weights have {key} {getattr(loaded, key)}, but the config "
                f"sets model.{key}={wanted}; the architecture comes from --init-from, so drop the setting"
            )
    if section.pre_layernorm != loaded.pre_layernorm:
        raise UserError(
            f"--init-from {path}: the weights have pre_layernorm {loaded.pre_layernorm}, but the "
            f"config sets model.pre_layernorm={section.pre_layernorm}"
        )
    return dataclasses.replace(
        loaded,
        max_position_embeddings=max(loaded.max_position_embeddings, data.seq_len),
        hidden_dropout_prob=section.dropout,
        attention_probs_dropout_prob=section.dropout,
        activation_checkpointing=section.activation_checkpointing,
        next_sentence_head=next_sentence_head,
        pad_token_id=loaded.pad_token_id if data.pad_token_id is None else data.pad_token_id,
    )


def extend_positions(table: torch.Tensor, rows: int) -> torch.Tensor:
    """A position table of ``rows`` rows: the learned rows kept, row ``i`` past them a copy of row
    ``i mod learned`` (Longformer's initialisation: the learned table repeated).

    Args:
        table: (learned, hidden) position embeddings.
        rows: Rows wanted; not fewer than ``learned``.
    """
    learned = table.shape[0]
    if rows < learned:
        raise ValueError(f"cannot shrink a position table of {learned} rows to {rows}")
    return table[torch.arange(rows) % learned].clone()  # (rows, hidden)


def fit_to_model(
    weights: InitialWeights, model: BertForPreTraining
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """PATH's weights shaped for ``model``: positions extended, the sentence head added fresh or left out.

    Returns:
        A state_dict that ``model.load_state_dict(strict=True)`` accepts, and one line per change made.
    """
    target, lines = model.config, []
    state = {name: tensor for name, tensor in weights.state_dict.items() if name not in TIED_ALIASES}
    positions = "bert.embeddings.position_embeddings.weight"
    learned = state[positions].shape[0]
    if target.max_position_embeddings > learned:
        state[positions] = extend_positions(state[positions], target.max_position_embeddings)
        lines.append(
            f"position embeddings extended from {learned} to {target.max_position_embeddings} rows for the "
            f"data's seq_len: row i >= {learned} starts as a copy of learned row i mod {learned} "
            "(as Longformer)"
        )
    head = [name for name in model.state_dict() if name.startswith(SENTENCE_HEAD_PREFIXES)]
    if target.next_sentence_head and not weights.model_config.next_sentence_head:
        fresh = model.state_dict()
        state.update({name: fresh[name] for name in head})
        lines.append(
            f"{weights.path} has no next-sentence head (pooler and classifier): initialised fresh "
            f"(normal, std {target.initializer_range})"
        )
    elif weights.model_config.next_sentence_head and not target.next_sentence_head:
        state = {name: value for name, value in state.items() if not name.startswith(SENTENCE_HEAD_PREFIXES)}
        lines.append(f"the next-sentence head of {weights.path} is not used: this run trains masked LM only")
    return retie(state), lines


def initial_model(
    path: str,
    section: ModelConfig,
    data: DataFacts,
    next_sentence_head: bool,
    is_main: bool,
) -> BertForPreTraining:
    """``BertForPreTraining`` with PATH's architecture and weights, ready for the engine (on the CPU).

    Args:
        path: --init-from PATH.
        section: The config's ``model:`` section.
        data: What the shards say: directory, vocabulary, tokenizer sha256, seq_len, [PAD] id.
        next_sentence_head: Whether the run trains the sentence head (from the data's objective).
        is_main: Print what was loaded (rank 0 only).

    Raises:
        UserError: As :func:`read_initial_weights`, :func:`check_tokenizer` and :func:`run_architecture`
            (both checked before the weights are read).
    """

    def precheck(loaded: BertConfig, tokenizer_sha256: str | None) -> None:
        check_tokenizer(path, loaded, tokenizer_sha256, data)
        run_architecture(path, loaded, section, data, next_sentence_head)

    weights = read_initial_weights(path, precheck)
    architecture = run_architecture(path, weights.model_config, section, data, next_sentence_head)
    model = BertForPreTraining(architecture)
    state, lines = fit_to_model(weights, model)
    model.load_state_dict(state, strict=True)
    if is_main:
        config = weights.model_config
        print(
            f"initial weights from {weights.source} ({weights.kind}): {config.num_hidden_layers} layers, "
            f"hidden {config.hidden_size}, {config.num_attention_heads} heads, feed-forward "
            f"{config.intermediate_size}, vocabulary {config.vocab_size}, {config.max_position_embeddings} "
            "positions (model.size is not used); optimizer, schedule, data position and step start fresh",
            flush=True,
        )
        for line in [*weights.notes, *lines]:
            print(line, flush=True)
    return model
