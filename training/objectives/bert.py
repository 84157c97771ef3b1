"""BERT's masked-language-model objective (with the NSP/SOP head when the data has sentence labels)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from training import engine as ds
from training.config import Config, ModelConfig
from training.data import MaskingConfig, PretrainLoader, validation_batches
from training.flops import bert_train_flops_per_sequence, mfu, peak_flops
from training.models.bert import BertConfig, BertForPreTraining, bert_config
from training.objectives.base import MicroStep, ObjectiveContext

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels", "next_sentence_label")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bert_config_from_section(
    section: ModelConfig, vocab_size: int, seq_len: int, next_sentence_head: bool
) -> BertConfig:
    """The BERT architecture of a ``model:`` config section, for a vocabulary and sequence length."""
    return bert_config(
        section.size,
        vocab_size,
        hidden_size=section.hidden_size,
        num_hidden_layers=section.num_hidden_layers,
        num_attention_heads=section.num_attention_heads,
        intermediate_size=section.intermediate_size,
        max_position_embeddings=max(512, seq_len),
        hidden_dropout_prob=section.dropout,
        attention_probs_dropout_prob=section.dropout,
        pre_layernorm=section.pre_layernorm,
        activation_checkpointing=section.activation_checkpointing,
        next_sentence_head=next_sentence_head,
    )


def model_config_for(config: Config, vocab_size: int, seq_len: int, objective: str) -> BertConfig:
    """The BERT architecture from the ``model:`` section and the data manifest."""
    head = config.model.next_sentence_head
    next_sentence_head = (objective != "none") if head == "auto" else bool(head)
    return bert_config_from_section(config.model, vocab_size, seq_len, next_sentence_head)


def to_device(batch: dict[str, Any], device: torch.device, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The model inputs of a batch on ``device`` (sample ids and unused labels left out)."""
    return {key: batch[key].to(device, non_blocking=True) for key in keys if key in batch}


@dataclass
class BertObjective:
    """MLM (+ sentence head) on text shards; see :class:`training.objectives.base.Objective`."""

    context: ObjectiveContext
    loader: PretrainLoader
    bert_config: BertConfig
    model: BertForPreTraining
    name: str = "bert"
    optimizer: torch.optim.Optimizer | None = None
    progress_keys: tuple[str, ...] = ("loss", "mlm_acc", "lr", "samples_per_s")

    @property
    def model_config(self) -> dict[str, Any]:
        return dataclasses.asdict(self.bert_config)

    @property
    def data_fingerprint(self) -> str | None:
        return self.loader.manifest["tokenizer"]["sha256"]

    @property
    def input_keys(self) -> tuple[str, ...]:
        # The sentence labels only go to a model that has the sentence head.
        return MODEL_INPUTS if self.bert_config.next_sentence_head else MODEL_INPUTS[:-1]

    @property
    def masking(self) -> MaskingConfig:
        data = self.context.config.data
        return MaskingConfig(mask_prob=data.mask_prob, whole_word=data.whole_word_mask)

    def forward(self, engine: Any, batch: dict[str, Any], step: int, micro: int) -> MicroStep:
        output = engine(**to_device(batch, self.context.env.device, self.input_keys))
        # Summed on the device so that no micro-step waits for the GPU: loss, mlm correct, mlm count,
        # mlm loss, then nsp loss, correct and count (zeros for a model without the sentence head).
        zero = torch.zeros((), device=output.loss.device)
        nsp = (output.nsp_loss, output.nsp_correct, output.nsp_count)
        values = (output.loss.detach(), output.mlm_correct, output.mlm_count, output.mlm_loss.detach())
        values += tuple(zero if value is None else value.detach() for value in nsp)
        sums = torch.stack([value.double() for value in values])
        return MicroStep(
            output.loss, sums, int(batch["attention_mask"].sum()), int(batch["input_ids"].shape[0])
        )

    def step_metrics(self, sums: torch.Tensor, micro_batches: int) -> dict[str, float]:
        metrics = {
            "loss": float(sums[0] / micro_batches),
            "mlm_loss": float(sums[3] / micro_batches),
            "mlm_acc": float(sums[1] / max(float(sums[2]), 1.0)),
        }
        if float(sums[6]) > 0:
            metrics["nsp_loss"] = float(sums[4] / micro_batches)
            metrics["nsp_acc"] = float(sums[5] / sums[6])
        return metrics

    def evaluate(self, engine: Any) -> dict[str, float]:
        """Mean validation loss and MLM accuracy over ``train.val_batches`` micro-batches per rank."""
        env, config = self.context.env, self.context.config
        engine.eval()
        totals = torch.zeros(4, dtype=torch.float64, device=env.device)  # loss sum, batches, correct, count
        batches = validation_batches(
            self.context.data_dir,
            micro_batch_size=self.context.ds_config["train_micro_batch_size_per_gpu"],
            rank=env.rank,
            world_size=env.world_size,
            seed=config.train.seed,
            masking=self.masking,
            max_batches=config.train.val_batches,
        )
        with torch.no_grad():
            for batch in batches:
                output = engine(**to_device(batch, env.device, self.input_keys))
                one = torch.ones((), device=env.device)
                values = (output.loss, one, output.mlm_correct, output.mlm_count)
                totals += torch.stack([value.double() for value in values])
        dist.all_reduce(totals)
        totals = totals.cpu()
        engine.train()
        return {
            "val_loss": float(totals[0] / max(totals[1], 1.0)),
            "val_mlm_acc": float(totals[2] / max(totals[3], 1.0)),
        }

    def rates(self, samples_per_s: float, tokens_per_s: float) -> dict[str, float]:
        record = {"samples_per_s": samples_per_s, "tokens_per_s": tokens_per_s}
        env = self.context.env
        peak = peak_flops(env.device, DTYPES[ds.precision(self.context.ds_config)])
        if peak:
            flops = bert_train_flops_per_sequence(
                self.bert_config, self.loader.seq_len, self.context.config.data.mask_prob
            )
            record["mfu"] = mfu(flops * samples_per_s, peak * env.world_size)
        return record


def build_bert(context: ObjectiveContext) -> BertObjective:
    """Loader of the text shards and the BERT model they call for."""
    config, env, ds_config = context.config, context.env, context.ds_config
    loader = PretrainLoader(
        context.data_dir,
        global_batch_size=ds_config["train_batch_size"],
        micro_batch_size=ds_config["train_micro_batch_size_per_gpu"],
        rank=env.rank,
        world_size=env.world_size,
        seed=config.train.seed,
        masking=MaskingConfig(mask_prob=config.data.mask_prob, whole_word=config.data.whole_word_mask),
        num_workers=config.data.num_workers,
    )
    bert = model_config_for(config, loader.vocab_size, loader.seq_len, loader.objective)
    return BertObjective(context, loader, bert, BertForPreTraining(bert).to(env.device))
