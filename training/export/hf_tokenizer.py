"""HuggingFace tokenizer files for an export: tokenizer.json + configs built from a SentencePiece unigram
model, or the WordPiece/BPE/Unigram tokenizer.json a run was trained with, written as it is.

The result encodes like ``SentencePieceProcessor.encode`` for the models this project trains: the same
pieces and scores (Unigram), SentencePiece's own precompiled NFKC normalisation map, its whitespace
handling (strip, collapse runs of spaces, dummy ``▁`` prefix), digit splitting and byte fallback.
``[CLS] A [SEP] (B [SEP])`` framing comes from a template post-processor, as in BERT.

Not reproduced: BPE SentencePiece models (no tokenizer.json is written for them), user-defined symbols,
sampling (``enable_sampling``) and custom normalisation rule TSVs other than the precompiled map.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram

from data_pipeline.errors import UserError
from data_pipeline.formats.text import SPECIAL_TOKENS, SpecialIds
from data_pipeline.text.hf_tokenizer import HFTokenizer

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
SPACE_PIECE = "▁"  # SentencePiece's visible space (U+2581)
_UNIGRAM = 1  # TrainerSpec.model_type enum value
_USER_DEFINED = 4  # ModelProto.SentencePiece.Type enum value


@dataclass(frozen=True)
class SpmSettings:
    """The parts of a SentencePiece model proto that decide how text is split."""

    model_type: int
    byte_fallback: bool
    split_digits: bool
    precompiled_charsmap: bytes
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool
    escape_whitespaces: bool
    user_defined: tuple[str, ...]


def _model_proto() -> type:
    """The ``ModelProto`` message class; transformers ships one that works with any protobuf >= 4."""
    from transformers.utils import sentencepiece_model_pb2_new

    return sentencepiece_model_pb2_new.ModelProto


def read_spm_settings(model_bytes: bytes, source: str) -> SpmSettings:
    """Parse the trainer and normaliser settings of a serialised SentencePiece model.

    Raises:
        UserError: The bytes are not a SentencePiece model (naming ``source``).
    """
    proto = _model_proto()()
    try:
        proto.ParseFromString(model_bytes)
    except Exception as error:  # protobuf raises its own DecodeError
        raise UserError(f"tokenizer {source}: not a SentencePiece model: {error}") from error
    if not proto.pieces:
        raise UserError(f"tokenizer {source}: not a SentencePiece model (no pieces)")
    spec = proto.normalizer_spec
    return SpmSettings(
        model_type=proto.trainer_spec.model_type,
        byte_fallback=proto.trainer_spec.byte_fallback,
        split_digits=proto.trainer_spec.split_digits,
        precompiled_charsmap=bytes(spec.precompiled_charsmap),
        add_dummy_prefix=spec.add_dummy_prefix,
        remove_extra_whitespaces=spec.remove_extra_whitespaces,
        escape_whitespaces=spec.escape_whitespaces,
        user_defined=tuple(piece.piece for piece in proto.pieces if piece.type == _USER_DEFINED),
    )


def unsupported_reason(settings: SpmSettings) -> str | None:
    """Why an equivalent tokenizer.json cannot be built honestly, or None when it can."""
    if settings.model_type != _UNIGRAM:
        return "only SentencePiece unigram models are converted (this one is BPE/word/char)"
    if settings.user_defined:
        return f"user-defined symbols {list(settings.user_defined)[:5]} are not converted"
    if not settings.escape_whitespaces:
        return "models trained with escape_whitespaces=false are not converted"
    return None


def _normalizer(settings: SpmSettings) -> normalizers.Normalizer:
    """SentencePiece's normalisation in its own order: charsmap (NFKC), spaces, then the dummy prefix."""
    steps: list[normalizers.Normalizer] = []
    if settings.precompiled_charsmap:
        steps.append(normalizers.Precompiled(settings.precompiled_charsmap))
    if settings.remove_extra_whitespaces:
        # Only spaces: SentencePiece leaves other whitespace (newlines, tabs after the charsmap) alone.
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    steps.append(normalizers.Replace(" ", SPACE_PIECE))
    if settings.add_dummy_prefix:
        # The Metaspace pre-tokenizer adds no prefix to text that already starts with "▁"; SentencePiece
        # always does, so double a leading "▁" (Metaspace then sees the prefix as already present).
        steps.append(normalizers.Replace(Regex(rf"\A{SPACE_PIECE}"), SPACE_PIECE * 2))
    return normalizers.Sequence(steps)


