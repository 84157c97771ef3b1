"""BERT for pre-training in plain PyTorch, with the parameter names of ``transformers.BertForPreTraining``."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from training.models.bert_config import IGNORE_INDEX, BertConfig, ModelConfigError

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,  # exact (erf) GELU, what transformers calls "gelu"
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


@dataclass
class PretrainingOutput:
    """What ``BertForPreTraining.forward`` returns; counts are device tensors so reading them is deferred.

    Attributes:
        loss: ``mlm_loss`` plus ``nsp_loss`` when both exist; None without labels.
        mlm_loss: Mean cross-entropy over the masked positions (0 when there are none).
        nsp_loss: Mean cross-entropy of the sentence classifier, or None without its labels.
        mlm_correct: Number of masked positions whose argmax is the label.
        mlm_count: Number of masked positions (labels != -100).
        nsp_correct: Number of right sentence predictions, or None.
        nsp_count: Number of sentence labels, or None.
        prediction_logits: (n_masked, vocab) for the masked positions in row-major order, or the full
            (batch, seq, vocab) when no labels were given.
        seq_relationship_logits: (batch, 2), or None without a next-sentence head.
    """

    loss: torch.Tensor | None
    mlm_loss: torch.Tensor | None
    nsp_loss: torch.Tensor | None
    mlm_correct: torch.Tensor | None
    mlm_count: torch.Tensor | None
    nsp_correct: torch.Tensor | None
    nsp_count: torch.Tensor | None
    prediction_logits: torch.Tensor
    seq_relationship_logits: torch.Tensor | None


class BertEmbeddings(nn.Module):
    """Word + segment + position embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        if seq_len > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_position_embeddings "
                f"{self.position_embeddings.num_embeddings}"
            )
        # Tables are read through their modules only (never .weight directly): ZeRO-3 gathers a partitioned
        # parameter in its module's forward hook.
        if token_type_ids is None:
            token_type_ids = input_ids.new_zeros(1)  # segment 0, broadcast over (batch, seq)
        positions = torch.arange(seq_len, device=input_ids.device)  # the same 0..seq-1 in every row
        embeddings = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        embeddings = embeddings + self.position_embeddings(positions)  # (batch, seq, hidden)
        return self.dropout(self.LayerNorm(embeddings))


