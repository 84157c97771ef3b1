"""Documents between the stages of `prepare text`: cleaning and sentence tokenising (pure, no Beam)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from typing import Any, NamedTuple

import numpy as np

from data_pipeline.rejects import Reject
from data_pipeline.text.cleaning import check_length, document_hash, normalize_text
from data_pipeline.text.codec import pack_document
from data_pipeline.text.sentences import split_sentences
from data_pipeline.text.tokenizer import encode_sentences


class CleanDocument(NamedTuple):
    """A normalised document: the hash of its text, where it came from, and the text."""

    doc_hash: bytes
    source: str
    index: int
    text: str


class TokenizedDocument(NamedTuple):
    """A document as packed sentence tokens (``codec.pack_document``), keyed like its clean text."""

    doc_hash: bytes
    source: str
    index: int
    blob: bytes


def clean_document(source: str, index: int, text: str, min_doc_chars: int) -> CleanDocument | Reject:
    """The normalised document, or a ``too_short`` reject."""
    normalized = normalize_text(text)
    reason = check_length(normalized, min_doc_chars)
    if reason is not None:
        return Reject(reason, source, index, normalized)
    return CleanDocument(document_hash(normalized), source, index, normalized)


def tokenize_texts(processor: Any, texts: Sequence[str], dtype: np.dtype) -> list[bytes]:
    """Sentence-split and encode documents: one packed token blob (``pack_document``) per text.

    The sentences of all ``texts`` go to SentencePiece in one call: its per-call cost is several
    times that of a sentence, and a blob does not depend on which other texts shared its call.

    Args:
        processor: A loaded SentencePiece processor.
        texts: Normalised documents.
        dtype: The token dtype of the blobs.

    Returns:
        The blobs, in the order of ``texts``.
    """
    sentences = [split_sentences(text) for text in texts]
    ids = encode_sentences(processor, list(chain.from_iterable(sentences)))
    blobs: list[bytes] = []
    start = 0
    for document in sentences:
        blobs.append(pack_document(ids[start : start + len(document)], dtype))
        start += len(document)
    return blobs