def _pre_tokenizer(settings: SpmSettings) -> pre_tokenizers.PreTokenizer:
    """Dummy prefix, split at each ``▁`` (pieces never span words), digits one by one if trained so."""
    steps: list[pre_tokenizers.PreTokenizer] = [
        pre_tokenizers.Metaspace(
            replacement=SPACE_PIECE,
            prepend_scheme="always" if settings.add_dummy_prefix else "never",
            split=True,
        )
    ]
    if settings.split_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    return pre_tokenizers.Sequence(steps)


def build_tokenizer(spm_model_path: Path) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` that gives the same ids as the SentencePiece model at ``spm_model_path``.

    Raises:
        UserError: The file is missing, not a SentencePiece model, or of a kind that is not converted.
    """
    if not spm_model_path.is_file():
        raise UserError(f"tokenizer {spm_model_path}: no such file")
    model_bytes = spm_model_path.read_bytes()
    settings = read_spm_settings(model_bytes, str(spm_model_path))
    reason = unsupported_reason(settings)
    if reason is not None:
        raise UserError(f"tokenizer {spm_model_path}: {reason}")
    processor = spm.SentencePieceProcessor(model_proto=model_bytes)
    size = processor.get_piece_size()
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(size)]
    tokenizer = Tokenizer(Unigram(vocab, unk_id=processor.unk_id(), byte_fallback=settings.byte_fallback))
    tokenizer.normalizer = _normalizer(settings)
    tokenizer.pre_tokenizer = _pre_tokenizer(settings)
    steps = [decoders.Replace(SPACE_PIECE, " ")]
    if settings.byte_fallback:
        steps.append(decoders.ByteFallback())
    steps += [decoders.Fuse(), decoders.Strip(content=" ", left=1 if settings.add_dummy_prefix else 0)]
    tokenizer.decoder = decoders.Sequence(steps)
    # Control symbols ([PAD] [CLS] [SEP] [MASK], and [UNK]) are never produced from text by SentencePiece;
    # as special added tokens they are matched only when written literally, as HF tokenizers expect.
    controls = [i for i in range(size) if processor.is_control(i) or processor.is_unknown(i)]
    tokenizer.add_special_tokens([AddedToken(processor.id_to_piece(i), normalized=False) for i in controls])
    cls, sep = SPECIAL_TOKENS[2], SPECIAL_TOKENS[3]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, processor.piece_to_id(cls)), (sep, processor.piece_to_id(sep))],
    )
    return tokenizer


def write_hf_tokenizer(spm_model_path: Path, out_dir: Path, model_max_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for ``AutoTokenizer``.

    Args:
        spm_model_path: The SentencePiece model the run was trained with.
        out_dir: The export directory.
        model_max_length: Longest input the model takes (its ``max_position_embeddings``).

    Raises:
        UserError: As :func:`build_tokenizer`.
    """
    tokenizer = build_tokenizer(spm_model_path)
    tokenizer.save(str(out_dir / TOKENIZER_FILE))
    write_tokenizer_configs(out_dir, dict(zip(SPECIAL_ROLES, SPECIAL_TOKENS)), model_max_length)


# The transformers names of the BERT specials, in ``SPECIAL_TOKENS`` order.
SPECIAL_ROLES = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")


def special_token_names(tokenizer: Tokenizer, special: SpecialIds) -> dict[str, str]:
    """``{"pad_token": "[PAD]", ...}``: the piece of each special id in ``tokenizer``."""
    return {role: str(tokenizer.id_to_token(token_id)) for role, token_id in zip(SPECIAL_ROLES, special.ids)}


def write_trained_tokenizer(tokenizer: HFTokenizer, out_dir: Path, model_max_length: int | None) -> None:
    """Write the files of a HuggingFace-kind tokenizer as the run used them (tokenizer.json, and vocab.txt
    for WordPiece); with ``model_max_length`` also tokenizer_config.json and special_tokens_map.json.

    Args:
        tokenizer: The run's tokenizer.
        out_dir: The export directory.
        model_max_length: Longest input the model takes; None writes no transformers configs (native).
    """
    for name, data in tokenizer.files().items():
        (out_dir / name).write_bytes(data)
    if model_max_length is not None:
        names = special_token_names(tokenizer.tokenizer, tokenizer.special_ids)
        write_tokenizer_configs(out_dir, names, model_max_length)


def write_tokenizer_configs(out_dir: Path, special: dict[str, str], model_max_length: int) -> None:
    """tokenizer_config.json and special_tokens_map.json, for ``AutoTokenizer`` over tokenizer.json."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
        **special,
    }
    (out_dir / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out_dir / SPECIAL_TOKENS_MAP_FILE).write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