class BertSelfAttention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention`` (fused kernels where available)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_prob = config.attention_probs_dropout_prob

    def _heads(self, projected: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = projected.shape
        # (batch, seq, hidden) -> (batch, heads, seq, head_dim)
        return projected.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        query, key, value = (
            self._heads(self.query(hidden)),
            self._heads(self.key(hidden)),
            self._heads(self.value(hidden)),
        )
        # key_mask: (batch, 1, 1, seq) bool, True where a key may be attended to.
        context = F.scaled_dot_product_attention(
            query, key, value, attn_mask=key_mask, dropout_p=self.dropout_prob if self.training else 0.0
        )  # (batch, heads, seq, head_dim)
        return context.transpose(1, 2).flatten(2)  # (batch, seq, hidden)


class BertResidualOutput(nn.Module):
    """Projection, dropout and the residual join of a sub-layer (``attention.output`` and ``output``).

    Post-LN (original BERT): ``LayerNorm(residual + dropout(dense(x)))``. Pre-LN: ``residual +
    dropout(dense(x))``, and the same ``LayerNorm`` is applied by the caller to the sub-layer's input, so the
    parameter names stay those of transformers.
    """

    def __init__(self, config: BertConfig, in_features: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.pre_layernorm = config.pre_layernorm

    def forward(self, sublayer_output: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        projected = self.dropout(self.dense(sublayer_output))
        if self.pre_layernorm:
            return residual + projected
        return self.LayerNorm(projected + residual)

    def normalize_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """The sub-layer's input: normalised in pre-LN, unchanged in post-LN."""
        return self.LayerNorm(hidden) if self.pre_layernorm else hidden


class BertAttention(nn.Module):
    """Self-attention sub-layer: ``self`` (q/k/v) and ``output`` (projection + residual)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertResidualOutput(config, config.hidden_size)

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(self.output.normalize_input(hidden), key_mask), hidden)


class BertIntermediate(nn.Module):
    """First half of the feed-forward block: widen and activate."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = _ACTIVATIONS[config.hidden_act]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden))


class BertLayer(nn.Module):
    """One transformer layer: attention then feed-forward, each with its residual join."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertResidualOutput(config, config.intermediate_size)

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        hidden = self.attention(hidden, key_mask)
        return self.output(self.intermediate(self.output.normalize_input(hidden)), hidden)


class BertEncoder(nn.Module):
    """The layer stack, with optional per-layer activation checkpointing and the pre-LN final LayerNorm."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        # Pre-LN leaves the residual stream unnormalised; the heads expect a normalised one.
        if config.pre_layernorm:
            self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.activation_checkpointing = config.activation_checkpointing
        self.pre_layernorm = config.pre_layernorm

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layer:
            if recompute:
                # Non-reentrant checkpointing restores the RNG state, so dropout masks are recomputed equal.
                hidden = checkpoint(layer, hidden, key_mask, use_reentrant=False)
            else:
                hidden = layer(hidden, key_mask)
        return self.LayerNorm(hidden) if self.pre_layernorm else hidden


class BertPooler(nn.Module):
    """Dense + tanh on the [CLS] position, the input of the sentence classifier."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class BertModel(nn.Module):
    """Embeddings, encoder and (with a next-sentence head) the pooler: the ``bert.`` prefix."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if config.next_sentence_head else None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        # (batch, seq) 0/1 -> (batch, 1, 1, seq) bool, broadcast over heads and query positions.
        key_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        return self.encoder(self.embeddings(input_ids, token_type_ids), key_mask)


class BertPredictionHeadTransform(nn.Module):
    """Dense + activation + LayerNorm applied before the vocabulary projection."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = _ACTIVATIONS[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.activation(self.dense(hidden)))


class BertLMPredictionHead(nn.Module):
    """MLM head: the transform, then the decoder tied to the word embeddings."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.decoder.bias = self.bias  # the same tensor under two names, as in transformers

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden))


class BertPreTrainingHeads(nn.Module):
    """The ``cls.`` prefix: MLM predictions and (optionally) the two-way sentence classifier."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2) if config.next_sentence_head else None


class BertForPreTraining(nn.Module):
    """BERT with MLM (and NSP/SOP) heads; its state_dict is that of ``transformers.BertForPreTraining``.

    With ``next_sentence_head=False`` the pooler and classifier are absent and the state_dict is that of
    ``transformers.BertForMaskedLM``. Compatibility with transformers holds for post-LN models only.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.cls = BertPreTrainingHeads(config)
        self.apply(self._init_weights)
        # Tie after initialising, so the decoder's own init does not overwrite the embeddings.
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        nn.init.zeros_(self.cls.predictions.bias)

    def _init_weights(self, module: nn.Module) -> None:
        """transformers' BERT init: N(0, initializer_range) weights, zero biases, LayerNorm 1/0."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        next_sentence_label: torch.Tensor | None = None,
    ) -> PretrainingOutput:
        """Run the model; the MLM head sees only positions with a label.

        Args:
            input_ids: (batch, seq) token ids.
            attention_mask: (batch, seq), 1 for real tokens and 0 for padding. Defaults to all real.
            token_type_ids: (batch, seq) segment ids. Defaults to segment 0 everywhere.
            labels: (batch, seq) target ids, -100 where there is nothing to predict. Without labels the
                vocabulary logits of every position are returned and there is no loss.
            next_sentence_label: (batch,) 0/1 sentence-pair labels; needs ``next_sentence_head``.
        """
        sequence_output = self.bert(input_ids, attention_mask, token_type_ids)  # (batch, seq, hidden)
        seq_relationship_logits = None
        if self.cls.seq_relationship is not None:
            seq_relationship_logits = self.cls.seq_relationship(self.bert.pooler(sequence_output))
        if labels is None:
            return PretrainingOutput(
                loss=None,
                mlm_loss=None,
                nsp_loss=None,
                mlm_correct=None,
                mlm_count=None,
                nsp_correct=None,
                nsp_count=None,
                prediction_logits=self.cls.predictions(sequence_output),  # (batch, seq, vocab)
                seq_relationship_logits=seq_relationship_logits,
            )
        mlm_loss, mlm_correct, mlm_count, prediction_logits = self._masked_lm(sequence_output, labels)
        nsp_loss = nsp_correct = nsp_count = None
        if next_sentence_label is not None:
            if seq_relationship_logits is None:
                raise ValueError(
                    "next_sentence_label given, but the model was built with next_sentence_head=False"
                )
            nsp_loss = F.cross_entropy(seq_relationship_logits.float(), next_sentence_label)
            nsp_correct = (seq_relationship_logits.argmax(-1) == next_sentence_label).sum()
            nsp_count = torch.full((), next_sentence_label.numel(), device=next_sentence_label.device)
        loss = mlm_loss if nsp_loss is None else mlm_loss + nsp_loss
        return PretrainingOutput(
            loss=loss,
            mlm_loss=mlm_loss,
            nsp_loss=nsp_loss,
            mlm_correct=mlm_correct,
            mlm_count=mlm_count,
            nsp_correct=nsp_correct,
            nsp_count=nsp_count,
            prediction_logits=prediction_logits,
            seq_relationship_logits=seq_relationship_logits,
        )

    def _masked_lm(
        self, sequence_output: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss, correct count, count and logits of the MLM head over the labelled positions only.

        Gathering first makes the (hidden x vocab) projection, the costliest matmul of a small BERT, run on
        ~15% of the positions instead of all of them.
        """
        flat_labels = labels.reshape(-1)
        # One host sync (nonzero) to learn how many positions there are; the rest stays on the device.
        positions = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)  # (n_masked,)
        targets = flat_labels.index_select(0, positions)
        hidden = sequence_output.reshape(-1, sequence_output.shape[-1]).index_select(0, positions)
        logits = self.cls.predictions(hidden)  # (n_masked, vocab)
        count = torch.full((), positions.numel(), device=labels.device)
        # Sum / max(count, 1): the mean over labelled positions, and 0 rather than NaN when there are none.
        loss = F.cross_entropy(logits.float(), targets, reduction="sum") / count.clamp_min(1)
        correct = (logits.argmax(-1) == targets).sum()
        return loss, correct, count, logits

    def num_parameters(self) -> int:
        """Number of distinct parameters (the tied decoder weight and bias counted once)."""
        return sum(parameter.numel() for parameter in self.parameters())

    def hf_config(self) -> dict[str, object]:
        """A transformers ``BertConfig`` as a config.json dict, to load this model's state_dict unchanged.

        Raises:
            ModelConfigError: for a pre-LN model, which transformers' BERT cannot represent.
        """
        config = self.config
        if config.pre_layernorm:
            raise ModelConfigError(
                "a pre_layernorm BERT has no transformers equivalent; export needs post-LN"
            )
        hf_fields = {k: v for k, v in asdict(config).items() if k not in _NON_HF_FIELDS}
        architecture = "BertForPreTraining" if config.next_sentence_head else "BertForMaskedLM"
        return {
            "architectures": [architecture],
            "model_type": "bert",
            **hf_fields,
            "position_embedding_type": "absolute",
            "tie_word_embeddings": True,
        }


_NON_HF_FIELDS = frozenset({"pre_layernorm", "activation_checkpointing", "next_sentence_head"})


def save_hf_pretrained(model: BertForPreTraining, out_dir: Path) -> Path:
    """Write config.json and model.safetensors that ``transformers`` ``from_pretrained`` loads as they are.

    The state_dict is saved under its own names (no renaming); tied tensors are stored once, as
    transformers does, and re-tied on load.

    Args:
        model: A post-LN model.
        out_dir: Directory to create or fill.

    Returns:
        ``out_dir``.
    """
    from safetensors.torch import save_model

    config = model.hf_config()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_model(model, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir
