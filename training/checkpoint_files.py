"""What a checkpoint's COMPLETE marker vouches for: each file's size and sha256, and pickles that run no code.

A commit records every file of the tag folder (name, size, sha256) in ``COMPLETE``. Before anything is
loaded, :func:`training.checkpoint.damage` compares the folder with that record (:func:`record_mismatch`),
so a truncated or altered file is found before DeepSpeed reads it. Markers written before the record
existed hold only the tag; their files are not size-checked but still scanned.

DeepSpeed stores its states with pickle and reads them back with full unpickling. :func:`unsafe_pickle`
first reads each ``.pt`` file with ``torch.load(weights_only=True)``, which builds only tensors, plain
containers and the few DeepSpeed and numpy types listed in :data:`SAFE_GLOBALS`; a file that needs anything
else (a planted ``os.system``, say) is refused before any unpickler that could run it sees it.
"""

from __future__ import annotations

import hashlib
import importlib
import pickle
import re
from pathlib import Path
from typing import Any

import torch

HASH_CHUNK_BYTES = 1 << 22
SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.UInt32DType",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
)
"""Data-only classes DeepSpeed's optimizer states and old RNG files pickle, importable by dotted name."""


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def file_records(tag_dir: Path, skip: frozenset[str]) -> dict[str, dict[str, Any]]:
    """``name -> {"size", "sha256"}`` of every file in ``tag_dir`` except ``skip`` and hidden temporaries."""
    records: dict[str, dict[str, Any]] = {}
    for path in sorted(tag_dir.iterdir()):
        if path.is_file() and path.name not in skip and not path.name.startswith("."):
            records[path.name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return records


def record_mismatch(tag_dir: Path, records: dict[str, Any]) -> str | None:
    """How the files of ``tag_dir`` differ from ``records`` (naming the first such file), or None.

    Sizes are compared first for every file (cheap: truncation is the common damage), then checksums.
    """
    for name, record in sorted(records.items()):
        path = tag_dir / name
        if Path(name).name != name or not isinstance(record, dict):
            return f"COMPLETE records an entry {name!r} that is not a file of the folder"
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != record.get("size"):
            return f"{name} has {size} bytes, COMPLETE recorded {record.get('size')}"
    for name, record in sorted(records.items()):
        if file_sha256(tag_dir / name) != record.get("sha256"):
            return f"{name} does not match the sha256 COMPLETE recorded"
    return None


def _safe_globals() -> list[Any]:
    """The objects of :data:`SAFE_GLOBALS` that this installation has (numpy and DeepSpeed versions vary)."""
    found: list[Any] = []
    for dotted in SAFE_GLOBALS:
        module_name, _, attribute = dotted.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module_name), attribute))
        except (ImportError, AttributeError):
            continue
    return found


def load_without_code(path: Path) -> Any:
    """``torch.load`` that builds only tensors, containers and :data:`SAFE_GLOBALS` (memory-mapped, on CPU).

    Raises:
        pickle.UnpicklingError: The file needs another global (its name is in the message).
        RuntimeError: Not a readable torch file (truncated, say).
    """
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def unsafe_pickle(folder: Path) -> str | None:
    """The first ``.pt`` file under ``folder`` that does not load without running code, and why; or None."""
    for path in sorted(folder.rglob("*.pt")):
        try:
            load_without_code(path)
        except pickle.UnpicklingError as error:
            needed = re.search(r"GLOBAL (\S+)", str(error))
            what = f"it needs {needed.group(1)}" if needed else "it needs objects beyond tensors"
            return f"{path.relative_to(folder)} is refused: {what}, and unpickling it could run code"
        except (RuntimeError, OSError, EOFError, ValueError) as error:
            reason = str(error).split(". ")[0]
            return f"{path.relative_to(folder)} is not a readable torch file ({reason})"
    return None
