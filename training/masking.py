"""BERT framing and dynamic (whole-word) masking of micro-batches: pure numpy, no per-token Python loops.

Randomness is counter based: every random number a sequence uses is a hash of (mask key, global
position of the sequence, token index), where the mask key comes from (seed, epoch, stream). So the
masks of a sequence depend on nothing but where it sits in the epoch's order: not on the micro batch
size, the world size, the worker count, or what was read before (exact resume, elastic resume).

Word rule (whole-word masking), from the tokenizer's word-start table
(:meth:`~data_pipeline.text.tokenizer_kinds.TextTokenizer.word_starts`): for SentencePiece a word
starts at a piece that begins with "▁" (its word boundary marker); for WordPiece at every piece that
does NOT begin with "##" (its continuation prefix); for byte-level BPE at a piece beginning with "Ġ".
Unknown, control and special pieces are words of their own, and the first content token after a
special ([CLS], [SEP], or a [SEP] stored inside packed content) always starts a word; byte-fallback
pieces ``<0xNN>`` continue the current word. Specials are never masked. A sequence with ``n`` content
tokens gets ``max(1, round(mask_prob * n))`` masked tokens, reached by taking whole words in random
order; the last word taken may overshoot the target by up to its length minus one.

Special ids come from the data's manifest (:class:`~data_pipeline.formats.text.SpecialIds`), never
from constants: [CLS] is 2 in this project's SentencePiece models and 101 in bert-base-uncased.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from data_pipeline.errors import UserError
from data_pipeline.formats.text import SpecialIds
from data_pipeline.text.tokenizer import spm_word_starts as word_start_table_from_processor
from data_pipeline.text.tokenizer_kinds import word_start_table

__all__ = [
    "IGNORE_INDEX",
    "FramedBatch",
    "MaskingConfig",
    "MaskingVocab",
    "frame_examples",
    "mask_batch",
    "mask_key",
    "masking_vocab",
    "special_table",
    "word_start_table",
    "word_start_table_from_processor",
]

IGNORE_INDEX = -100

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
# Priority bits per word; ties (rare) go to the earlier word of the sequence, so the choice stays a
# function of the sequence alone.
_PRIORITY_BITS = 24


@dataclass
class MaskingConfig:
    """How masked-language-model targets are drawn."""

    mask_prob: float = 0.15
    """Share of the content tokens of each sequence to predict."""
    whole_word: bool = True
    """Mask whole words (see the module docstring for the word rule) instead of single pieces."""
    random_token_prob: float = 0.1
    """Share of the selected tokens replaced by a random non-special id."""
    keep_prob: float = 0.1
    """Share of the selected tokens left unchanged; the rest become [MASK]."""

    def validate(self) -> None:
        """Raise :class:`UserError` naming the field when a probability is out of range."""
        if not 0.0 < self.mask_prob < 1.0:
            raise UserError(f"masking.mask_prob must lie in (0, 1), got {self.mask_prob}")
        for name in ("random_token_prob", "keep_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise UserError(f"masking.{name} must lie in [0, 1], got {value}")
        if self.random_token_prob + self.keep_prob > 1.0:
            raise UserError(
                f"masking.random_token_prob + masking.keep_prob must be at most 1, got "
                f"{self.random_token_prob} + {self.keep_prob}"
            )


def mix64(values: NDArray[np.uint64]) -> NDArray[np.uint64]:
    """SplitMix64 finaliser: a bijective, well-mixed hash of 64-bit integers (wrapping arithmetic)."""
    x = values ^ (values >> np.uint64(30))
    x *= _MIX1
    x ^= x >> np.uint64(27)
    x *= _MIX2
    x ^= x >> np.uint64(31)
    return x


def mask_key(seed: int, epoch: int, stream: int) -> np.uint64:
    """The 64-bit key of one masking stream (train epochs and validation use different streams)."""
    key = np.uint64(0)
    with np.errstate(over="ignore"):
        for part in (seed, epoch, stream):
            key = mix64(np.array([key + _GOLDEN + np.uint64(part & 0xFFFFFFFFFFFFFFFF)]))[0]
    return key


def special_table(vocab_size: int, special: SpecialIds) -> NDArray[np.bool_]:
    """Bool over the vocabulary: ids that are never masked (PAD, CLS, SEP, MASK; UNK is content)."""
    table = np.zeros(vocab_size, dtype=bool)
    table[list(special.never_masked)] = True
    return table


@dataclass(frozen=True)
class MaskingVocab:
    """The per-id tables of one tokenizer that masking reads."""

    word_starts: NDArray[np.bool_]
    """``(vocab,)`` True where a piece starts a word."""
    never_masked: NDArray[np.bool_]
    """``(vocab,)`` True for PAD, CLS, SEP and MASK."""
    random_ids: NDArray[np.int64]
    """Ids a random replacement is drawn from: every id but the five specials, ascending."""
    mask_id: int
    """The [MASK] id."""


def masking_vocab(word_starts: NDArray[np.bool_], special: SpecialIds) -> MaskingVocab:
    """The :class:`MaskingVocab` of a tokenizer's word-start table and special ids.

    Raises:
        UserError: A special id outside the vocabulary.
    """
    size = len(word_starts)
    if max(special.ids) >= size:
        raise UserError(f"special ids {special.as_tokens()} do not fit a vocabulary of {size}")
    allowed = np.ones(size, dtype=bool)
    allowed[list(special.ids)] = False
    return MaskingVocab(word_starts, special_table(size, special), np.flatnonzero(allowed), special.mask)


@dataclass
class FramedBatch:
    """Framed, padded, unmasked sequences; every array is ``(batch, seq_len)``."""

    input_ids: NDArray[np.int64]
    token_type_ids: NDArray[np.int64]
    attention_mask: NDArray[np.int64]


def frame_examples(
    tokens: NDArray[np.integer],
    starts: NDArray[np.int64],
    len_a: NDArray[np.int64],
    len_b: NDArray[np.int64],
    seq_len: int,
    special: SpecialIds,
) -> FramedBatch:
    """Frame ``[CLS] A [SEP] (B [SEP])`` and pad with [PAD] to ``seq_len`` (a fixed shape).

    Args:
        tokens: Flat content tokens; sequence ``i`` is ``tokens[starts[i] : starts[i] + len_a[i] + len_b[i]]``.
        starts: ``(batch,)`` offset of each sequence in ``tokens``.
        len_a: ``(batch,)`` length of segment A.
        len_b: ``(batch,)`` length of segment B (0: no B and no second [SEP]).
        seq_len: Padded length, framing included; every sequence must fit.
        special: The tokenizer's [PAD], [CLS] and [SEP] ids (the manifest's).
    """
    t = np.arange(seq_len, dtype=np.int64)[None, :]  # (1, seq_len)
    start, a, b = starts[:, None], len_a[:, None], len_b[:, None]  # (batch, 1)
    in_a = (t >= 1) & (t <= a)
    in_b = (t >= a + 2) & (t < a + 2 + b)
    # Segment A sits one slot right of its source (after [CLS]), B two slots (after [CLS] and [SEP]).
    source = np.where(in_a, start + t - 1, start + t - 2)
    content = in_a | in_b
    np.clip(source, 0, max(len(tokens) - 1, 0), out=source)
    ids = np.where(content, tokens[source] if len(tokens) else 0, special.pad).astype(np.int64, copy=False)
    ids[:, 0] = special.cls
    total = a + b + np.where(b > 0, 3, 2)  # (batch, 1) real tokens incl. framing
    ids[(t == a + 1) | ((t == total - 1) & (b > 0))] = special.sep
    attention = t < total
    token_types = (t >= a + 2) & attention
    return FramedBatch(ids, token_types.astype(np.int64), attention.astype(np.int64))


def _words(
    eligible: NDArray[np.bool_], starts: NDArray[np.bool_]
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Flat position of each word's first token and each word's length (words are runs of content)."""
    flat_eligible = eligible.ravel()
    first = np.flatnonzero(starts.ravel())
    content_before = np.cumsum(flat_eligible)[first] - 1  # content tokens before each word
    lengths = np.diff(content_before, append=np.count_nonzero(flat_eligible))
    return first, lengths


