"""Text normalisation, the exact de-duplication key, and the minimum-length check."""

from __future__ import annotations

import hashlib
import re
import unicodedata

DOCUMENT_HASH_BYTES = 16

# Each pattern starts with a character class, which lets the regex engine scan for it in C; a pattern
# that starts with an alternation is tried at every character, several times slower.
_LINE_BREAK_CHARACTERS = "\r\x85\u2028\u2029"
# \r\n is one line break; a lone \r or a Unicode line/paragraph separator is one too.
_LINE_BREAKS = re.compile("[\r\x85\u2028\u2029](?:(?<=\r)\n)?")
# Tabs and the space characters NFKC leaves alone (or that appear after it) become one plain space.
_SPACE_LIKE_CHARACTERS = "\t\x0b\x0c\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000"
_SPACE_LIKE = re.compile(f"[{_SPACE_LIKE_CHARACTERS}]")
# Control characters other than \n, invisible format characters that only split words (soft hyphen,
# zero-width space, word joiner, byte-order mark), and lone surrogates (which cannot be encoded).
# Zero-width (non-)joiners stay: some scripts and emoji need them.
_INVISIBLE_CHARACTERS = "\x00-\x09\x0b-\x1f\x7f-\x84\x86-\x9f\u00ad\u200b\u2060\ufeff\ud800-\udfff"
_INVISIBLE = re.compile(f"[{_INVISIBLE_CHARACTERS}]")
# Any character one of the three passes above would change: clean text has none, and one scan for
# them replaces three.
_ODD_CHARACTERS = re.compile(f"[{_LINE_BREAK_CHARACTERS}{_SPACE_LIKE_CHARACTERS}{_INVISIBLE_CHARACTERS}]")
_SPACE_RUNS = re.compile(" {2,}")
_SPACES_AROUND_NEWLINE = re.compile(" *\n *")
_BLANK_LINE_RUNS = re.compile("\n{3,}")


def normalize_text(text: str) -> str:
    """Canonical form of a document, applied before hashing, length checks and tokenising.

    Unicode NFKC; ``\\r\\n``, ``\\r`` and Unicode line separators become ``\\n``; tabs and exotic spaces
    become a space; other control characters and invisible word-splitting characters are dropped;
    runs of spaces collapse to one; lines are stripped; at most one blank line in a row; the whole is
    stripped. Idempotent.

    Args:
        text: Any text.

    Returns:
        The normalised text.
    """
    if not unicodedata.is_normalized("NFKC", text):
        text = unicodedata.normalize("NFKC", text)
    # The checks skip passes with nothing to do, which is most of them on clean text.
    if _ODD_CHARACTERS.search(text):
        text = _LINE_BREAKS.sub("\n", text)
        text = _SPACE_LIKE.sub(" ", text)
        text = _INVISIBLE.sub("", text)
    text = _SPACE_RUNS.sub(" ", text) if "  " in text else text
    if " \n" in text or "\n " in text:
        text = _SPACES_AROUND_NEWLINE.sub("\n", text)
    text = _BLANK_LINE_RUNS.sub("\n\n", text) if "\n\n\n" in text else text
    return text.strip()


def document_hash(text: str) -> bytes:
    """The 16-byte BLAKE2b digest of ``text``: the exact de-duplication key and the val-split key.

    ``text`` is hashed as given: pass the output of ``normalize_text`` (it is not normalised again, to
    avoid doing that work twice per document).
    """
    data = text.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=DOCUMENT_HASH_BYTES).digest()


def check_length(text: str, min_chars: int) -> str | None:
    """``"too_short"`` when ``text`` has fewer than ``min_chars`` characters, else None."""
    return "too_short" if len(text) < min_chars else None
