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

# A run of terminators, then closing quotes or brackets, then what may follow. The pattern starts with a
# plain character class so that the regex engine skips ahead to the next terminator in C; each branch
# then checks, one character back, that the match starts at the first terminator of its run, so that
# "....." is scanned once (a leading lookbehind would be tried at every character, 5x slower).
#   stop: ``.!?`` runs, then whitespace and, decided here for ASCII, an upper-case letter, a digit or
#         an opening quote/bracket (a lower-case letter rules the boundary out without a Python call);
#         the group ``dot`` marks a lone period, the only case that needs the abbreviation check.
#   wide: ``。！？`` runs, which end a sentence whatever follows.
# Possessive ``++``/``*+``: a failed candidate never backtracks into its own run or whitespace. The
# full-width full stop is also a decimal point ("３．１４"), so it is treated like ".".
_BOUNDARY = re.compile(
    r"[.!?\uff0e\u3002\uff01\uff1f]"
    r"(?:"
    r"(?<=[.!?\uff0e])(?<![.!?\uff0e].)(?:(?P<dot>(?<=[.\uff0e])(?![.!?\uff0e]))|[.!?\uff0e]*+)"
    r"[\"'\u201d\u2019\u00bb)\]]*+\s++(?=[A-Z0-9\"'(\[]|[^\x00-\x7f]|$)"
    r"|(?<=[\u3002\uff01\uff1f])(?<![\u3002\uff01\uff1f].)(?P<wide>)[\u3002\uff01\uff1f]*+"
    r"[\u300d\u300f\u201d\u2019\uff09)]*+\s*+"
    r")"
)
_SENTENCE_OPENERS = "\"'\u201c\u2018\u00ab([\u00bf\u00a1"
_WORD_OPENERS = "(\"'\u201c\u2018[\u00ab"
_INITIALISM = re.compile(r"(?:[A-Za-z]\.)+[A-Za-z]")
# A word longer than this, without a period inside, cannot be in either abbreviation set.
_LONGEST_ABBREVIATION = max(map(len, ABBREVIATIONS | CAPITALISED_ABBREVIATIONS))


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
    append = sentences.append
    for line in text.split("\n"):
        start = 0
        for match in _BOUNDARY.finditer(line):
            end = match.end()
            kind = match.lastgroup  # "dot", "wide", or None for any other ".!?" run
            if kind != "wide" and end < len(line):
                # ASCII followers were decided by the pattern; others need Unicode's upper/digit.
                following = line[end]
                if following > "\x7f" and not (
                    following.isupper() or following.isdigit() or following in _SENTENCE_OPENERS
                ):
                    continue
                if kind == "dot" and _follows_abbreviation(line, start, match.start()):
                    continue
            piece = line[start:end].strip()
            if piece:
                append(piece)
            start = end
        piece = line[start:].strip()
        if piece:
            append(piece)
    return sentences


def _follows_abbreviation(line: str, sentence_start: int, period: int) -> bool:
    """Whether the word before the period at ``period`` is an abbreviation or an initial."""
    # The word before the period: searched back only to the sentence start, which keeps this linear.
    word_start = max(line.rfind(" ", sentence_start, period) + 1, sentence_start)
    word = line[word_start:period].lstrip(_WORD_OPENERS)
    if not word:
        return False
    if len(word) == 1:
        return word.isupper()  # an initial, as in "J. Smith"
    if "." in word:
        return word.lower() in ABBREVIATIONS or _INITIALISM.fullmatch(word) is not None
    return len(word) <= _LONGEST_ABBREVIATION and (
        word.lower() in ABBREVIATIONS or word in CAPITALISED_ABBREVIATIONS
    )
