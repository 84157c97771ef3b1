"""Fast rule-based sentence splitting, linear in the length of the text."""

from __future__ import annotations

import re

# Lower-cased words that end with a period without ending a sentence.
# fmt: off
ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "mt", "ft", "gen", "col", "lt", "sgt", "capt",
    "cmdr", "adm", "rev", "hon", "gov", "sen", "rep", "pres", "vs", "etc", "e.g", "i.e", "cf", "al",
    "approx", "ca", "viz", "inc", "ltd", "corp", "dept", "univ", "est", "jan", "feb", "apr", "jun",
    "jul", "aug", "sep", "sept", "oct", "nov", "dec", "a.m", "p.m", "ph.d", "u.s", "u.k", "u.n", "b.c",
    "a.d"
})
# fmt: on
# Abbreviations that are also ordinary lower-case words ("no", "co"): only their capitalised form.
CAPITALISED_ABBREVIATIONS = frozenset({"No", "Nos", "Vol", "Fig", "Figs", "Co", "Op", "Ch", "Pt"})

# A run of terminators, then closing quotes or brackets, then the whitespace after them. The
# lookbehind lets a match start only at the first terminator of a run, so "....." is scanned once.
# The full-width full stop is also a decimal point ("３．１４"), so it is treated like ".".
_BOUNDARY = re.compile(
    r"(?<![.!?\uff0e])(?P<stop>[.!?\uff0e]+)[\"'\u201d\u2019\u00bb)\]]*\s+"
    r"|(?<![\u3002\uff01\uff1f])(?P<wide>[\u3002\uff01\uff1f]+)[\u300d\u300f\u201d\u2019\uff09)]*\s*"
)
_SENTENCE_OPENERS = "\"'\u201c\u2018\u00ab([\u00bf\u00a1"
_INITIALISM = re.compile(r"(?:[A-Za-z]\.)+[A-Za-z]")


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences, stripped, with no empty ones.

    Every line is a sentence boundary (headings and list items stand alone). Within a line, a
    sentence ends after ``.``, ``!`` or ``?`` (with any closing quotes or brackets) followed by
    whitespace and an upper-case letter, a digit or an opening quote/bracket, except after an
    abbreviation (``ABBREVIATIONS``, ``CAPITALISED_ABBREVIATIONS``), a single capital initial
    ("J. Smith") or an initialism ("U.S."); the full-width ``．`` is treated like ``.``. The
    ideographic ``。`` and full-width ``！？`` always end a sentence, as the languages that use them put
    no space after them. Decimals ("3.14") have no space after the
    point and are never split.

    Args:
        text: A document; normalised text is expected but not required.

    Returns:
        The sentences, in order.
    """
    sentences: list[str] = []
    for line in text.split("\n"):
        start = 0
        for match in _BOUNDARY.finditer(line):
            if match.group("stop") is not None and not _ends_sentence(line, match, start):
                continue
            _append_stripped(sentences, line[start : match.end()])
            start = match.end()
        _append_stripped(sentences, line[start:])
    return sentences


def _append_stripped(sentences: list[str], piece: str) -> None:
    piece = piece.strip()
    if piece:
        sentences.append(piece)


def _ends_sentence(line: str, match: re.Match[str], sentence_start: int) -> bool:
    """Whether the terminator ``match`` (not full-width) ends the sentence that began at ``sentence_start``."""
    if match.end() == len(line):
        return True
    following = line[match.end()]
    if not (following.isupper() or following.isdigit() or following in _SENTENCE_OPENERS):
        return False
    if match.group("stop") not in (".", "\uff0e"):
        return True
    # The word before the period: searched back only to the sentence start, which keeps this linear.
    word_start = max(line.rfind(" ", sentence_start, match.start()) + 1, sentence_start)
    return not _is_abbreviation(line[word_start : match.start()].lstrip("(\"'\u201c\u2018[\u00ab"))


def _is_abbreviation(word: str) -> bool:
    if not word:
        return False
    if len(word) == 1:
        return word.isupper()  # an initial, as in "J. Smith"
    return (
        word.lower() in ABBREVIATIONS
        or word in CAPITALISED_ABBREVIATIONS
        or _INITIALISM.fullmatch(word) is not None
    )
