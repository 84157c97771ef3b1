"""Task models on the BERT encoder (pure PyTorch): sequence classification, regression, token tagging.

Parameter names: the encoder keeps the pre-training names under ``bert.`` (without the pooler); the task
head lives under ``head.``. For ``cls`` pooling the head owns BERT's tanh pooler, initialised from the
pre-trained next-sentence pooler when the model has one, so ``head`` freezing (a linear probe) trains
the pooler and the output layer and nothing of the encoder.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline.errors import UserError
from training.models.bert import BertForPreTraining, BertModel, BertPooler
from training.models.bert_config import IGNORE_INDEX, BertConfig

HEAD_PREFIX = "head."
ENCODER_PREFIX = "bert."
POOLER_PREFIX = "bert.pooler."


class TaskOutput(NamedTuple):
    """What a task model returns (a named tuple: ZeRO-3's hooks look for tensors inside tuples).

    Attributes:
        loss: Mean loss over the labelled rows (or positions); None without labels.
        logits: (batch, classes), (batch,) for regression, or (batch, seq, tags) for token tagging.
    """

    loss: torch.Tensor | None
    logits: torch.Tensor


class SequenceHead(nn.Module):
    """Pooling (BERT's [CLS] pooler or the mean of the tokens), dropout and a linear output layer."""

    def __init__(self, config: BertConfig, outputs: int, dropout: float, pooling: str) -> None:
        super().__init__()
        self.pooler = BertPooler(config) if pooling == "cls" else None
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, outputs)

    def forward(self, sequence_output: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooler is not None:
            pooled = self.pooler(sequence_output)  # (batch, hidden)
        else:
            weights = attention_mask.unsqueeze(-1).to(sequence_output.dtype)  # (batch, seq, 1)
            pooled = (sequence_output * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return self.classifier(self.dropout(pooled))  # (batch, outputs)


class TokenHead(nn.Module):
    """Dropout and a linear layer on every position: (batch, seq, hidden) -> (batch, seq, tags)."""

    def __init__(self, config: BertConfig, outputs: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, outputs)

    def forward(self, sequence_output: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(sequence_output))


class TaskModel(nn.Module):
    """The BERT encoder plus one task head, with the task's loss.

    Args:
        config: Encoder architecture (its ``next_sentence_head`` is ignored: the pooler belongs to the head).
        task_type: ``classification``, ``pair``, ``regression`` or ``tokens``.
        outputs: Classes or tags (1 for regression).
        dropout: Dropout before the output layer.
        pooling: ``cls`` or ``mean`` (sequence tasks).
    """

    def __init__(
        self, config: BertConfig, task_type: str, outputs: int, dropout: float, pooling: str
    ) -> None:
        super().__init__()
        self.config = dataclasses.replace(config, next_sentence_head=False)
        self.task_type = task_type
        self.bert = BertModel(self.config)
        self.head: nn.Module = (
            TokenHead(self.config, outputs, dropout)
            if task_type == "tokens"
            else SequenceHead(self.config, outputs, dropout, pooling)
        )
        # The pre-training initialisation (it reads only ``self.config``), so a random-init baseline
        # starts exactly as pre-training does.
        self.apply(functools.partial(BertForPreTraining._init_weights, self))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> TaskOutput:
        """Encode, apply the head and (with labels) the loss: cross-entropy, or MSE for regression."""
        sequence_output = self.bert(input_ids, attention_mask, token_type_ids)  # (batch, seq, hidden)
        logits = self.head(sequence_output, attention_mask)
        if self.task_type == "regression":
            logits = logits.squeeze(-1)  # (batch,)
        if labels is None:
            return TaskOutput(None, logits)
        return TaskOutput(task_loss(self.task_type, logits, labels), logits)


def task_loss(task_type: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean loss of a batch; token tagging averages over the labelled positions (0 when there are none)."""
    if task_type == "regression":
        return F.mse_loss(logits.float(), labels.float())
    if task_type == "tokens":
        flat_labels = labels.reshape(-1)
        total = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            flat_labels,
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return total / (flat_labels != IGNORE_INDEX).sum().clamp_min(1)
    return F.cross_entropy(logits.float(), labels)


def load_encoder(model: TaskModel, state_dict: dict[str, torch.Tensor], source: str) -> list[str]:
    """Copy pre-trained encoder weights (``bert.*``) into ``model``; the pooler goes to a ``cls`` head.

    Other entries (the MLM head ``cls.*``, a previous task head ``head.*``) are ignored.

    Args:
        model: A freshly built task model.
        state_dict: Weights under the pre-training names.
        source: The model path, for errors.

    Returns:
        The names of the model's parameters that were loaded.

    Raises:
        UserError: An encoder weight missing from ``state_dict`` or of another shape.
    """
    wanted = {}
    for name, tensor in state_dict.items():
        if name.startswith(POOLER_PREFIX):
            target = "head.pooler." + name[len(POOLER_PREFIX) :]
            if getattr(model.head, "pooler", None) is not None:
                wanted[target] = tensor
        elif name.startswith(ENCODER_PREFIX):
            wanted[name] = tensor
    own = model.state_dict()
    missing = sorted(name for name in own if name.startswith(ENCODER_PREFIX) and name not in wanted)
    if missing:
        raise UserError(f"--model {source}: no weights for {missing[0]} (and {len(missing) - 1} more)")
    for name, tensor in wanted.items():
        if name not in own:
            raise UserError(f"--model {source}: weight {name} does not fit this architecture")
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise UserError(
                f"--model {source}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(own[name].shape)}"
            )
    model.load_state_dict(wanted, strict=False)
    return sorted(wanted)


def trainable_prefixes(config: BertConfig, top_layers: int | None) -> tuple[str, ...] | None:
    """Name prefixes of the parameters that train: None for all, the head alone, or head + top K layers.

    Raises:
        UserError: K larger than the number of encoder layers.
    """
    if top_layers is None:
        return None
    layers = config.num_hidden_layers
    if top_layers > layers:
        raise UserError(f"--freeze top-{top_layers}: the encoder has only {layers} layers")
    prefixes = [HEAD_PREFIX] + [
        f"bert.encoder.layer.{index}." for index in range(layers - top_layers, layers)
    ]
    if top_layers and config.pre_layernorm:
        prefixes.append("bert.encoder.LayerNorm.")  # pre-LN's final norm sits above the top layer
    return tuple(prefixes)


def apply_freeze(model: TaskModel, top_layers: int | None) -> list[str]:
    """Set ``requires_grad`` by :func:`trainable_prefixes`; return the names of the trainable parameters."""
    prefixes = trainable_prefixes(model.config, top_layers)
    trainable = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(prefixes is None or name.startswith(prefixes))
        if parameter.requires_grad:
            trainable.append(name)
    return trainable
