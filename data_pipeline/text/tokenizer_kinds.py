"""One tokenizer protocol over SentencePiece and HuggingFace ``tokenizers``, and the one place that picks.

``pretrain prepare text --tokenizer PATH`` accepts:

- a SentencePiece ``.model`` file, or a directory holding ``spm.model`` (kind ``sentencepiece``);
- a ``tokenizer.json`` file, or a directory holding one (kind ``wordpiece``, ``bpe`` or ``unigram``,
  from its model);
- a BERT ``vocab.txt``, or a directory holding one and no tokenizer.json (kind ``wordpiece``).

A directory is searched in that order. The trainer, the exporter and fine-tuning rebuild the
tokenizer from its copy in the data directory with :func:`tokenizer_from_copy`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from data_pipeline.errors import UserError
from data_pipeline.formats.manifest import DEFAULT_TOKENIZER_KIND, TOKENIZER_KINDS
from data_pipeline.formats.text import SpecialIds

SPM_MODEL_FILE = "spm.model"
TOKENIZER_JSON = "tokenizer.json"
WORDPIECE_VOCAB = "vocab.txt"
TOKENIZER_CONFIG = "tokenizer_config.json"
# What a tokenizer directory is searched for, in order.
DIRECTORY_FILES = (SPM_MODEL_FILE, TOKENIZER_JSON, WORDPIECE_VOCAB)
WORD_MARKER = "\u2581"  # SentencePiece's word boundary "▁"

ReadFile = Callable[[str], bytes | None]
"""Reads a file by path: its bytes, or None when there is no such file."""


class TextTokenizer(Protocol):
    """What `prepare text`, the loader, the exporter and fine-tuning need of a tokenizer."""

    kind: str
    """One of ``TOKENIZER_KINDS``: ``sentencepiece``, ``wordpiece``, ``bpe`` or ``unigram``."""

    @property
    def vocab_size(self) -> int:
        """Ids in the vocabulary, specials included."""

    @property
    def special_ids(self) -> SpecialIds:
        """Ids of [PAD] [UNK] [CLS] [SEP] [MASK] (or the tokenizer's own names for them)."""

    @property
    def sha256(self) -> str:
        """Hex sha256 of the main file: what the manifest records and checkpoints compare."""

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Content ids of each text, no specials added, never truncated."""

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``."""

    def word_starts(self) -> NDArray[np.bool_]:
        """Bool over the vocabulary: True where a piece starts a word (whole-word masking)."""

    def files(self) -> dict[str, bytes]:
        """File name -> bytes to copy beside the shards; the first entry is the main file."""


def main_file(tokenizer: TextTokenizer) -> tuple[str, bytes]:
    """The name and bytes of the tokenizer's main file (the first of :meth:`TextTokenizer.files`)."""
    return next(iter(tokenizer.files().items()))


def word_start_table(
    pieces: Sequence[str],
    byte_ids: Sequence[int],
    control_ids: Sequence[int],
    *,
    word_marker: str | None = WORD_MARKER,
    continuation_prefix: str | None = None,
) -> NDArray[np.bool_]:
    """Bool over the vocabulary: True where a piece starts a word.

    Two rules: with ``continuation_prefix`` (WordPiece's ``##``) a piece starts a word unless it
    begins with the prefix; otherwise a piece starts a word when it begins with ``word_marker``
    (SentencePiece's ``▁``, byte-level BPE's ``Ġ``). With neither, every piece is its own word.

    Args:
        pieces: The piece string of every id.
        byte_ids: Ids of byte-fallback pieces (always continuations).
        control_ids: Ids of control, special and unknown pieces (always their own word).
        word_marker: The prefix of word-initial pieces. Defaults to ``▁``.
        continuation_prefix: The prefix of word-continuing pieces; takes precedence. Defaults to None.
    """
    if continuation_prefix:
        starts = (not piece.startswith(continuation_prefix) for piece in pieces)
    elif word_marker:
        starts = (piece.startswith(word_marker) for piece in pieces)
    else:
        starts = (True for _ in pieces)
    table = np.fromiter(starts, dtype=bool, count=len(pieces))
    table[list(byte_ids)] = False
    table[list(control_ids)] = True
    return table


def file_sha256(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def read_local(path: str) -> bytes | None:
    """The bytes of a local file, or None when it does not exist."""
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as handle:
        return handle.read()


def _join(directory: str, name: str) -> str:
    return directory.rstrip("/") + "/" + name


def lowercase_setting(config: bytes | None) -> bool:
    """``do_lower_case`` of a tokenizer_config.json; True (bert-base-uncased) when absent."""
    if config is None:
        return True
    try:
        return bool(json.loads(config.decode("utf-8")).get("do_lower_case", True))
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return True


def tokenizer_from_file(
    name: str, data: bytes, source: str, read_file: ReadFile = read_local
) -> TextTokenizer:
    """The tokenizer in one file, picked by its name: ``*.json``, ``*.txt`` (a WordPiece vocab), else
    SentencePiece.

    Args:
        name: The file's path.
        data: Its bytes.
        source: The path as the user gave it, for messages.
        read_file: Reads the ``tokenizer_config.json`` beside a ``vocab.txt`` (its ``do_lower_case``).
            Defaults to local files.
    """
    from data_pipeline.text import hf_tokenizer
    from data_pipeline.text.tokenizer import SentencePieceTokenizer

    if name.endswith(".json"):
        return hf_tokenizer.HFTokenizer(data, source)
    if name.endswith(".txt"):
        lowercase = lowercase_setting(read_file(_join(name.rpartition("/")[0] or ".", TOKENIZER_CONFIG)))
        converted = hf_tokenizer.tokenizer_json_from_vocab(data, source, lowercase)
        return hf_tokenizer.HFTokenizer(converted, source, data)
    return SentencePieceTokenizer(data, source)


def load_tokenizer(path: str, read_file: ReadFile = read_local) -> TextTokenizer:
    """The tokenizer at ``path``: a file, or a directory searched for ``DIRECTORY_FILES`` in order.

    Args:
        path: What the user passed as ``--tokenizer``.
        read_file: Reads a file: bytes, or None when absent. Defaults to local files.

    Raises:
        UserError: Nothing usable at ``path``, or a file that is not a tokenizer; naming the path.
    """
    chosen, data = find_tokenizer_file(path, read_file)
    return tokenizer_from_file(chosen, data, chosen, read_file)


def find_tokenizer_file(path: str, read_file: ReadFile = read_local) -> tuple[str, bytes]:
    """The file :func:`load_tokenizer` reads for ``path`` (itself, or the first of ``DIRECTORY_FILES``
    inside it) and its bytes.

    Raises:
        UserError: Nothing usable at ``path``, naming it.
    """
    data = read_file(path) if not path.endswith("/") else None
    if data is not None:
        return path, data
    for name in DIRECTORY_FILES:
        candidate = _join(path, name)
        data = read_file(candidate)
        if data is not None:
            return candidate, data
    raise UserError(
        f"--tokenizer {path}: no SentencePiece model, tokenizer.json or BERT vocab.txt there (give such a "
        f"file, or a directory holding {', '.join(DIRECTORY_FILES)})"
    )


def tokenizer_from_copy(kind: str, data: bytes, source: str) -> TextTokenizer:
    """Rebuild a tokenizer from the main file a manifest records (``tokenizer.path``) and its kind.

    Raises:
        UserError: An unknown kind, or bytes that are not a tokenizer of that kind; naming ``source``.
    """
    from data_pipeline.text import hf_tokenizer
    from data_pipeline.text.tokenizer import SentencePieceTokenizer

    if kind not in TOKENIZER_KINDS:
        raise UserError(f"tokenizer {source}: kind {kind!r} is not one of {TOKENIZER_KINDS}")
    if kind == DEFAULT_TOKENIZER_KIND:
        return SentencePieceTokenizer(data, source)
    tokenizer = hf_tokenizer.HFTokenizer(data, source)
    if tokenizer.kind != kind:
        raise UserError(f"tokenizer {source}: a {tokenizer.kind} tokenizer, the manifest says {kind}")
    return tokenizer
