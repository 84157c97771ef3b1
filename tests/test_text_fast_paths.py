"""The fast sentence splitter, normaliser and batched tokeniser give exactly what the plain rules give.

Each fast path is checked against a straightforward reference implementation of the same rules on
thousands of seeded random strings built from the characters the rules care about, and the batched
tokeniser against one document at a time, inside and outside Beam.
"""

from __future__ import annotations

import random
import re
import unicodedata
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.util import assert_that, equal_to
from fixtures_text import WORDS

from data_pipeline import beam_common
from data_pipeline.text import codec, pipeline
from data_pipeline.text.cleaning import normalize_text
from data_pipeline.text.documents import tokenize_texts
from data_pipeline.text.sentences import ABBREVIATIONS, CAPITALISED_ABBREVIATIONS, split_sentences
from data_pipeline.text.tokenizer import (
    encode_sentences,
    load_processor,
    train_sentencepiece,
    trainer_options,
)

# ------------------------------------------------------------------------------ reference splitter

_REFERENCE_BOUNDARY = re.compile(
    r"(?<![.!?\uff0e])(?P<stop>[.!?\uff0e]+)[\"'\u201d\u2019\u00bb)\]]*\s+"
    r"|(?<![\u3002\uff01\uff1f])(?P<wide>[\u3002\uff01\uff1f]+)[\u300d\u300f\u201d\u2019\uff09)]*\s*"
)


def reference_split(text: str) -> list[str]:
    """The splitting rules written plainly: every candidate judged in Python."""
    sentences: list[str] = []
    for line in text.split("\n"):
        start = 0
        for match in _REFERENCE_BOUNDARY.finditer(line):
            if match.group("stop") is None or _reference_ends(line, match, start):
                sentences.append(line[start : match.end()].strip())
                start = match.end()
        sentences.append(line[start:].strip())
    return [sentence for sentence in sentences if sentence]


def _reference_ends(line: str, match: re.Match[str], start: int) -> bool:
    if match.end() == len(line):
        return True
    following = line[match.end()]
    if not (following.isupper() or following.isdigit() or following in "\"'\u201c\u2018\u00ab([\u00bf\u00a1"):
        return False
    if match.group("stop") not in (".", "\uff0e"):
        return True
    word_start = max(line.rfind(" ", start, match.start()) + 1, start)
    word = line[word_start : match.start()].lstrip("(\"'\u201c\u2018[\u00ab")
    if not word:
        return True
    if len(word) == 1:
        return not word.isupper()
    return not (
        word.lower() in ABBREVIATIONS
        or word in CAPITALISED_ABBREVIATIONS
        or re.fullmatch(r"(?:[A-Za-z]\.)+[A-Za-z]", word)
    )


SPLIT_PIECES = [
    *" .!?\uff0e\u3002\uff01\uff1f\"'\u201d\u2019\u00bb)]([\u201c\u2018\u00ab\u00bf\u00a1\u300d\u300f\uff09\t\u3000\n",
    *["a", "b", "Z", "0", "7", "\u00e9", "\u00c9", "\u0661", "\u00b2", "\u4e00", "word", "Word"],
    *["Dr", "dr", "No", "no", "U.S", "e.g", "J", "approx", "Figs", "mr", "Ph.D"],
]


def random_text(rng: random.Random, pieces: list[str], most: int) -> str:
    return "".join(rng.choice(pieces) for _ in range(rng.randint(0, most)))


