"""Input expansion: local paths, directories, globs and any Beam-filesystem URL -> a sorted file list."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass

from apache_beam.io.filesystems import FileSystems

from data_pipeline.errors import UserError

GLOB_CHARACTERS = "*?["


@dataclass(frozen=True, order=True)
class InputFile:
    """One file to read, as its filesystem names it, and its stored (possibly compressed) size."""

    path: str
    size_bytes: int


def is_hidden(path: str) -> bool:
    """Files a directory listing skips: dot files and markers such as ``_SUCCESS``."""
    name = posixpath.basename(path.rstrip("/"))
    return name.startswith((".", "_"))


def _pattern_for(pattern: str) -> tuple[str, bool]:
    """The glob to match for ``pattern`` and whether it stood for a whole local directory."""
    if os.path.isdir(pattern):
        return os.path.join(pattern, "**"), True
    return pattern, False


def expand_pattern(pattern: str) -> list[InputFile]:
    """The files one INPUT argument names; a :class:`UserError` when it names none.

    Args:
        pattern: A file path, a local directory (read recursively, hidden files skipped), a glob
            (``data/*.jsonl.gz``) or a URL of any filesystem Beam has installed (``gs://b/x/*``).
    """
    glob, whole_directory = _pattern_for(pattern)
    try:
        results = FileSystems.match([glob])
    except ValueError as error:  # no filesystem for the scheme
        raise UserError(f"input {pattern}: {error}") from error
    except Exception as error:
        raise UserError(f"input {pattern}: cannot list it: {error}") from error
    files = [
        InputFile(metadata.path, int(metadata.size_in_bytes))
        for metadata in results[0].metadata_list
        if not (whole_directory and is_hidden(metadata.path))
    ]
    files = [f for f in files if not os.path.isdir(f.path)]
    if not files:
        what = "matches no file" if any(c in pattern for c in GLOB_CHARACTERS) else "no such file"
        raise UserError(f"input {pattern}: {what}")
    return files


def expand_inputs(patterns: Sequence[str]) -> list[InputFile]:
    """All files named by ``patterns``, each once, sorted by path (the order every run sees)."""
    if not patterns:
        raise UserError("no INPUT given")
    found: dict[str, InputFile] = {}
    for pattern in patterns:
        for input_file in expand_pattern(pattern):
            found[input_file.path] = input_file
    return sorted(found.values())
