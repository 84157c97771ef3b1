"""HuggingFace ``tokenizers`` tokenizers (WordPiece, BPE, Unigram) behind the tokenizer protocol, and
BERT WordPiece training for `pretrain tokenizer --kind wordpiece`."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from tokenizers import Tokenizer, processors

from data_pipeline.errors import UserError
from data_pipeline.formats.text import SPECIAL_TOKENS, SpecialIds
from data_pipeline.text.tokenizer_kinds import (
    TOKENIZER_JSON,
    WORDPIECE_VOCAB,
    file_sha256,
    word_start_table,
)

# tokenizer.json model type -> tokenizer kind.
MODEL_KINDS = {"WordPiece": "wordpiece", "BPE": "bpe", "Unigram": "unigram"}
# The names each BERT special goes by: BERT's own first, then RoBERTa/XLM-R style.
SPECIAL_NAMES = {
    "[PAD]": ("[PAD]", "<pad>"),
    "[UNK]": ("[UNK]", "<unk>"),
    "[CLS]": ("[CLS]", "<s>", "<cls>"),
    "[SEP]": ("[SEP]", "</s>", "<sep>"),
    "[MASK]": ("[MASK]", "<mask>"),
}
BYTE_LEVEL_MARKER = "\u0120"  # "Ġ": byte-level BPE's space
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def _parse_json(data: bytes, source: str) -> dict[str, Any]:
    try:
        spec = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"tokenizer {source}: not a tokenizer.json ({error})") from error
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise UserError(f"tokenizer {source}: not a tokenizer.json (no model section)")
    return spec


def model_kind(spec: dict[str, Any], source: str) -> str:
    """``wordpiece``, ``bpe`` or ``unigram`` from a parsed tokenizer.json.

    Raises:
        UserError: Another model type (WordLevel), naming ``source``.
    """
    model_type = spec["model"].get("type")
    if model_type not in MODEL_KINDS:
        raise UserError(
            f"tokenizer {source}: model type {model_type!r} is not supported "
            f"(expected {', '.join(MODEL_KINDS)})"
        )
    return MODEL_KINDS[model_type]


def find_special_ids(tokenizer: Tokenizer, source: str) -> SpecialIds:
    """The id of each BERT special, looked up by the names in ``SPECIAL_NAMES`` (first found wins).

    Raises:
        UserError: A special with none of its names in the vocabulary, naming ``source``.
    """
    ids: dict[str, int] = {}
    for special, names in SPECIAL_NAMES.items():
        found = [tokenizer.token_to_id(name) for name in names]
        present = [token_id for token_id in found if token_id is not None]
        if not present:
            raise UserError(
                f"tokenizer {source}: no {special} token (looked for {', '.join(names)}); a BERT tokenizer "
                f"needs {' '.join(SPECIAL_TOKENS)}"
            )
        ids[special] = present[0]
    return SpecialIds.from_tokens(ids, f"tokenizer {source}")


def _pre_tokenizer_types(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The pre-tokenizer steps of a tokenizer.json (a ``Sequence`` flattened)."""
    step = spec.get("pre_tokenizer") or {}
    if step.get("type") == "Sequence":
        return list(step.get("pretokenizers") or [])
    return [step] if step else []


def word_rule(spec: dict[str, Any]) -> dict[str, str | None]:
    """How pieces mark words, as :func:`word_start_table` keywords.

    A model with a ``continuing_subword_prefix`` (WordPiece ``##``) marks continuations; otherwise a
    ``ByteLevel`` pre-tokenizer marks word-initial pieces with ``Ġ`` and ``Metaspace`` with its
    replacement (``▁``). A tokenizer with neither masks piece by piece.
    """
    prefix = spec["model"].get("continuing_subword_prefix")
    if spec["model"].get("type") == "WordPiece":
        prefix = prefix or "##"
    if prefix:
        return {"continuation_prefix": prefix, "word_marker": None}
    for step in _pre_tokenizer_types(spec):
        if step.get("type") == "ByteLevel":
            return {"continuation_prefix": None, "word_marker": BYTE_LEVEL_MARKER}
        if step.get("type") == "Metaspace":
            return {"continuation_prefix": None, "word_marker": step.get("replacement") or "\u2581"}
    return {"continuation_prefix": None, "word_marker": None}


