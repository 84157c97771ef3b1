"""Model registry: a plain dict from a model name to the function that builds it."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from training.models.bert import BertForPreTraining, ModelConfigError, bert_config

ModelBuilder = Callable[..., nn.Module]
"""Builds a model from keyword arguments (for BERT: ``size``, ``vocab_size`` and config overrides)."""

MODEL_BUILDERS: dict[str, ModelBuilder] = {}


def register_model(name: str, builder: ModelBuilder) -> None:
    """Add a builder under ``name``; a name registered twice is a programming error (ValueError)."""
    if name in MODEL_BUILDERS:
        raise ValueError(f"model {name!r} registered twice")
    MODEL_BUILDERS[name] = builder


def build_model(name: str, **kwargs: object) -> nn.Module:
    """Build the model registered as ``name``.

    Raises:
        ModelConfigError: (a ``UserError`` and ``ValueError``) for an unknown name, listing the known ones.
    """
    if name not in MODEL_BUILDERS:
        raise ModelConfigError(f"unknown model {name!r}; registered: {', '.join(sorted(MODEL_BUILDERS))}")
    return MODEL_BUILDERS[name](**kwargs)


def build_bert(size: str | None, vocab_size: int, **overrides: object) -> BertForPreTraining:
    """``BertForPreTraining`` of a named size (see ``bert_config``) with field overrides."""
    return BertForPreTraining(bert_config(size, vocab_size, **overrides))


register_model("bert", build_bert)
