"""The one record of a rejected input (text document, image, file) and its dead-letter JSON lines."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import NamedTuple


class Reject(NamedTuple):
    """An input record set aside, with a stable snake_case ``reason``: a ``rejects/<reason>.jsonl`` line.

    A named tuple: Beam encodes it compactly, and it compares equal to its plain-tuple value.

    Attributes:
        reason: Why it was set aside (one of the reader's or stage's ``REJECT_REASONS``).
        source: The input path or URL.
        offset: A record ordinal (text: same numbering as ``Document.index``; parquet: the row;
            ``corrupt_stream``: the bytes read when the damage was found); ``None`` for file-level
            problems and image files.
        payload: The rejected record as text (at most 64 KiB), or what went wrong: the page title
            for ``redirect``/``namespace``, the error message for stream and file errors, the
            decoder's message or the kept copy for images.
    """

    reason: str
    source: str
    offset: int | None
    payload: str


def reject_lines(records: Iterable[tuple[str, int | None, str]]) -> list[bytes]:
    """JSON lines of ``(source, offset, payload)`` records, sorted so every run writes the same bytes."""
    ordered = sorted(records, key=lambda r: (r[0], -1 if r[1] is None else r[1], r[2]))
    return [
        (
            json.dumps({"source": s, "offset": o, "payload": p}, sort_keys=True, ensure_ascii=False) + "\n"
        ).encode()
        for s, o, p in ordered
    ]