def test_split_sentences_matches_the_reference_rules() -> None:
    rng = random.Random(7)
    for _ in range(4000):
        text = random_text(rng, SPLIT_PIECES, 30)
        assert split_sentences(text) == reference_split(text), repr(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('He said "no."  and left. Then', ['He said "no."  and left.', "Then"]),  # no backtracking
        (
            "End. \u00c9t\u00e9 came. \u00e9t\u00e9 stayed.",
            ["End.", "\u00c9t\u00e9 came. \u00e9t\u00e9 stayed."],
        ),
        ("Total. \u0663 left. \u00b2 more", ["Total.", "\u0663 left.", "\u00b2 more"]),  # Unicode digits
        ("Why?! \u00bfQu\u00e9? \u00a1S\u00ed!", ["Why?!", "\u00bfQu\u00e9?", "\u00a1S\u00ed!"]),
        ("A.\u3002B. c", ["A.\u3002", "B. c"]),  # a wide run right after a period run
        ("(Dr. Who) met \u201cMr. X\u201d. Done", ["(Dr. Who) met \u201cMr. X\u201d.", "Done"]),
    ],
)
def test_split_sentences_edge_cases(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected == reference_split(text)


# ---------------------------------------------------------------------------- reference normaliser


def reference_normalize(text: str) -> str:
    """The normalisation rules as one pass each, without any skipping."""
    text = unicodedata.normalize("NFKC", text)
    text = re.sub("\r\n?|[\x85\u2028\u2029]", "\n", text)
    text = re.sub("[\t\x0b\x0c\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]", " ", text)
    text = re.sub("[\x00-\x09\x0b-\x1f\x7f-\x84\x86-\x9f\u00ad\u200b\u2060\ufeff\ud800-\udfff]", "", text)
    text = re.sub(" {2,}", " ", text)
    text = re.sub(" *\n *", "\n", text)
    return re.sub("\n{3,}", "\n\n", text).strip()


NORMALIZE_PIECES = [
    *"ab \n\r\t\x0b\x0c\x00\x1f\x7f\x84\x85\x86\x9f\u00a0\u00ad\u1680\u2000\u200a\u200b\u200c\u200d",
    *"\u2028\u2029\u202f\u205f\u2060\u3000\ufeff\ud800\udfff\uff21\u00bd\u2126\u0301e\ufb01",
    "\r\n",
    "  ",
]


def test_normalize_text_matches_the_reference_rules() -> None:
    rng = random.Random(11)
    for _ in range(4000):
        text = random_text(rng, NORMALIZE_PIECES, 20)
        assert normalize_text(text) == reference_normalize(text), repr(text)


# ------------------------------------------------------------------------------- batched tokenising


def documents(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(count):
        sentences = [
            " ".join(rng.choice(WORDS, int(rng.integers(3, 9)))).capitalize() + f" {rng.integers(0, 99)}."
            for _ in range(int(rng.integers(1, 6)))
        ]
        texts.append(" ".join(sentences))
    return texts


@pytest.fixture(scope="module")
def model_proto(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    root = tmp_path_factory.mktemp("fast-paths")
    sample = root / "sentences.txt"
    sample.write_text("\n".join(documents(300, seed=1)), encoding="utf-8")
    return Path(
        train_sentencepiece(str(sample), str(root / "tok"), trainer_options(320, num_threads=1))
    ).read_bytes()


def one_by_one(processor: object, text: str, dtype: np.dtype) -> bytes:
    return codec.pack_document(encode_sentences(processor, split_sentences(text)), dtype)


def test_tokenize_texts_equals_one_document_at_a_time(model_proto: bytes) -> None:
    processor = load_processor(model_proto=model_proto)
    dtype = np.dtype(np.uint16)
    texts = [*documents(20), "", "\n\n", "One.\n\nTwo. Three"]
    blobs = tokenize_texts(processor, texts, dtype)
    assert blobs == [one_by_one(processor, text, dtype) for text in texts]
    assert tokenize_texts(processor, [], dtype) == []
    assert codec.unpack_document(blobs[20]) == []


def test_tokenize_documents_batches_within_and_across_bundles(model_proto: bytes) -> None:
    processor = load_processor(model_proto=model_proto)
    dtype = np.dtype(np.uint16)
    count = 2 * pipeline.TOKENIZE_BATCH + 5  # two full batches, and a partial one at bundle end
    records = [(i.to_bytes(16, "big"), "src", i, text) for i, text in enumerate(documents(count, seed=2))]
    expected = [(h, s, i, one_by_one(processor, text, dtype)) for h, s, i, text in records]
    with beam_common.make_pipeline(["--direct_running_mode=in_memory"])[0] as p:
        tokens = p | beam.Create(records) | pipeline.TokenizeDocuments(model_proto, dtype)
        assert_that(tokens, equal_to(expected))
