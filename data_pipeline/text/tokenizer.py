"""SentencePiece training with the BERT specials at fixed ids, loading a trained model, and the model as a
:class:`~data_pipeline.text.tokenizer_kinds.TextTokenizer`."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import IO

import numpy as np
import sentencepiece as spm
from numpy.typing import NDArray

from data_pipeline.errors import UserError
from data_pipeline.formats.manifest import DEFAULT_TOKENIZER_KIND
from data_pipeline.formats.text import CLS_ID, MASK_ID, PAD_ID, SEP_ID, SPECIAL_TOKENS, UNK_ID, SpecialIds
from data_pipeline.text.tokenizer_kinds import TextTokenizer, word_start_table

MODEL_FILE = "spm.model"
VOCAB_FILE = "spm.vocab"
MODEL_TYPES = ("unigram", "bpe")
# What `pretrain tokenizer --kind` trains.
TRAINED_KINDS = ("sentencepiece", "wordpiece")
# SentencePiece skips longer lines; sentences longer than this are rare and cut rather than lost.
MAX_SENTENCE_BYTES = 4192


def trainer_options(
    vocab_size: int,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    input_sentence_size: int = 2_000_000,
    num_threads: int | None = None,
) -> dict[str, object]:
    """The SentencePiece trainer options: BERT specials at ids 0-4, byte fallback, split digits.

    Args:
        vocab_size: Pieces in the vocabulary, the 5 specials included.
        model_type: ``unigram`` or ``bpe``. Defaults to ``unigram``.
        character_coverage: Share of characters covered by plain pieces; the rest fall back to bytes.
            Defaults to 0.9995.
        input_sentence_size: Most sentences SentencePiece samples for training. Defaults to 2,000,000.
        num_threads: Trainer threads. Defaults to all cores.
    """
    if model_type not in MODEL_TYPES:
        raise UserError(f"--model-type {model_type!r}: expected one of {', '.join(MODEL_TYPES)}")
    if vocab_size < 300:
        # Byte fallback alone needs 256 pieces, plus the specials.
        raise UserError(f"--vocab-size {vocab_size}: must be at least 300 (256 byte pieces + specials)")
    return {
        "vocab_size": vocab_size,
        "model_type": model_type,
        "pad_id": PAD_ID,
        "unk_id": UNK_ID,
        "bos_id": CLS_ID,
        "eos_id": SEP_ID,
        "pad_piece": SPECIAL_TOKENS[PAD_ID],
        "unk_piece": SPECIAL_TOKENS[UNK_ID],
        "bos_piece": SPECIAL_TOKENS[CLS_ID],
        "eos_piece": SPECIAL_TOKENS[SEP_ID],
        "control_symbols": [SPECIAL_TOKENS[MASK_ID]],
        "byte_fallback": True,
        "split_digits": True,
        "character_coverage": character_coverage,
        "input_sentence_size": input_sentence_size,
        "shuffle_input_sentence": True,
        "max_sentence_length": MAX_SENTENCE_BYTES,
        "num_threads": num_threads or os.cpu_count() or 1,
        "minloglevel": 2,
    }


@dataclass
class SampleStats:
    """What went into a tokenizer training sample."""

    documents: int = 0
    sentences: int = 0
    characters: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


def write_sentences(sentences: Iterable[str], sink: IO[str], stats: SampleStats) -> None:
    """One sentence per line, inner newlines flattened, each cut to SentencePiece's line limit."""
    for sentence in sentences:
        line = " ".join(sentence.split())
        if not line:
            continue
        encoded = line.encode("utf-8")
        if len(encoded) > MAX_SENTENCE_BYTES:
            line = encoded[:MAX_SENTENCE_BYTES].decode("utf-8", errors="ignore")
        sink.write(line + "\n")
        stats.sentences += 1
        stats.characters += len(line)


def train_sentencepiece(
    sentence_file: str, out_dir: str, options: dict[str, object], seed: int = 12345
) -> str:
    """Train on ``sentence_file`` and write ``out_dir/spm.model`` and ``out_dir/spm.vocab``.

    The trainer reads the sentences through an iterator and writes the model to memory, so that no
    temporary or output path is recorded inside the model: the same sample, seed and thread count
    give a byte-identical model wherever it is written.

    Args:
        sentence_file: A local text file, one sentence per line.
        out_dir: Where the model and vocabulary go (created when missing).
        options: :func:`trainer_options`.
        seed: Seeds SentencePiece's sentence sampling. Defaults to 12345.

    Returns:
        The path of the model file.
    """
    # The trainer has no seed option; its sentence sampling draws from this process-wide generator.
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        with open(sentence_file, encoding="utf-8") as sentences:
            spm.SentencePieceTrainer.train(
                sentence_iterator=(line.rstrip("\n") for line in sentences), model_writer=model, **options
            )
    except RuntimeError as error:
        # e.g. "Vocabulary size too high": the sample is too small for the requested vocabulary.
        raise UserError(
            f"SentencePiece training on {sentence_file} failed (lower --vocab-size or give more text): {error}"
        ) from error
    processor = load_processor(model_proto=model.getvalue())
    model_path = os.path.join(out_dir, MODEL_FILE)
    verify_specials(processor, model_path)
    os.makedirs(out_dir, exist_ok=True)
    with open(model_path, "wb") as handle:
        handle.write(model.getvalue())
    with open(os.path.join(out_dir, VOCAB_FILE), "w", encoding="utf-8") as handle:
        handle.writelines(
            f"{processor.IdToPiece(piece_id)}\t{processor.GetScore(piece_id):g}\n"
            for piece_id in range(processor.GetPieceSize())
        )
    return model_path


