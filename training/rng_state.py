"""A rank's random generator states in a checkpoint: Python, numpy and torch, as JSON (no pickle).

``rng_state_rankNNNNN.json`` holds Python's and numpy's Mersenne Twister states as numbers and torch's
byte states in base64. Checkpoints written before it hold a pickled ``rng_state_rankNNNNN.pt``; it is
still read, through ``torch.load(weights_only=True)`` (tensors and numpy arrays only).
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.errors import UserError
from training import checkpoint_files
from training.checkpoint import write_atomic


def rng_path(tag_dir: Path, rank: int) -> Path:
    """Where rank ``rank`` keeps its random number generator states in a tag folder (JSON, no pickle)."""
    return tag_dir / f"rng_state_rank{rank:05d}.json"


def legacy_rng_path(tag_dir: Path, rank: int) -> Path:
    """The pickled RNG file of checkpoints written before the JSON one (read, never written)."""
    return tag_dir / f"rng_state_rank{rank:05d}.pt"


def capture_rng() -> dict[str, Any]:
    """Python, numpy and torch (CPU and current CUDA device) generator states of this process."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back the generator states :func:`capture_rng` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rng_to_json(state: dict[str, Any]) -> dict[str, Any]:
    """:func:`capture_rng`'s states as plain JSON values (torch's byte states in base64)."""
    version, internal, gauss_next = state["python"]
    algorithm, keys, position, has_gauss, cached_gaussian = state["numpy"]
    plain: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "algorithm": algorithm,
            "keys": [int(key) for key in keys],
            "pos": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
    }
    for name in ("torch", "cuda"):
        if name in state:
            plain[name] = base64.b64encode(state[name].cpu().numpy().tobytes()).decode("ascii")
    return plain


def rng_from_json(plain: dict[str, Any]) -> dict[str, Any]:
    """The states :func:`rng_to_json` wrote, in the form :func:`restore_rng` takes."""
    python, numpy_state = plain["python"], plain["numpy"]
    state: dict[str, Any] = {
        "python": (python["version"], tuple(python["internal"]), python["gauss_next"]),
        "numpy": (
            numpy_state["algorithm"],
            np.array(numpy_state["keys"], dtype=np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        ),
    }
    for name in ("torch", "cuda"):
        if name in plain:
            state[name] = torch.frombuffer(bytearray(base64.b64decode(plain[name])), dtype=torch.uint8)
    return state


def save_rng(tag_dir: Path, rank: int) -> None:
    """Write this rank's generator states into the tag folder."""
    tag_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(rng_path(tag_dir, rank), json.dumps(rng_to_json(capture_rng())) + "\n")


def load_rng(tag_dir: Path, rank: int) -> bool:
    """Restore this rank's generator states from the tag folder; False when it has none for this rank.

    Raises:
        UserError: The file does not hold generator states.
    """
    path, legacy = rng_path(tag_dir, rank), legacy_rng_path(tag_dir, rank)
    try:
        if path.is_file():
            restore_rng(rng_from_json(json.loads(path.read_text(encoding="utf-8"))))
        elif legacy.is_file():
            restore_rng(checkpoint_files.load_without_code(legacy))
        else:
            return False
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        raise UserError(f"checkpoint {tag_dir}: RNG state of rank {rank} unreadable: {error}") from error
    return True
