"""BERT's architecture as a dataclass (the fields of transformers' ``BertConfig``) and the named sizes."""

from __future__ import annotations

from dataclasses import dataclass, fields

from data_pipeline.errors import UserError

ACTIVATION_NAMES = ("gelu", "gelu_new", "relu")
"""The ``hidden_act`` values the model implements (transformers' names)."""

IGNORE_INDEX = -100
"""Label value of positions that carry no MLM target (the convention of PyTorch and transformers)."""


class ModelConfigError(UserError, ValueError):
    """A bad model size, override or dimension. A ``UserError`` so the CLI prints it without a traceback."""


@dataclass
class BertConfig:
    """Architecture of a BERT model; the fields and defaults (BERT-base) are those of transformers."""

    vocab_size: int
    """Number of token ids, specials included (the tokenizer's vocabulary size)."""
    hidden_size: int = 768
    """Width of the residual stream."""
    num_hidden_layers: int = 12
    """Number of transformer layers."""
    num_attention_heads: int = 12
    """Attention heads per layer; must divide ``hidden_size``."""
    intermediate_size: int = 3072
    """Width of the feed-forward block."""
    max_position_embeddings: int = 512
    """Longest sequence the learned position table covers."""
    type_vocab_size: int = 2
    """Number of segment (token type) ids."""
    hidden_dropout_prob: float = 0.1
    """Dropout on embeddings and on each sub-layer output."""
    attention_probs_dropout_prob: float = 0.1
    """Dropout on the attention probabilities."""
    layer_norm_eps: float = 1e-12
    """Epsilon of every LayerNorm."""
    initializer_range: float = 0.02
    """Standard deviation of the normal initialisation of weights."""
    pad_token_id: int = 0
    """Id of [PAD]; its embedding row starts at zero and receives no gradient."""
    hidden_act: str = "gelu"
    """Feed-forward activation: "gelu" (exact, erf), "gelu_new" (tanh approximation) or "relu"."""
    pre_layernorm: bool = False
    """LayerNorm before each sub-layer plus a final one (stabler when deep); not loadable by transformers."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass, trading compute for memory."""
    next_sentence_head: bool = True
    """Build the pooler and the two-way sentence classifier (NSP/SOP); off for MLM-only objectives."""

    def __post_init__(self) -> None:
        if self.hidden_act not in ACTIVATION_NAMES:
            raise ModelConfigError(f"hidden_act {self.hidden_act!r}: expected one of {sorted(ACTIVATION_NAMES)}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ModelConfigError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )


def _dimensions(hidden: int, layers: int, heads: int, intermediate: int) -> dict[str, int]:
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": intermediate,
    }


BERT_SIZES: dict[str, dict[str, int]] = {
    "tiny": _dimensions(128, 2, 2, 512),
    "mini": _dimensions(256, 4, 4, 1024),
    "small": _dimensions(512, 4, 8, 2048),
    "medium": _dimensions(512, 8, 8, 2048),
    "base": _dimensions(768, 12, 12, 3072),
    "large": _dimensions(1024, 24, 16, 4096),
}
"""Standard BERT dimensions by name (Turc et al. 2019 for the small ones, Devlin et al. 2019 for the rest)."""


def bert_config(size: str | None, vocab_size: int, **overrides: object) -> BertConfig:
    """A ``BertConfig`` from a named size plus field overrides.

    Args:
        size: A key of ``BERT_SIZES``, or None for the dataclass defaults (BERT-base).
        vocab_size: The tokenizer's vocabulary size.
        **overrides: ``BertConfig`` fields to set; a value of None leaves the field as the size gives it.

    Raises:
        ModelConfigError: (a ``ValueError``) for an unknown size or field, naming it and the choices.
    """
    if size is not None and size not in BERT_SIZES:
        raise ModelConfigError(f"unknown BERT size {size!r}; choose one of {', '.join(BERT_SIZES)}")
    known = {field.name for field in fields(BertConfig)} - {"vocab_size"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ModelConfigError(f"unknown BERT config field(s) {unknown}; known fields: {sorted(known)}")
    values: dict[str, object] = dict(BERT_SIZES[size]) if size is not None else {}
    values.update({key: value for key, value in overrides.items() if value is not None})
    return BertConfig(vocab_size=vocab_size, **values)  # type: ignore[arg-type]
