"""Text normalisation, document hashing, the length check and sentence splitting."""

from __future__ import annotations

import pytest

from data_pipeline.text.cleaning import DOCUMENT_HASH_BYTES, check_length, document_hash, normalize_text
from data_pipeline.text.sentences import split_sentences


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ＡＢＣ １２３ ﬁne", "ABC 123 fine"),  # NFKC: full-width forms and ligatures
        ("e\u0301te\u0301", "\u00e9t\u00e9"),  # NFKC composes
        ("a\tb\u00a0c\u2003d\u3000e\u202ff", "a b c d e f"),  # tabs and exotic spaces
        ("a\x00b\x07c\x1bd\x7fe\x9ff", "abcdef"),  # control characters
        ("soft\u00adhy\u200bphen\ufeff", "softhyphen"),  # invisible word splitters
        ("zero\u200dwidth joiner", "zero\u200dwidth joiner"),  # kept: scripts and emoji need it
        ("lone \ud800 surrogate", "lone surrogate"),
        ("a    b  \t c", "a b c"),  # runs of spaces
        ("  line one  \n\tline two\t", "line one\nline two"),  # lines stripped
        ("a\r\nb\rc\u2028d\u2029e\x85f", "a\nb\nc\nd\ne\nf"),  # line breaks unified
        ("a\n\n\n\n \n\t\nb", "a\n\nb"),  # at most one blank line
        ("\n\n  text  \n\n", "text"),
        ("", ""),
    ],
)
def test_normalize_text(text: str, expected: str) -> None:
    assert normalize_text(text) == expected


def test_normalize_text_is_idempotent() -> None:
    text = " Ｔｈｅ\u00a0quick\t\tbrown\r\n\r\n\r\nfox\u200b \x00jumps "
    once = normalize_text(text)
    assert normalize_text(once) == once


def test_document_hash() -> None:
    digest = document_hash("some text")
    assert isinstance(digest, bytes) and len(digest) == DOCUMENT_HASH_BYTES == 16
    assert document_hash("some text") == digest
    assert document_hash("some text.") != digest
    # Same normalised text, same key: the de-dup key sees through spacing and width differences.
    assert document_hash(normalize_text("some  ｔｅｘｔ\n")) == digest
    assert len(document_hash("lone \ud800")) == 16  # never raises, even on text that cannot be encoded


def test_check_length() -> None:
    assert check_length("abc", 4) == "too_short"
    assert check_length("abcd", 4) is None
    assert check_length("", 0) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("One. Two! Three? Four", ["One.", "Two!", "Three?", "Four"]),
        ("He left. she stayed.", ["He left. she stayed."]),  # no capital after: no boundary
        (
            "Mr. Smith met Dr. Jones and Prof. Lee. Then they left.",
            ["Mr. Smith met Dr. Jones and Prof. Lee.", "Then they left."],
        ),
        (
            "Apples, pears, etc. Are fruit. Cities, e.g. Paris, i.e. Large.",
            ["Apples, pears, etc. Are fruit.", "Cities, e.g. Paris, i.e. Large."],
        ),
        (
            "St. Louis vs. Boston. J. R. R. Tolkien wrote. The U.S. Army won.",
            ["St. Louis vs. Boston.", "J. R. R. Tolkien wrote.", "The U.S. Army won."],
        ),
        (
            "Pi is 3.14 and e is 2.72. Both are irrational.",
            ["Pi is 3.14 and e is 2.72.", "Both are irrational."],
        ),
        ("See No. 5 and Fig. 2. No one came.", ["See No. 5 and Fig. 2.", "No one came."]),
        ("It was 1990. 2000 came later.", ["It was 1990.", "2000 came later."]),
        (
            'He said "Stop." Then he left. (It rained.) Later "Why?" she asked.',
            ['He said "Stop."', "Then he left.", "(It rained.)", 'Later "Why?" she asked.'],
        ),
        ("Wait... What? Really?! Yes.", ["Wait...", "What?", "Really?!", "Yes."]),
        (
            "History\nThe city grew. It is old.\n\n* First item\n* Second item. More",
            ["History", "The city grew.", "It is old.", "* First item", "* Second item.", "More"],
        ),
        ("第一句。第二句！第三句？", ["第一句。", "第二句！", "第三句？"]),
        ("Ｈｅ ｗｅｎｔ． Ｎｏｔｈｉｎｇ", ["Ｈｅ ｗｅｎｔ．", "Ｎｏｔｈｉｎｇ"]),
        ("\n  \n", []),
        ("", []),
    ],
)
def test_split_sentences(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected


def test_split_sentences_long_runs_complete() -> None:
    """Long runs of terminators and abbreviations: each is scanned once."""
    text = "." * 200_000 + " A" + " Mr." * 50_000 + "\n" + "Hello. " * 50_000
    sentences = split_sentences(text)
    assert sentences[-1] == "Hello." and len(sentences) == 50_002