def _hashes(
    flat_positions: NDArray[np.int64], row_base: NDArray[np.uint64], seq_len: int, key: np.uint64
) -> NDArray[np.uint64]:
    """Hash of (key, sequence position, token index) at flat ``(row * seq_len + token)`` positions."""
    with np.errstate(over="ignore"):
        counters = row_base[flat_positions // seq_len] + flat_positions.astype(np.uint64)
        return mix64(counters * _GOLDEN + key)


def choose_words(
    word_lengths: NDArray[np.int64],
    word_rows: NDArray[np.int64],
    priorities: NDArray[np.uint64],
    targets: NDArray[np.int64],
) -> NDArray[np.bool_]:
    """Per row, take words in priority order until their lengths reach the row's target.

    A word is taken when the tokens already taken in its row are fewer than the target, so the
    last word taken may overshoot. Words are laid out ``(rows, most words in a row)`` and sorted
    row by row (many short sorts are much cheaper than one long one).

    Args:
        word_lengths: ``(words,)`` tokens per word, words ordered by row then position.
        word_rows: ``(words,)`` row of each word (non-decreasing).
        priorities: ``(words,)`` random priority below ``2**24``; ties go to the earlier word.
        targets: ``(rows,)`` tokens to mask per row.
    """
    rows = len(targets)
    per_row = np.bincount(word_rows, minlength=rows)
    row_first = np.concatenate([[0], np.cumsum(per_row)[:-1]])
    rank = np.arange(len(word_rows)) - row_first[word_rows]  # word index within its row
    width = max(1, int(per_row.max(initial=0)))
    slot = word_rows * width + rank  # flat index into (rows, width)
    rank_bits = max(1, (width - 1).bit_length())
    dtype = np.uint32 if _PRIORITY_BITS + rank_bits <= 32 else np.uint64
    # Padding slots get the top priority and ranks past every word of the row: they sort last.
    padding = (dtype((1 << _PRIORITY_BITS) - 1) << dtype(rank_bits)) | np.arange(width, dtype=dtype)
    keys = np.repeat(padding[None, :], rows, axis=0)
    keys.ravel()[slot] = (priorities.astype(dtype) << dtype(rank_bits)) | rank.astype(dtype)
    keys.sort(axis=1)
    # (rows, width) flat slots in priority order within each row
    order = (keys & dtype((1 << rank_bits) - 1)).astype(np.int64) + np.arange(0, rows * width, width)[:, None]
    lengths = np.zeros(rows * width, dtype=np.int64)
    lengths[slot] = word_lengths
    sorted_lengths = lengths[order]
    taken_before = np.cumsum(sorted_lengths, axis=1) - sorted_lengths
    chosen = np.zeros(rows * width, dtype=bool)
    chosen[order] = (taken_before < targets[:, None]) & (sorted_lengths > 0)
    return chosen[slot]


def mask_batch(
    input_ids: NDArray[np.int64],
    positions: NDArray[np.int64],
    key: np.uint64,
    vocab: MaskingVocab,
    config: MaskingConfig,
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Draw MLM targets for a framed batch.

    Args:
        input_ids: ``(batch, seq_len)`` framed ids (not modified).
        positions: ``(batch,)`` global position of each sequence: its random stream.
        key: :func:`mask_key` of the (seed, epoch, stream).
        vocab: :func:`masking_vocab` of the tokenizer (word starts, specials, replacement ids).
        config: Probabilities and whole-word switch.

    Returns:
        ``(masked_ids, labels)``, both ``(batch, seq_len)`` int64; labels hold the original id at
        selected positions and -100 elsewhere.
    """
    batch, seq_len = input_ids.shape
    eligible = ~vocab.never_masked[input_ids]  # (batch, seq_len)
    if config.whole_word:
        after_special = np.ones_like(eligible)
        after_special[:, 1:] = ~eligible[:, :-1]
        starts = eligible & (vocab.word_starts[input_ids] | after_special)
    else:
        starts = eligible
    first, lengths = _words(eligible, starts)
    # Counter of token t of row r: positions[r] * seq_len + t = row_base[r] + (r * seq_len + t).
    with np.errstate(over="ignore"):
        row_base = (positions.astype(np.uint64) - np.arange(batch, dtype=np.uint64)) * np.uint64(seq_len)
    priorities = _hashes(first, row_base, seq_len, key) >> np.uint64(64 - _PRIORITY_BITS)
    content = np.count_nonzero(eligible, axis=1)
    targets = np.where(content > 0, np.maximum(1, np.floor(config.mask_prob * content + 0.5)), 0).astype(
        np.int64
    )
    chosen = choose_words(lengths, first // seq_len, priorities, targets)
    chosen_first, chosen_lengths = first[chosen], lengths[chosen]
    # Expand chosen words to their token positions: first + 0, 1, ..., length - 1.
    offsets = np.arange(int(chosen_lengths.sum())) - np.repeat(
        np.cumsum(chosen_lengths) - chosen_lengths, chosen_lengths
    )
    selected = np.repeat(chosen_first, chosen_lengths) + offsets
    return _replace(input_ids, selected, _hashes(selected, row_base, seq_len, key), vocab, config)


def _replace(
    input_ids: NDArray[np.int64],
    selected: NDArray[np.int64],
    hashes: NDArray[np.uint64],
    vocab: MaskingVocab,
    config: MaskingConfig,
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Apply 80/10/10 (by default) to the selected flat positions, drawing from the low 16 hash bits."""
    flat_ids = input_ids.ravel()
    labels = np.full_like(flat_ids, IGNORE_INDEX)
    labels[selected] = flat_ids[selected]
    masked_ids = flat_ids.copy()
    draw = hashes & np.uint64(0xFFFF)
    mask_cut = round((1.0 - config.random_token_prob - config.keep_prob) * 65536)
    random_cut = mask_cut + round(config.random_token_prob * 65536)
    masked_ids[selected[draw < mask_cut]] = vocab.mask_id
    randomised = (draw >= mask_cut) & (draw < random_cut)
    if randomised.any():
        with np.errstate(over="ignore"):
            second = mix64(hashes[randomised] ^ _MIX2) >> np.uint64(32)
        span = np.uint64(len(vocab.random_ids))
        # A uniform index into the replacement ids (every id but the specials).
        index = ((second * span) >> np.uint64(32)).astype(np.int64)
        masked_ids[selected[randomised]] = vocab.random_ids[index]
    return masked_ids.reshape(input_ids.shape), labels.reshape(input_ids.shape)