def resolve_model_path(path: str) -> str:
    """A ``.model`` file, or a directory holding ``spm.model``; a :class:`UserError` otherwise."""
    candidate = os.path.join(path, MODEL_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(candidate):
        raise UserError(f"--tokenizer {path}: no SentencePiece model at {candidate}")
    return candidate


def load_processor(path: str | None = None, model_proto: bytes | None = None) -> spm.SentencePieceProcessor:
    """Load a SentencePiece model from a local file or from its serialized bytes."""
    processor = spm.SentencePieceProcessor()
    try:
        if model_proto is not None:
            processor.LoadFromSerializedProto(model_proto)
        else:
            processor.Load(path)
    except (OSError, RuntimeError) as error:
        raise UserError(f"tokenizer {path or '<bytes>'}: not a SentencePiece model ({error})") from error
    return processor


def special_ids(processor: spm.SentencePieceProcessor) -> dict[str, int]:
    """Id of each BERT special piece in ``processor``."""
    return {piece: processor.PieceToId(piece) for piece in SPECIAL_TOKENS}


def verify_specials(processor: spm.SentencePieceProcessor, path: str) -> None:
    """Refuse a model whose specials are not at the fixed ids 0-4 that shards and trainer assume."""
    found = special_ids(processor)
    expected = {piece: index for index, piece in enumerate(SPECIAL_TOKENS)}
    if found != expected:
        raise UserError(
            f"tokenizer {path}: special pieces at {found}, expected {expected}; "
            "train it with `pretrain tokenizer`"
        )


def model_sha256(model_proto: bytes) -> str:
    """Hex sha256 of a serialized model."""
    return hashlib.sha256(model_proto).hexdigest()


def encode_sentences(
    tokenizer: TextTokenizer | spm.SentencePieceProcessor, sentences: list[str]
) -> list[list[int]]:
    """Token ids of each sentence, in one batched call.

    SentencePiece runs on one thread: a document's sentences are too few to repay a thread pool per
    call, and the job already runs one worker process per core.

    Args:
        tokenizer: A :class:`TextTokenizer`, or a loaded SentencePiece processor.
        sentences: The texts.
    """
    if not isinstance(tokenizer, spm.SentencePieceProcessor):
        return tokenizer.encode(sentences)
    return tokenizer.Encode(sentences, out_type=int, num_threads=1) if sentences else []


def spm_word_starts(processor: spm.SentencePieceProcessor) -> NDArray[np.bool_]:
    """Word starts of a SentencePiece model: ``▁`` pieces, unknown and control pieces start words;
    byte-fallback pieces and the rest continue them."""
    ids = range(processor.GetPieceSize())
    return word_start_table(
        [processor.IdToPiece(i) for i in ids],
        [i for i in ids if processor.IsByte(i)],
        [i for i in ids if processor.IsControl(i) or processor.IsUnknown(i)],
    )


class SentencePieceTokenizer:
    """A SentencePiece model with the BERT specials at ids 0-4, as a :class:`TextTokenizer`."""

    kind = DEFAULT_TOKENIZER_KIND

    def __init__(self, model_proto: bytes, source: str) -> None:
        """Load ``model_proto``; refuse it unless its specials sit at the fixed ids (``source`` names it)."""
        self.processor = load_processor(model_proto=model_proto)
        verify_specials(self.processor, source)
        self.model_proto = model_proto
        self.source = source

    @property
    def vocab_size(self) -> int:
        """Pieces in the model."""
        return int(self.processor.GetPieceSize())

    @property
    def special_ids(self) -> SpecialIds:
        """The fixed ids 0-4 (checked when loaded)."""
        return SpecialIds.from_tokens(special_ids(self.processor), f"tokenizer {self.source}")

    @property
    def sha256(self) -> str:
        """Hex sha256 of the serialized model."""
        return model_sha256(self.model_proto)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (see :func:`encode_sentences`)."""
        return encode_sentences(self.processor, list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``."""
        return str(self.processor.Decode([int(i) for i in ids]))

    def word_starts(self) -> NDArray[np.bool_]:
        """See :func:`spm_word_starts`."""
        return spm_word_starts(self.processor)

    def files(self) -> dict[str, bytes]:
        """``spm.model``."""
        return {MODEL_FILE: self.model_proto}
