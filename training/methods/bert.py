"""BERT's masked-language-model pre-training (with the NSP/SOP head when the data has sentence labels)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from training import engine as ds
from training.config import Config, ModelConfig
from training.data.loader import StepLoader
from training.data.mixture import MixtureLoader, text_mixture_loader
from training.data.text import TextSource, source_validation_batches, text_loader, validation_source
from training.dtypes import DTYPES
from training.flops import bert_train_flops_per_sequence, mfu, peak_flops
from training.masking import MaskingConfig
from training.methods.base import MethodContext, MicroStep, stack_sums, val_split_problem
from training.models.bert import BertForPreTraining
from training.models.bert_config import BertConfig, bert_config

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels", "next_sentence_label")
SUM_NAMES = ("loss", "mlm_correct", "mlm_count", "mlm_loss", "nsp_loss", "nsp_correct", "nsp_count")
"""What a micro-batch adds up (the nsp entries are zeros for a model without the sentence head)."""
VAL_SUM_NAMES = ("loss", "batches", "mlm_correct", "mlm_count")
BertLoader = StepLoader[TextSource] | MixtureLoader[TextSource]
"""One data set, or a weighted mixture whose ``source`` (the first) stands for what all sources share."""


def bert_config_from_section(
    section: ModelConfig,
    vocab_size: int,
    seq_len: int,
    next_sentence_head: bool,
    pad_token_id: int | None = None,
) -> BertConfig:
    """The BERT architecture of a ``model:`` config section, for a vocabulary and sequence length.

    ``pad_token_id`` is the tokenizer's [PAD] id; None keeps ``BertConfig``'s default.
    """
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
        pad_token_id=pad_token_id,
    )


def model_config_for(
    config: Config, vocab_size: int, seq_len: int, sentence_task: str, pad_token_id: int | None = None
) -> BertConfig:
    """The BERT architecture from the ``model:`` section, the manifest's sentence task (nsp/sop/none) and
    its tokenizer's [PAD] id."""
    head = config.model.next_sentence_head
    next_sentence_head = (sentence_task != "none") if head == "auto" else bool(head)
    return bert_config_from_section(config.model, vocab_size, seq_len, next_sentence_head, pad_token_id)


