"""Pre-training objectives: a plain registry from an objective name to the builder of its parts.

A builder takes an :class:`~training.objectives.base.ObjectiveContext` and returns an
:class:`~training.objectives.base.Objective`: the loader, the model, an optional client optimizer, the
per-micro-batch forward, the step metrics and the evaluation. The trainer (:mod:`training.trainer`) is
the same for all of them: engine, checkpoints, resume, stop signals, traces and metrics.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from data_pipeline.errors import UserError
from data_pipeline.shard_format import FORMAT_NAME, IMAGE_FORMAT_NAME, MANIFEST_NAME
from training.objectives.base import MicroStep, Objective, ObjectiveContext
from training.objectives.bert import build_bert
from training.objectives.simclr import build_simclr
from training.shards import join_location, open_binary

ObjectiveBuilder = Callable[[ObjectiveContext], Objective]

OBJECTIVES: dict[str, ObjectiveBuilder] = {}
DATA_FORMATS: dict[str, str] = {}
"""Objective name -> the manifest format of the shards it trains on."""


def register_objective(name: str, builder: ObjectiveBuilder, data_format: str) -> None:
    """Add an objective; a name registered twice is a programming error (ValueError)."""
    if name in OBJECTIVES:
        raise ValueError(f"objective {name!r} registered twice")
    OBJECTIVES[name] = builder
    DATA_FORMATS[name] = data_format


def manifest_format(data_dir: str) -> object:
    """The ``format`` field of a data directory's manifest (None when it cannot be read: the loader says why)."""
    try:
        with open_binary(join_location(str(data_dir), MANIFEST_NAME)) as stream:
            manifest = json.loads(stream.read().decode("utf-8"))
    except (OSError, ValueError):
        return None
    return manifest.get("format") if isinstance(manifest, dict) else None


def build_objective(name: str, context: ObjectiveContext) -> Objective:
    """Build the parts of objective ``name`` after checking that the data is the kind it trains on.

    Raises:
        UserError: An unknown objective, or shards of another kind (text shards for simclr, images for bert).
    """
    if name not in OBJECTIVES:
        raise UserError(f"unknown objective {name!r}; registered: {', '.join(sorted(OBJECTIVES))}")
    found = manifest_format(context.data_dir)
    if found is not None and found != DATA_FORMATS[name]:
        hint = "a simclr: section" if found == IMAGE_FORMAT_NAME else "no simclr: section"
        raise UserError(
            f"--data {context.data_dir}: manifest format {found!r}, but the config's objective {name!r} "
            f"trains on {DATA_FORMATS[name]!r} shards (a config for this data has {hint})"
        )
    return OBJECTIVES[name](context)


register_objective("bert", build_bert, FORMAT_NAME)
register_objective("simclr", build_simclr, IMAGE_FORMAT_NAME)

__all__ = [
    "OBJECTIVES",
    "MicroStep",
    "Objective",
    "ObjectiveContext",
    "build_objective",
    "register_objective",
]
