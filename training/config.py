"""Typed training configuration: YAML sections map one-to-one onto dataclasses; ``--set`` overrides win.

Precedence is ``--set key=value`` > the YAML file > the dataclass defaults. The ``deepspeed:`` section is
kept as the literal DeepSpeed config dictionary (users already know that schema); only the values the
trainer derives from it (gradient accumulation, the scheduler length) are filled in or checked here.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from data_pipeline.errors import UserError
from training.simclr import SimCLRConfig


@dataclass
class ModelConfig:
    """The BERT architecture; the vocabulary size comes from the data manifest (unused by simclr runs)."""

    size: str = "tiny"
    """Named size (tiny, mini, small, medium, base, large) that sets the dimensions below."""
    hidden_size: int | None = None
    """Override of the size's hidden width. Defaults to the size's value."""
    num_hidden_layers: int | None = None
    """Override of the size's number of encoder layers. Defaults to the size's value."""
    num_attention_heads: int | None = None
    """Override of the size's number of attention heads. Defaults to the size's value."""
    intermediate_size: int | None = None
    """Override of the size's feed-forward width. Defaults to the size's value."""
    dropout: float = 0.1
    """Dropout probability of hidden states and attention probabilities."""
    pre_layernorm: bool = False
    """LayerNorm before each sub-layer (stabler for deep models; not loadable by HF BERT)."""
    activation_checkpointing: bool = False
    """Recompute each encoder layer in the backward pass to save activation memory."""
    next_sentence_head: bool | str = "auto"
    """Train the NSP/SOP head: true, false, or ``auto`` (on unless the manifest objective is ``none``)."""


@dataclass
class SourceConfig:
    """One data set of a weighted mixture: an item of ``data.sources``."""

    path: str | None = None
    """Prepared shard directory (or URL) holding manifest.json, relative to the working directory.
    Required."""
    weight: float | None = None
    """Share of every global batch drawn from this source, relative to the other weights (> 0). Required."""


@dataclass
class DataConfig:
    """Dynamic masking and loading of the prepared shards."""

    mask_prob: float = 0.15
    """Share of content tokens chosen for the MLM objective in each sequence."""
    whole_word_mask: bool = True
    """Mask whole words (all pieces of a word together) rather than single pieces."""
    num_workers: int = 2
    """DataLoader worker processes per rank that read, frame and mask batches."""
    sources: list[SourceConfig] = field(default_factory=list)
    """A weighted mixture of at least two prepared data sets (then ``--data`` is left out). Defaults to
    none: the run reads the one data set ``--data`` names."""


@dataclass
class TrainConfig:
    """The length of the run and its periodic actions, counted in optimizer steps."""

    total_steps: int = 600
    """Length of the LR schedule; the run ends here unless ``--max-steps`` stops it earlier."""
    seed: int = 1234
    """Seed of the model initialisation, dropout and the data order."""
    log_every: int = 10
    """Write metrics every this many steps."""
    save_every: int = 200
    """Save a checkpoint every this many steps (and always at the end)."""
    keep_last: int = 3
    """Number of complete checkpoints kept; older ones are deleted."""
    val_every: int = 200
    """Run validation every this many steps (0 turns validation off)."""
    val_batches: int = 20
    """Validation micro-batches per rank at each validation."""
    collective_timeout_s: float = 600.0
    """Seconds a rank waits in a collective (all-reduce, barrier) for the others before the run fails,
    naming the rank that stopped answering. Defaults to 600 (10 minutes)."""


@dataclass
class Config:
    """The whole training configuration, one attribute per YAML section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model architecture."""
    data: DataConfig = field(default_factory=DataConfig)
    """Masking and loading."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Run length, logging, checkpoints and validation."""
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """The literal DeepSpeed config (train_batch_size is the global batch)."""
    simclr: SimCLRConfig | None = None
    """SimCLR's model, augmentation and LARS settings; its presence makes the objective ``simclr``."""


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
OPTIONAL_SECTIONS: dict[str, type] = {"simclr": SimCLRConfig}
"""Sections that select an objective other than BERT's when present (and not null)."""


def method_of(config: Config) -> str:
    """The pre-training method a config selects: ``simclr`` with a ``simclr:`` section, else ``bert``."""
    return "simclr" if config.simclr is not None else "bert"


def _type_name(expected: Any) -> str:
    if isinstance(expected, type):
        return expected.__name__
    return " or ".join(_type_name(arg) for arg in typing.get_args(expected))