class HFTokenizer:
    """A ``tokenizers`` tokenizer.json as a :class:`~data_pipeline.text.tokenizer_kinds.TextTokenizer`.

    Encoding adds no specials and never truncates or pads, whatever the file says: `prepare text`
    frames and cuts sequences itself.
    """

    def __init__(self, tokenizer_json: bytes, source: str, vocab_txt: bytes | None = None) -> None:
        """Load ``tokenizer_json`` (``source`` names it in messages); ``vocab_txt`` is copied as given."""
        self.spec = _parse_json(tokenizer_json, source)
        self.kind = model_kind(self.spec, source)
        try:
            self.tokenizer = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        except Exception as error:  # tokenizers raises a plain Exception for a malformed file
            raise UserError(f"tokenizer {source}: cannot load ({error})") from error
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.source = source
        self.data = tokenizer_json
        self.vocab_txt = vocab_txt
        self._special_ids = find_special_ids(self.tokenizer, source)

    @property
    def vocab_size(self) -> int:
        """Ids in the vocabulary, added tokens included."""
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    @property
    def special_ids(self) -> SpecialIds:
        """Ids of the BERT specials under their names in this vocabulary."""
        return self._special_ids

    @property
    def sha256(self) -> str:
        """Hex sha256 of the tokenizer.json bytes."""
        return file_sha256(self.data)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Content ids of each text, in one batched call."""
        if not texts:
            return []
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (specials kept, so that packed [SEP]s show)."""
        return str(self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False))

    def pieces(self) -> list[str]:
        """The piece of every id, in id order."""
        return [self.tokenizer.id_to_token(i) or "" for i in range(self.vocab_size)]

    def word_starts(self) -> NDArray[np.bool_]:
        """Word starts by :func:`word_rule`; specials, added tokens and [UNK] are their own word."""
        pieces = self.pieces()
        byte_ids = []
        if self.spec["model"].get("byte_fallback"):
            byte_ids = [i for i, piece in enumerate(pieces) if _BYTE_PIECE.fullmatch(piece)]
        added = [entry["id"] for entry in self.spec.get("added_tokens") or [] if entry.get("special")]
        control = sorted({*added, *self._special_ids.ids})
        return word_start_table(pieces, byte_ids, control, **word_rule(self.spec))

    def vocab_file(self) -> bytes | None:
        """A BERT ``vocab.txt`` (one piece per line, in id order) for a WordPiece tokenizer, else None."""
        if self.kind != "wordpiece":
            return None
        if self.vocab_txt is not None:
            return self.vocab_txt
        return "".join(piece + "\n" for piece in self.pieces()).encode("utf-8")

    def files(self) -> dict[str, bytes]:
        """tokenizer.json, and vocab.txt for WordPiece."""
        files = {TOKENIZER_JSON: self.data}
        vocab = self.vocab_file()
        if vocab is not None:
            files[WORDPIECE_VOCAB] = vocab
        return files


def tokenizer_json_from_vocab(vocab_txt: bytes, source: str, lowercase: bool = True) -> bytes:
    """A BERT WordPiece tokenizer.json for a ``vocab.txt`` (one piece per line, ids by line).

    Args:
        vocab_txt: The vocabulary file's bytes.
        source: Its path, for messages.
        lowercase: Lowercase and strip accents, as bert-base-uncased. Defaults to True.

    Raises:
        UserError: Not UTF-8, empty, or without the BERT specials.
    """
    from tokenizers.implementations import BertWordPieceTokenizer

    try:
        lines = vocab_txt.decode("utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise UserError(f"tokenizer {source}: a vocab.txt must be UTF-8 text ({error})") from error
    vocab = {piece: index for index, piece in reversed(list(enumerate(lines)))}
    missing = [token for token in SPECIAL_TOKENS if token not in vocab]
    if not lines or missing:
        raise UserError(
            f"tokenizer {source}: a BERT vocab.txt needs {' '.join(SPECIAL_TOKENS)}; lacks {missing}"
        )
    tokenizer = BertWordPieceTokenizer(vocab, lowercase=lowercase)
    return tokenizer.to_str().encode("utf-8")


def train_wordpiece(sentences: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a BERT WordPiece vocabulary: lowercased, accents stripped, [PAD] [UNK] [CLS] [SEP] [MASK] at 0-4.

    Args:
        sentences: The training text, one sentence per item.
        vocab_size: Pieces in the vocabulary, specials included.
        min_frequency: Fewest occurrences of a merged piece. Defaults to 2.

    Raises:
        UserError: ``vocab_size`` too small for the specials and the alphabet.
    """
    from tokenizers.implementations import BertWordPieceTokenizer

    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise UserError(f"--vocab-size {vocab_size}: must be more than the {len(SPECIAL_TOKENS)} specials")
    tokenizer = BertWordPieceTokenizer(lowercase=True)
    tokenizer.train_from_iterator(
        sentences,
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    trained = Tokenizer.from_str(tokenizer.to_str())
    # BERT's framing for users of the exported tokenizer.json (prepare text adds no specials itself).
    cls, sep = "[CLS]", "[SEP]"
    trained.post_processor = processors.BertProcessing(
        (sep, trained.token_to_id(sep)), (cls, trained.token_to_id(cls))
    )
    return trained


def write_wordpiece(tokenizer: Tokenizer, out_dir: str) -> HFTokenizer:
    """Write ``out_dir/tokenizer.json`` and ``out_dir/vocab.txt``; the written tokenizer, loaded back."""
    data = tokenizer.to_str().encode("utf-8")
    loaded = HFTokenizer(data, os.path.join(out_dir, TOKENIZER_JSON))
    os.makedirs(out_dir, exist_ok=True)
    for name, content in loaded.files().items():
        with open(os.path.join(out_dir, name), "wb") as handle:
            handle.write(content)
    return loaded
