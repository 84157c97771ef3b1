"""Framing and dynamic whole-word masking: per-sequence shares, word integrity, specials, determinism.

Every property is checked for a SentencePiece tokenizer (``▁`` word starts, specials at 0-4) and for a
WordPiece tokenizer built here with ``tokenizers`` (``##`` continuations, specials at other ids).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from shard_fixtures import generate_text, make_examples, train_tokenizer
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordPiece
from tokenizers.trainers import WordPieceTrainer

from data_pipeline.errors import UserError
from data_pipeline.formats.text import SENTENCEPIECE_SPECIAL_IDS, SpecialIds, encode_chunk
from data_pipeline.text.hf_tokenizer import HFTokenizer
from data_pipeline.text.tokenizer import SentencePieceTokenizer
from data_pipeline.text.tokenizer_kinds import TextTokenizer
from training.masking import (
    IGNORE_INDEX,
    MaskingConfig,
    frame_examples,
    mask_batch,
    mask_key,
    masking_vocab,
    special_table,
    word_start_table,
)

SEQ_LEN = 128
# WordPiece specials away from 0-4, as in real vocabularies ([CLS] is 101 in bert-base-uncased).
WORDPIECE_SPECIALS = ["[PAD]", "[unused0]", "[UNK]", "[unused1]", "[CLS]", "[SEP]", "[MASK]"]


def wordpiece_json(sentences: list[str], vocab_size: int = 800) -> bytes:
    """A tiny lowercasing WordPiece tokenizer.json trained on ``sentences``.

    800 pieces keep about 1.2 pieces per word, as bert-base-uncased on English text; far smaller
    vocabularies spell rare words letter by letter, and whole words then overshoot the share more.
    """
    tokenizer = Tokenizer(WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = WordPieceTrainer(vocab_size=vocab_size, special_tokens=WORDPIECE_SPECIALS, show_progress=False)
    tokenizer.train_from_iterator(sentences, trainer)
    return tokenizer.to_str().encode("utf-8")


@dataclass
class Case:
    """One tokenizer and the plain-loop reference of its word rule."""

    tokenizer: TextTokenizer
    starts_word: Callable[[int], bool]

    @property
    def special(self) -> SpecialIds:
        return self.tokenizer.special_ids


def sentencepiece_case() -> Case:
    tokenizer = SentencePieceTokenizer(train_tokenizer(320, 0), "test spm")
    processor = tokenizer.processor

    def starts_word(token: int) -> bool:
        piece = processor.id_to_piece(token)
        return (piece.startswith("\u2581") or processor.is_unknown(token)) and not processor.is_byte(token)

    return Case(tokenizer, starts_word)


def wordpiece_case() -> Case:
    tokenizer = HFTokenizer(wordpiece_json(generate_text(0, 300, sample=2)), "test wordpiece")
    return Case(tokenizer, lambda token: not tokenizer.tokenizer.id_to_token(token).startswith("##"))


@pytest.fixture(scope="module", params=["sentencepiece", "wordpiece"])
def case(request: pytest.FixtureRequest) -> Case:
    built = sentencepiece_case() if request.param == "sentencepiece" else wordpiece_case()
    assert built.tokenizer.kind == request.param
    return built


@pytest.fixture(scope="module")
def framed(case: Case) -> np.ndarray:
    """512 framed pair sequences of real ids of the tokenizer, plus packed [SEP]s inside content."""
    encoded = case.tokenizer.encode(generate_text(0, 300, sample=1))
    stream = np.concatenate([np.asarray(ids) for ids in encoded])
    stream[::97] = case.special.sep  # document boundaries inside packed content, as in `none` data
    examples = make_examples(512, stream, SEQ_LEN, "nsp", seed=3)
    tokens, seqs = encode_chunk(examples, np.dtype(np.uint16))
    seqs = seqs.astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(seqs[:, 0] + seqs[:, 1])[:-1]])
    return frame_examples(tokens, starts, seqs[:, 0], seqs[:, 1], SEQ_LEN, case.special).input_ids


def run_mask(
    ids: np.ndarray,
    case: Case,
    config: MaskingConfig,
    positions: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    vocab = masking_vocab(case.tokenizer.word_starts(), case.special)
    positions = np.arange(len(ids)) if positions is None else positions
    return mask_batch(ids, positions, mask_key(seed, 0, 0), vocab, config)


def reference_words(row: np.ndarray, case: Case) -> list[list[int]]:
    """Words of one framed row by the documented rule, written as a plain loop."""
    words: list[list[int]] = []
    previous_special = True
    for index, token in enumerate(row.tolist()):
        if token in case.special.never_masked:
            previous_special = True
            continue
        if previous_special or case.starts_word(token):
            words.append([index])
        else:
            words[-1].append(index)
        previous_special = False
    return words


@pytest.mark.parametrize("special", [SENTENCEPIECE_SPECIAL_IDS, SpecialIds(0, 100, 101, 102, 103)])
def test_frame_examples_places_specials_segments_and_types(special: SpecialIds) -> None:
    tokens = np.arange(10, 20)
    framed = frame_examples(tokens, np.array([0, 5]), np.array([2, 5]), np.array([3, 0]), 10, special)
    cls, sep, pad = special.cls, special.sep, special.pad
    assert framed.input_ids.tolist() == [
        [cls, 10, 11, sep, 12, 13, 14, sep, pad, pad],
        [cls, 15, 16, 17, 18, 19, sep, pad, pad, pad],
    ]
    assert framed.token_type_ids.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 0, 0], [0] * 10]
    assert framed.attention_mask.tolist() == [[1] * 8 + [0] * 2, [1] * 7 + [0] * 3]


def test_word_start_table_rules() -> None:
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "\u2581the", "re", "<0xE2>", "\u2581", ","]
    table = word_start_table(pieces, byte_ids=[7], control_ids=[0, 1, 2, 3, 4])
    assert table.tolist() == [True] * 5 + [True, False, False, True, False]
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "##re", "##s", ",", "#"]
    table = word_start_table(pieces, byte_ids=[], control_ids=[0, 1, 2, 3, 4], continuation_prefix="##")
    assert table.tolist() == [True] * 5 + [True, False, False, True, True]


def test_wordpiece_tokenizer_word_starts_and_specials() -> None:
    case = wordpiece_case()
    assert case.special == SpecialIds(pad=0, unk=2, cls=4, sep=5, mask=6)
    table = case.tokenizer.word_starts()
    pieces = case.tokenizer.pieces()  # type: ignore[attr-defined]
    assert table.tolist() == [not piece.startswith("##") for piece in pieces]
    assert sum(piece.startswith("##") for piece in pieces) > 50  # the rule had continuations to see


@pytest.mark.parametrize("mask_prob", [0.15, 0.3])
def test_whole_word_share_per_sequence(framed: np.ndarray, case: Case, mask_prob: float) -> None:
    _, labels = run_mask(framed, case, MaskingConfig(mask_prob=mask_prob))
    selected = labels != IGNORE_INDEX
    shares = []
    for row, chosen in zip(framed, selected):
        words = reference_words(row, case)
        content = sum(len(word) for word in words)
        target = max(1, int(np.floor(mask_prob * content + 0.5)))
        count = int(chosen.sum())
        # At least the target; the last word taken overshoots by less than its length.
        assert target <= count < target + max(len(word) for word in words)
        shares.append(count / content)
    shares = np.array(shares)
    assert abs(shares.mean() - mask_prob) < 0.01
    assert np.mean(np.abs(shares - mask_prob) <= 0.05) > 0.95


def test_whole_word_masking_never_splits_a_word(framed: np.ndarray, case: Case) -> None:
    _, labels = run_mask(framed, case, MaskingConfig(mask_prob=0.3))
    multi_piece = 0
    for row, row_labels in zip(framed, labels):
        for word in reference_words(row, case):
            chosen = row_labels[word] != IGNORE_INDEX
            assert chosen.all() or not chosen.any(), f"word at {word} partly masked"
            multi_piece += len(word) > 1 and chosen.all()
    assert multi_piece > 100  # the check covered many multi-piece words


def test_token_masking_hits_the_target_exactly(framed: np.ndarray, case: Case) -> None:
    _, labels = run_mask(framed, case, MaskingConfig(whole_word=False))
    content = (~special_table(case.tokenizer.vocab_size, case.special)[framed]).sum(axis=1)
    expected = np.maximum(1, np.floor(0.15 * content + 0.5))
    assert ((labels != IGNORE_INDEX).sum(axis=1) == expected).all()


def test_specials_never_masked_and_labels_only_at_selected(framed: np.ndarray, case: Case) -> None:
    masked, labels = run_mask(framed, case, MaskingConfig(mask_prob=0.3))
    selected = labels != IGNORE_INDEX
    specials = np.isin(framed, case.special.never_masked)
    assert not (selected & specials).any()
    assert (masked[specials] == framed[specials]).all()
    assert (labels[selected] == framed[selected]).all()
    assert (masked[~selected] == framed[~selected]).all()


def test_replacement_shares_and_random_ids(framed: np.ndarray, case: Case) -> None:
    masked, labels = run_mask(framed, case, MaskingConfig(mask_prob=0.3))
    selected = labels != IGNORE_INDEX
    total = int(selected.sum())
    as_mask = int((masked[selected] == case.special.mask).sum())
    changed = selected & (masked != case.special.mask) & (masked != framed)
    # Binomial bounds (about 5 sigma) around 80% [MASK] and 10% random (a random id may equal the original).
    assert abs(as_mask / total - 0.8) < 5 * np.sqrt(0.16 / total)
    assert abs(changed.sum() / total - 0.1) < 5 * np.sqrt(0.09 / total)
    assert not np.isin(masked[changed], case.special.ids).any()
    assert masked[changed].min() >= 0 and masked[changed].max() < case.tokenizer.vocab_size


def test_sentencepiece_replacements_are_ids_from_5() -> None:
    vocab = masking_vocab(np.ones(320, dtype=bool), SENTENCEPIECE_SPECIAL_IDS)
    assert vocab.random_ids.tolist() == list(range(5, 320)) and vocab.mask_id == 4
    with pytest.raises(UserError, match=r"do not fit a vocabulary of 100"):
        masking_vocab(np.ones(100, dtype=bool), SpecialIds(0, 100, 101, 102, 103))


def test_masks_depend_on_position_not_batch(framed: np.ndarray, case: Case) -> None:
    config = MaskingConfig()
    whole, whole_labels = run_mask(framed, case, config)
    part, part_labels = run_mask(framed[100:103], case, config, positions=np.arange(100, 103))
    assert (part == whole[100:103]).all() and (part_labels == whole_labels[100:103]).all()
    other_seed, _ = run_mask(framed, case, config, seed=1)
    assert (other_seed != whole).any()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (MaskingConfig(mask_prob=0.0), r"masking.mask_prob must lie in \(0, 1\), got 0.0"),
        (MaskingConfig(keep_prob=1.5), r"masking.keep_prob must lie in \[0, 1\], got 1.5"),
        (MaskingConfig(random_token_prob=0.6, keep_prob=0.6), r"at most 1, got 0.6 \+ 0.6"),
    ],
)
def test_bad_masking_config(config: MaskingConfig, message: str) -> None:
    with pytest.raises(UserError, match=message):
        config.validate()