def to_device(batch: dict[str, Any], device: torch.device, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The model inputs of a batch on ``device`` (sample ids and unused labels left out)."""
    return {key: batch[key].to(device, non_blocking=True) for key in keys if key in batch}


@dataclass
class BertMethod:
    """MLM (+ sentence head) on text shards; see :class:`training.methods.base.Method`."""

    context: MethodContext
    loader: BertLoader
    bert_config: BertConfig
    model: BertForPreTraining
    validation: TextSource | None = None
    """The ``val`` split, or None when the run does not validate (decided at start)."""
    name: str = "bert"
    optimizer: torch.optim.Optimizer | None = None
    progress_keys: tuple[str, ...] = ("loss", "mlm_acc", "lr", "samples_per_s")
    sum_names: tuple[str, ...] = SUM_NAMES

    @property
    def model_config(self) -> dict[str, Any]:
        return dataclasses.asdict(self.bert_config)

    @property
    def data_fingerprint(self) -> str | None:
        return self.loader.source.manifest["tokenizer"]["sha256"]

    @property
    def input_keys(self) -> tuple[str, ...]:
        # The sentence labels only go to a model that has the sentence head.
        return MODEL_INPUTS if self.bert_config.next_sentence_head else MODEL_INPUTS[:-1]

    def forward(self, engine: Any, batch: dict[str, Any], step: int, micro: int) -> MicroStep:
        output = engine(**to_device(batch, self.context.env.device, self.input_keys))
        # Summed on the device so that no micro-step waits for the GPU.
        zero = torch.zeros((), device=output.loss.device)
        nsp = (output.nsp_loss, output.nsp_correct, output.nsp_count)
        values = {"loss": output.loss, "mlm_correct": output.mlm_correct, "mlm_count": output.mlm_count}
        values["mlm_loss"] = output.mlm_loss
        values.update(zip(SUM_NAMES[4:], (zero if value is None else value for value in nsp), strict=True))
        sums = stack_sums(SUM_NAMES, values)
        return MicroStep(
            output.loss, sums, int(batch["attention_mask"].sum()), int(batch["input_ids"].shape[0])
        )

    def step_metrics(self, sums: Mapping[str, float], micro_batches: int) -> dict[str, float]:
        metrics = {
            "loss": sums["loss"] / micro_batches,
            "mlm_loss": sums["mlm_loss"] / micro_batches,
            "mlm_acc": sums["mlm_correct"] / max(sums["mlm_count"], 1.0),
        }
        if sums["nsp_count"] > 0:
            metrics["nsp_loss"] = sums["nsp_loss"] / micro_batches
            metrics["nsp_acc"] = sums["nsp_correct"] / sums["nsp_count"]
        return metrics

    def evaluate(self, engine: Any) -> dict[str, float]:
        """Mean validation loss and MLM accuracy over ``train.val_batches`` micro-batches per rank.

        Empty when the run does not validate (no usable ``val`` split, see :func:`build_bert`).
        """
        if self.validation is None:
            return {}
        env, config = self.context.env, self.context.config
        engine.eval()
        totals = torch.zeros(len(VAL_SUM_NAMES), dtype=torch.float64, device=env.device)
        batches = source_validation_batches(
            self.validation,
            micro_batch_size=self.context.ds_config["train_micro_batch_size_per_gpu"],
            rank=env.rank,
            world_size=env.world_size,
            max_batches=config.train.val_batches,
        )
        with torch.no_grad():
            for batch in batches:
                output = engine(**to_device(batch, env.device, self.input_keys))
                one = torch.ones((), device=env.device)
                values = {"loss": output.loss, "batches": one}
                values.update(mlm_correct=output.mlm_correct, mlm_count=output.mlm_count)
                totals += stack_sums(VAL_SUM_NAMES, values)
        dist.all_reduce(totals)
        sums = dict(zip(VAL_SUM_NAMES, totals.cpu().tolist(), strict=True))
        engine.train()
        return {
            "val_loss": sums["loss"] / max(sums["batches"], 1.0),
            "val_mlm_acc": sums["mlm_correct"] / max(sums["mlm_count"], 1.0),
        }

    def rates(self, samples_per_s: float, tokens_per_s: float) -> dict[str, float]:
        record = {"samples_per_s": samples_per_s, "tokens_per_s": tokens_per_s}
        env = self.context.env
        peak = peak_flops(env.device, DTYPES[ds.precision(self.context.ds_config)])
        if peak:
            flops = bert_train_flops_per_sequence(
                self.bert_config, self.loader.source.seq_len, self.context.config.data.mask_prob
            )
            record["mfu"] = mfu(flops * samples_per_s, peak * env.world_size)
        return record


def validation_for(
    context: MethodContext, masking: MaskingConfig, manifest: dict[str, Any]
) -> TextSource | None:
    """The ``val`` split when the run validates (``train.val_every``) and the split can be evaluated.

    Decided at start: data without a usable ``val`` split (a small corpus) trains without validation,
    with a warning, rather than failing at the first validation step.
    """
    config = context.config
    if not config.train.val_every:
        return None
    problem = val_split_problem(manifest, context.env.world_size, "samples")
    if problem is not None:
        context.warn(f"validation skipped: {problem} (train.val_every={config.train.val_every} is ignored)")
        return None
    return validation_source(
        context.data_dir, seed=config.train.seed, masking=masking, verify=context.verify_shards
    )


def bert_loader(context: MethodContext, masking: MaskingConfig) -> BertLoader:
    """The training loader: of ``--data``, or of the weighted mixture of ``data.sources``."""
    config, env, ds_config = context.config, context.env, context.ds_config
    common: dict[str, Any] = {
        "global_batch_size": ds_config["train_batch_size"],
        "micro_batch_size": ds_config["train_micro_batch_size_per_gpu"],
        "rank": env.rank,
        "world_size": env.world_size,
        "seed": config.train.seed,
        "masking": masking,
        "num_workers": config.data.num_workers,
        "verify": context.verify_shards,
    }
    if not config.data.sources:
        return text_loader(context.data_dir, **common)
    sources = [(str(source.path), float(source.weight or 0)) for source in config.data.sources]
    mixture = text_mixture_loader(sources, **common)
    if env.is_main:
        print(mixture.describe(), flush=True)
    return mixture


def build_bert(context: MethodContext) -> BertMethod:
    """Loader of the text shards, the ``val`` split (when used) and the BERT model they call for.

    In a mixture (``data.sources``) the ``val`` split is the first source's.
    """
    config, env = context.config, context.env
    masking = MaskingConfig(mask_prob=config.data.mask_prob, whole_word=config.data.whole_word_mask)
    loader = bert_loader(context, masking)
    validation = validation_for(context, masking, loader.source.manifest)
    source = loader.source
    bert = model_config_for(
        config, source.vocab_size, source.seq_len, source.objective, source.special_ids.pad
    )
    init_from = context.init_from
    model = BertForPreTraining(bert) if init_from is None else initial_bert(init_from, context, source, bert)
    return BertMethod(context, loader, model.config, model.to(env.device), validation)


def initial_bert(
    path: str, context: MethodContext, source: TextSource, fresh: BertConfig
) -> BertForPreTraining:
    """The model of ``--init-from PATH``: PATH's architecture and weights, the sentence head as ``fresh``'s.

    Imported here: reading exports and checkpoints is only needed by runs that start from one.
    """
    from training.init_weights import DataFacts, initial_model

    facts = DataFacts(
        data_dir=context.data_dir,
        vocab_size=source.vocab_size,
        tokenizer_sha256=source.manifest["tokenizer"].get("sha256"),
        seq_len=source.seq_len,
        pad_token_id=fresh.pad_token_id,
    )
    return initial_model(path, context.config.model, facts, fresh.next_sentence_head, context.env.is_main)
