"""Pre-training methods: a plain registry from a method name (``bert``, ``simclr``) to its builder.

A builder takes a :class:`~training.methods.base.MethodContext` and returns a
:class:`~training.methods.base.Method`: the loader, the model, an optional client optimizer, the
per-micro-batch forward, the step metrics and the evaluation. The trainer (:mod:`training.trainer`) is
the same for all of them: engine, checkpoints, resume, stop signals, traces and metrics.
"""

from __future__ import annotations

from collections.abc import Callable

from data_pipeline.errors import UserError
from data_pipeline.formats.manifest import FORMAT_NAME, IMAGE_FORMAT_NAME, read_manifest
from training.methods.base import Method, MethodContext, MicroStep
from training.methods.bert import build_bert
from training.methods.simclr import build_simclr

MethodBuilder = Callable[[MethodContext], Method]

METHODS: dict[str, MethodBuilder] = {}
DATA_FORMATS: dict[str, str] = {}
"""Method name -> the manifest format of the shards it trains on."""


def register_method(name: str, builder: MethodBuilder, data_format: str) -> None:
    """Add a method; a name registered twice is a programming error (ValueError)."""
    if name in METHODS:
        raise ValueError(f"method {name!r} registered twice")
    METHODS[name] = builder
    DATA_FORMATS[name] = data_format


def build_method(name: str, context: MethodContext) -> Method:
    """Build the parts of method ``name`` after checking that the data is the kind it trains on.

    Raises:
        UserError: An unknown method, or shards of another kind (text shards for simclr, images for bert).
        ManifestError: The data directory has no readable manifest of a known format.
    """
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; registered: {', '.join(sorted(METHODS))}")
    found = read_manifest(context.data_dir, expected_format=None)["format"]
    if found != DATA_FORMATS[name]:
        hint = "a simclr: section" if found == IMAGE_FORMAT_NAME else "no simclr: section"
        raise UserError(
            f"--data {context.data_dir}: manifest format {found!r}, but the config's objective {name!r} "
            f"trains on {DATA_FORMATS[name]!r} shards (a config for this data has {hint})"
        )
    return METHODS[name](context)


register_method("bert", build_bert, FORMAT_NAME)
register_method("simclr", build_simclr, IMAGE_FORMAT_NAME)

__all__ = [
    "METHODS",
    "Method",
    "MethodContext",
    "MicroStep",
    "build_method",
    "register_method",
]