def _matches(value: Any, expected: Any) -> bool:
    """Whether a YAML value fits a field type (int is a float; bool is not an int)."""
    origin = typing.get_origin(expected)
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def build_section(name: str, cls: type, raw: Any) -> Any:
    """One dataclass section from its YAML mapping (None: all defaults).

    Args:
        name: The section's key, the start of every key path in messages.
        cls: The section's dataclass.
        raw: Its YAML value.

    Raises:
        UserError: Not a mapping, an unknown key, or a value of the wrong type, naming the key path.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{name}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {item.name for item in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise UserError(f"{name}.{key}: unknown key (known: {', '.join(sorted(known))})")
        item_class = _list_item_section(hints[key])
        if item_class is not None:
            values[key] = build_list(f"{name}.{key}", item_class, value)
            continue
        if not _matches(value, hints[key]):
            raise UserError(f"{name}.{key}: expected {_type_name(hints[key])}, got {value!r}")
        values[key] = float(value) if hints[key] is float else value
    return cls(**values)


def _list_item_section(expected: Any) -> type | None:
    """The dataclass of a ``list[Section]`` field, else None."""
    if typing.get_origin(expected) is list:
        (item,) = typing.get_args(expected)
        if dataclasses.is_dataclass(item):
            return item
    return None


def build_list(name: str, cls: type, raw: Any) -> list[Any]:
    """A list of dataclass sections from a YAML list (None: empty); items are named ``name[i]`` in messages.

    Raises:
        UserError: Not a list, or an item that :func:`build_section` refuses.
    """
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise UserError(f"{name}: expected a list, got {raw!r}")
    return [build_section(f"{name}[{index}]", cls, item) for index, item in enumerate(raw)]


def _parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as a YAML scalar)."""
    path, sep, text = item.partition("=")
    keys = path.strip().split(".")
    if not sep or not all(keys):
        raise UserError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. train.total_steps=100")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as error:
        raise UserError(f"--set {item!r}: value is not a YAML scalar: {error}") from error
    return keys, value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of the raw YAML mapping with each ``--set key.path=value`` applied in order.

    Args:
        raw: The mapping read from the config file.
        overrides: Items like ``deepspeed.zero_optimization.stage=3``; intermediate mappings are created.
    """
    merged = copy.deepcopy(raw)
    for item in overrides:
        keys, value = _parse_override(item)
        node = merged
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise UserError(f"--set {item!r}: {'.'.join(keys[: depth + 1])} is {child!r}, not a mapping")
            node = child
        node[keys[-1]] = value
    return merged


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and type-check a :class:`Config` from a (merged) YAML mapping."""
    unknown = sorted(set(raw) - set(SECTIONS) - set(OPTIONAL_SECTIONS) - {"deepspeed"})
    if unknown:
        known = ", ".join([*SECTIONS, *OPTIONAL_SECTIONS])
        raise UserError(f"{unknown[0]}: unknown section (known: deepspeed, {known})")
    sections = {name: build_section(name, cls, raw.get(name)) for name, cls in SECTIONS.items()}
    # A null optional section (as config.yaml of a BERT run writes it) is an absent one.
    for name, cls in OPTIONAL_SECTIONS.items():
        if raw.get(name) is not None:
            sections[name] = build_section(name, cls, raw[name])
    config = Config(deepspeed=deepspeed_section(raw), **sections)
    _check_values(config)
    return config


def _check_values(config: Config) -> None:
    head = config.model.next_sentence_head
    if isinstance(head, str) and head != "auto":
        raise UserError(f"model.next_sentence_head: expected true, false or 'auto', got {head!r}")
    if not 0.0 < config.data.mask_prob < 1.0:
        raise UserError(f"data.mask_prob: expected a value in (0, 1), got {config.data.mask_prob}")
    for key in ("total_steps", "log_every", "save_every", "keep_last"):
        if getattr(config.train, key) < 1:
            raise UserError(f"train.{key}: expected a positive int, got {getattr(config.train, key)}")
    for key in ("val_every", "val_batches"):
        if getattr(config.train, key) < 0:
            raise UserError(f"train.{key}: expected an int >= 0, got {getattr(config.train, key)}")
    _check_sources(config.data.sources)
    timeout = config.train.collective_timeout_s
    if not 0 < timeout < float("inf"):  # NaN too
        raise UserError(f"train.collective_timeout_s: expected seconds > 0, got {timeout}")
    if config.simclr is not None:
        config.simclr.validate()


def _check_sources(sources: list[SourceConfig]) -> None:
    """A mixture names at least two sources, each with a path and a weight > 0."""
    if len(sources) == 1:
        raise UserError(
            "data.sources: a mixture needs at least 2 sources, got 1 (use --data for one data set)"
        )
    for index, source in enumerate(sources):
        key = f"data.sources[{index}]"
        if not source.path:
            raise UserError(f"{key}.path: required (a prepared data directory), got {source.path!r}")
        weight = source.weight
        if weight is None or not 0 < weight < float("inf"):  # NaN too
            raise UserError(f"{key}.weight: expected a number > 0, got {weight!r}")


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config file and apply ``--set`` overrides (precedence: overrides > file > defaults).

    Args:
        path: The YAML file.
        overrides: ``key.path=value`` items. Defaults to none.

    Raises:
        UserError: The file is missing or not YAML, a key is unknown or a value has the wrong type.
    """
    return config_from_dict(apply_overrides(read_config_file(path), overrides))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping of sections in a YAML config file (an empty file is an empty mapping).

    Raises:
        UserError: The file cannot be read, is not YAML, or holds something other than a mapping.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise UserError(f"config {path}: cannot read: {error.strerror or error}") from error
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise UserError(f"config {path}: not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise UserError(f"config {path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def deepspeed_section(raw: dict[str, Any]) -> dict[str, Any]:
    """A copy of the literal ``deepspeed:`` section of a config mapping (absent or null: empty).

    Raises:
        UserError: The section is not a mapping.
    """
    deepspeed = raw.get("deepspeed") or {}
    if not isinstance(deepspeed, dict):
        raise UserError(f"deepspeed: expected a mapping, got {deepspeed!r}")
    return copy.deepcopy(deepspeed)


def config_to_dict(config: Config) -> dict[str, Any]:
    """The config as plain YAML-able data (what is printed at start and saved as RUN_DIR/config.yaml).

    Absent optional sections are left out, so a BERT config reads (and hashes) as it did before they existed.
    """
    data = dataclasses.asdict(config)
    if not data["data"]["sources"]:
        del data["data"]["sources"]  # a one-data-set config reads (and hashes) as before mixtures
    return {key: value for key, value in data.items() if key not in OPTIONAL_SECTIONS or value is not None}


def config_yaml(config: Config) -> str:
    """The config as YAML text, sections in a fixed order."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False)


def config_hash(config: Config) -> str:
    """Short sha256 of the resolved config, recorded in checkpoints to tell runs apart."""
    text = json.dumps(config_to_dict(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
