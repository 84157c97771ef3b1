"""Framing and dynamic whole-word masking: per-sequence shares, word integrity, specials, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import sentencepiece as spm
from shard_fixtures import generate_text, make_examples, train_tokenizer

from data_pipeline.errors import UserError
from data_pipeline.formats.text import CLS_ID, MASK_ID, PAD_ID, SEP_ID, encode_chunk
from training.masking import (
    IGNORE_INDEX,
    MaskingConfig,
    frame_examples,
    mask_batch,
    mask_key,
    special_table,
    word_start_table,
    word_start_table_from_processor,
)

SEQ_LEN = 128


@pytest.fixture(scope="module")
def processor() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_proto=train_tokenizer(320, 0))


@pytest.fixture(scope="module")
def framed(processor: spm.SentencePieceProcessor) -> np.ndarray:
    """512 framed pair sequences of real SentencePiece ids, plus packed [SEP]s inside content."""
    stream = np.concatenate([np.asarray(ids) for ids in processor.encode(generate_text(0, 300, sample=1))])
    stream[::97] = SEP_ID  # document boundaries inside packed content, as in `none` data
    examples = make_examples(512, stream, SEQ_LEN, "nsp", seed=3)
    tokens, seqs = encode_chunk(examples, np.dtype(np.uint16))
    seqs = seqs.astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(seqs[:, 0] + seqs[:, 1])[:-1]])
    return frame_examples(tokens, starts, seqs[:, 0], seqs[:, 1], SEQ_LEN).input_ids


def run_mask(
    ids: np.ndarray,
    processor: spm.SentencePieceProcessor,
    config: MaskingConfig,
    positions: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    table = word_start_table_from_processor(processor)
    positions = np.arange(len(ids)) if positions is None else positions
    return mask_batch(ids, positions, mask_key(seed, 0, 0), table, special_table(len(table)), config)


def reference_words(row: np.ndarray, processor: spm.SentencePieceProcessor) -> list[list[int]]:
    """Words of one framed row by the documented rule, written as a plain loop."""
    words: list[list[int]] = []
    previous_special = True
    for index, token in enumerate(row.tolist()):
        if token in (PAD_ID, CLS_ID, SEP_ID, MASK_ID):
            previous_special = True
            continue
        piece = processor.id_to_piece(token)
        word_piece = piece.startswith("\u2581") or processor.is_unknown(token)
        if previous_special or (word_piece and not processor.is_byte(token)):
            words.append([index])
        else:
            words[-1].append(index)
        previous_special = False
    return words


def test_frame_examples_places_specials_segments_and_types() -> None:
    tokens = np.arange(10, 20)
    framed = frame_examples(tokens, np.array([0, 5]), np.array([2, 5]), np.array([3, 0]), 10)
    assert framed.input_ids.tolist() == [
        [CLS_ID, 10, 11, SEP_ID, 12, 13, 14, SEP_ID, PAD_ID, PAD_ID],
        [CLS_ID, 15, 16, 17, 18, 19, SEP_ID, PAD_ID, PAD_ID, PAD_ID],
    ]
    assert framed.token_type_ids.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 0, 0], [0] * 10]
    assert framed.attention_mask.tolist() == [[1] * 8 + [0] * 2, [1] * 7 + [0] * 3]


def test_word_start_table_rules() -> None:
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "\u2581the", "re", "<0xE2>", "\u2581", ","]
    table = word_start_table(pieces, byte_ids=[7], control_ids=[0, 1, 2, 3, 4])
    assert table.tolist() == [True] * 5 + [True, False, False, True, False]


@pytest.mark.parametrize("mask_prob", [0.15, 0.3])
def test_whole_word_share_per_sequence(framed: np.ndarray, processor, mask_prob: float) -> None:
    _, labels = run_mask(framed, processor, MaskingConfig(mask_prob=mask_prob))
    selected = labels != IGNORE_INDEX
    shares = []
    for row, chosen in zip(framed, selected):
        words = reference_words(row, processor)
        content = sum(len(word) for word in words)
        target = max(1, int(np.floor(mask_prob * content + 0.5)))
        count = int(chosen.sum())
        # At least the target; the last word taken overshoots by less than its length.
        assert target <= count < target + max(len(word) for word in words)
        shares.append(count / content)
    shares = np.array(shares)
    assert abs(shares.mean() - mask_prob) < 0.01
    assert np.mean(np.abs(shares - mask_prob) <= 0.05) > 0.95


def test_whole_word_masking_never_splits_a_word(framed: np.ndarray, processor) -> None:
    _, labels = run_mask(framed, processor, MaskingConfig(mask_prob=0.3))
    multi_piece = 0
    for row, row_labels in zip(framed, labels):
        for word in reference_words(row, processor):
            chosen = row_labels[word] != IGNORE_INDEX
            assert chosen.all() or not chosen.any(), f"word at {word} partly masked"
            multi_piece += len(word) > 1 and chosen.all()
    assert multi_piece > 100  # the check covered many multi-piece words


def test_token_masking_hits_the_target_exactly(framed: np.ndarray, processor) -> None:
    _, labels = run_mask(framed, processor, MaskingConfig(whole_word=False))
    content = (~special_table(320)[framed]).sum(axis=1)
    expected = np.maximum(1, np.floor(0.15 * content + 0.5))
    assert ((labels != IGNORE_INDEX).sum(axis=1) == expected).all()


def test_specials_never_masked_and_labels_only_at_selected(framed: np.ndarray, processor) -> None:
    masked, labels = run_mask(framed, processor, MaskingConfig(mask_prob=0.3))
    selected = labels != IGNORE_INDEX
    specials = np.isin(framed, [PAD_ID, CLS_ID, SEP_ID, MASK_ID])
    assert not (selected & specials).any()
    assert (masked[specials] == framed[specials]).all()
    assert (labels[selected] == framed[selected]).all()
    assert (masked[~selected] == framed[~selected]).all()


def test_replacement_shares_and_random_ids(framed: np.ndarray, processor) -> None:
    masked, labels = run_mask(framed, processor, MaskingConfig(mask_prob=0.3))
    selected = labels != IGNORE_INDEX
    total = int(selected.sum())
    as_mask = int((masked[selected] == MASK_ID).sum())
    changed = selected & (masked != MASK_ID) & (masked != framed)
    # Binomial bounds (about 5 sigma) around 80% [MASK] and 10% random (a random id may equal the original).
    assert abs(as_mask / total - 0.8) < 5 * np.sqrt(0.16 / total)
    assert abs(changed.sum() / total - 0.1) < 5 * np.sqrt(0.09 / total)
    assert masked[changed].min() >= 5 and masked[changed].max() < 320


def test_masks_depend_on_position_not_batch(framed: np.ndarray, processor) -> None:
    config = MaskingConfig()
    whole, whole_labels = run_mask(framed, processor, config)
    part, part_labels = run_mask(framed[100:103], processor, config, positions=np.arange(100, 103))
    assert (part == whole[100:103]).all() and (part_labels == whole_labels[100:103]).all()
    other_seed, _ = run_mask(framed, processor, config, seed=1)
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
