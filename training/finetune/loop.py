"""The fine-tuning run under the DeepSpeed engine: build, train an epoch, evaluate, keep the best, stop early.

One process by default; under a launcher every rank takes its share of each global batch and of the
evaluation rows, and rank 0 writes the files:

- ``RUN_DIR/eval.json``: ``{"metric", "best_epoch", "best", "final", "epochs_run", "stopped_early"}``;
- ``RUN_DIR/best/``: an export directory (see :mod:`training.export`) of the best epoch, with the task
  (type, labels, pooling, freezing) under ``finetune`` in config.json and the head's weights (``head.*``)
  in the same model.safetensors;
- ``RUN_DIR/predictions.jsonl``: the best epoch's evaluation predictions, one ``{"index", "prediction",
  "label"}`` per evaluation row in file order;
- ``RUN_DIR/metrics.jsonl`` (+ TensorBoard): training loss and the evaluation metrics of every epoch.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
from numpy.typing import NDArray

from data_pipeline.errors import UserError
from training import engine as ds
from training.checkpoint import write_atomic
from training.finetune.config import (
    LOWER_IS_BETTER,
    FinetuneConfig,
    config_yaml,
    metric_name,
    parse_freeze,
    resolve_deepspeed_config,
    zero_stage,
)
from training.finetune.data import IGNORE_INDEX, Encoded, TaskData, collate, load_task_data
from training.finetune.heads import TaskModel, apply_freeze, load_encoder
from training.finetune.metrics import classification_scores, entity_scores, regression_scores
from training.metrics import MetricsWriter
from training.models.bert import BertConfig, BertForPreTraining, bert_config
from training.trainer import seed_everything


@dataclass
class ModelSource:
    """Where the encoder comes from: its architecture, weights (None: random init) and tokenizer."""

    location: str
    """``--model`` as given (``none`` for the random-init baseline)."""
    model_config: BertConfig
    state_dict: dict[str, torch.Tensor] | None
    """Pre-trained weights under the pre-training names (tied aliases included), or None."""
    spm_path: Path


def _tokenizer_file(path: str) -> Path:
    from data_pipeline.tokenizer import load_processor, resolve_model_path, verify_specials

    model_file = resolve_model_path(path)
    verify_specials(load_processor(model_file), model_file)
    return Path(model_file)


def resolve_source(model: str, tokenizer: str | None, config: FinetuneConfig) -> ModelSource:
    """Read ``--model``: an export or run directory (its own tokenizer), or ``none``.

    ``none`` builds the config's ``model:`` architecture with the vocabulary of ``--tokenizer`` (or the
    config's ``tokenizer``). With a pre-trained model the model's own tokenizer is used; a ``--tokenizer``
    that is a different file is refused rather than silently ignored.

    Raises:
        UserError: No tokenizer for ``none``, a tokenizer that disagrees with the model, or a
            ``task.max_seq_len`` beyond the model's position table.
    """
    max_len = config.task.max_seq_len
    if model == "none":
        if tokenizer is None:
            raise UserError(
                "--model none needs a tokenizer: pass --tokenizer PATH or set `tokenizer:` in the config"
            )
        spm_path = _tokenizer_file(tokenizer)
        section = config.model
        model_config = bert_config(
            section.size,
            spm.SentencePieceProcessor(model_file=str(spm_path)).GetPieceSize(),
            hidden_size=section.hidden_size,
            num_hidden_layers=section.num_hidden_layers,
            num_attention_heads=section.num_attention_heads,
            intermediate_size=section.intermediate_size,
            max_position_embeddings=max(512, max_len),
            hidden_dropout_prob=section.dropout,
            attention_probs_dropout_prob=section.dropout,
            pre_layernorm=section.pre_layernorm,
            next_sentence_head=False,
        )
        return ModelSource(model, model_config, None, spm_path)
    from training.export import load_encoder_weights

    model_config, state_dict, spm_path = load_encoder_weights(model)
    if tokenizer is not None and _tokenizer_file(tokenizer).read_bytes() != Path(spm_path).read_bytes():
        raise UserError(
            f"--tokenizer {tokenizer}: differs from the tokenizer of --model {model} ({spm_path})"
        )
    if max_len > model_config.max_position_embeddings:
        raise UserError(
            f"task.max_seq_len {max_len} exceeds the {model_config.max_position_embeddings} positions of --model {model}"
        )
    return ModelSource(model, model_config, state_dict, Path(spm_path))


def write_task_export(
    out_dir: Path,
    task_state: dict[str, torch.Tensor],
    source: ModelSource,
    config: FinetuneConfig,
    labels: list[str] | None,
    facts: dict[str, Any],
) -> None:
    """An export directory of the fine-tuned model that ``--model`` and the exporter's readers accept.

    The encoder weights are the fine-tuned ``bert.*``; the pre-training heads (MLM, and the sentence
    head when the source had one) are carried over unchanged from the source (freshly initialised for
    ``none``), so the encoder part is a complete pre-training export. The task head's weights are added
    to the same model.safetensors under ``head.*``; config.json describes the task under ``finetune``.
    """
    from safetensors.torch import load_file, save_file

    from training.export import TIED_ALIASES, WEIGHTS_FILE, retie, write_export

    if source.state_dict is not None:
        base, export_config = source.state_dict, source.model_config
    else:
        export_config = source.model_config
        base = BertForPreTraining(export_config).state_dict()
    full = {name: tensor for name, tensor in base.items() if name not in TIED_ALIASES}
    full.update({name: tensor for name, tensor in task_state.items() if name.startswith("bert.")})
    head = {
        name: tensor.float().contiguous() for name, tensor in task_state.items() if name.startswith("head.")
    }
    task = {
        "type": config.task.type,
        "labels": labels,
        "pooling": config.task.pooling,
        "max_seq_len": config.task.max_seq_len,
        "freeze": config.train.freeze,
        "head_weights": sorted(head),
        "columns": {
            key: getattr(config.task, key) for key in ("text", "text_pair", "label", "tokens", "tags")
        },
        "base_model": source.location,
        **facts,
    }
    card = {"source": f"fine-tuned from {source.location}", "metrics": facts}
    write_export(
        out_dir, retie(full), export_config, source.spm_path, card=card, extra_config={"finetune": task}
    )
    weights = out_dir / WEIGHTS_FILE
    merged = {**load_file(str(weights)), **head}
    partial = weights.with_name(weights.name + ".partial")
    save_file(merged, str(partial), metadata={"format": "pt"})
    partial.replace(weights)


@dataclass
class FinetuneOptions:
    """What the command line adds to the config."""

    model: str
    """Export directory, run directory, or ``none`` (random init)."""
    train_path: str
    eval_path: str
    run_dir: Path
    tokenizer: str | None = None
    """SentencePiece model for ``--model none`` (overrides the config's ``tokenizer``)."""


def epoch_order(rows: int, global_batch: int, seed: int, epoch: int) -> list[NDArray[np.int64]]:
    """The global batches of one epoch: a permutation of ``rows`` seeded by (seed, epoch), cut in batches.

    The last batch is filled up from the start of the permutation, so every row is seen each epoch and
    every step has the full global batch.
    """
    order = np.random.default_rng([seed, epoch]).permutation(rows)
    steps = math.ceil(rows / global_batch)
    padded = np.resize(order, steps * global_batch)  # repeats the order from its start
    return [padded[step * global_batch : (step + 1) * global_batch] for step in range(steps)]


def rank_micro_batches(
    global_batch: NDArray[np.int64], rank: int, world_size: int, micro_batch: int
) -> list[NDArray[np.int64]]:
    """This rank's micro-batches of one global batch: micro-batch ``j`` of rank ``r`` is slot ``j*world+r``."""
    slots = len(global_batch) // micro_batch
    return [
        global_batch[slot * micro_batch : (slot + 1) * micro_batch] for slot in range(rank, slots, world_size)
    ]


def eval_shard(rows: int, rank: int, world_size: int) -> NDArray[np.int64]:
    """This rank's evaluation rows, ``ceil(rows / world)`` of them (the last rank repeats row 0 to fill).

    Every rank runs the same number of forward passes, which ZeRO-3's collective parameter gathering needs.
    """
    per_rank = math.ceil(rows / world_size)
    indices = np.arange(rank * per_rank, (rank + 1) * per_rank)
    return np.where(indices < rows, indices, 0)


def is_better(value: float, best: float | None, metric: str) -> bool:
    """Whether ``value`` improves on ``best`` (lower for losses and MSE, higher otherwise)."""
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


@dataclass
class Evaluation:
    """Metrics and per-row predictions of one evaluation."""

    metrics: dict[str, float]
    predictions: list[Any]
    labels: list[Any]


def decode_predictions(logits: torch.Tensor, batch: Sequence[Encoded], task_type: str) -> list[Any]:
    """Class indices, real values, or for ``tokens`` one tag index per word (truncated words: -1)."""
    if task_type == "regression":
        return logits.float().tolist()
    if task_type != "tokens":
        return logits.argmax(-1).tolist()
    best = logits.argmax(-1)  # (batch, seq)
    decoded = []
    for row, item in enumerate(batch):
        first_pieces = [pos for pos, label in enumerate(item.label) if label != IGNORE_INDEX]  # type: ignore[union-attr]
        tags = [int(best[row, pos]) for pos in first_pieces]
        decoded.append(tags + [-1] * (item.words - len(tags)))
    return decoded


def score(
    task_type: str, predictions: list[Any], data: TaskData
) -> tuple[dict[str, float], list[Any], list[Any]]:
    """Metrics of the evaluation predictions, and predictions and labels as names (or values)."""
    if task_type == "regression":
        labels = [float(item.label) for item in data.eval]  # type: ignore[arg-type]
        return regression_scores(predictions, labels), predictions, labels
    names = data.labels or []
    if task_type == "tokens":
        # Words cut off by truncation are predicted "O": they count as missed entities, not as absent.
        predicted = [[names[tag] if tag >= 0 else "O" for tag in row] for row in predictions]
        gold = [example.tags for example in data.eval_examples]
        return entity_scores(predicted, gold), predicted, gold
    gold_ids = [int(item.label) for item in data.eval]  # type: ignore[arg-type]
    scores = classification_scores(predictions, gold_ids)
    return scores, [names[index] for index in predictions], [names[index] for index in gold_ids]


@dataclass
class FinetuneRun:
    """One rank's fine-tuning run; :func:`build` makes it, :meth:`fit` runs it."""

    config: FinetuneConfig
    options: FinetuneOptions
    env: ds.DistEnv
    source: ModelSource
    data: TaskData
    ds_config: dict[str, Any]
    engine: Any
    writer: MetricsWriter
    trainable: list[str]
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def log(self, message: str) -> None:
        """Print on rank 0 only."""
        if self.env.is_main:
            print(message, flush=True)

    def batch(self, indices: Sequence[int], rows: list[Encoded]) -> dict[str, torch.Tensor]:
        tensors = collate([rows[i] for i in indices], self.config.task.type)
        return {key: value.to(self.env.device) for key, value in tensors.items()}

    def train_epoch(self, epoch: int) -> float:
        """One pass over the training rows; returns the mean training loss (over ranks and micro-batches)."""
        self.engine.train()
        global_batch = self.ds_config["train_batch_size"]
        micro = self.ds_config["train_micro_batch_size_per_gpu"]
        losses = torch.zeros(2, dtype=torch.float64)  # loss sum, micro-batches
        for indices in epoch_order(len(self.data.train), global_batch, self.config.train.seed, epoch):
            step_losses = torch.zeros(2, dtype=torch.float64)
            for micro_indices in rank_micro_batches(indices, self.env.rank, self.env.world_size, micro):
                output = self.engine(**self.batch(micro_indices.tolist(), self.data.train))
                self.engine.backward(output.loss)
                self.engine.step()
                step_losses += torch.tensor([float(output.loss.detach()), 1.0], dtype=torch.float64)
            dist.all_reduce(step_losses)
            losses += step_losses
            self.step += 1
            if self.step % self.config.train.log_every == 0:
                loss = float(step_losses[0] / step_losses[1])
                self.writer.log(self.step, {"loss": loss, **ds.optimizer_metrics(self.engine)})
        return float(losses[0] / max(float(losses[1]), 1.0))

    def evaluate(self) -> Evaluation:
        """Predict every evaluation row (shared out over ranks) and score the predictions."""
        self.engine.eval()
        shard = eval_shard(len(self.data.eval), self.env.rank, self.env.world_size)
        size = self.config.train.eval_batch_size
        mine: list[Any] = []
        with torch.no_grad():
            for start in range(0, len(shard), size):
                indices = shard[start : start + size].tolist()
                output = self.engine(**self.batch(indices, self.data.eval))
                mine += decode_predictions(
                    output.logits, [self.data.eval[i] for i in indices], self.config.task.type
                )
        gathered: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(gathered, mine)
        predictions = [item for part in gathered for item in part][: len(self.data.eval)]
        metrics, shown, labels = score(self.config.task.type, predictions, self.data)
        return Evaluation(metrics, shown, labels)

    def save_best(self, epoch: int, evaluation: Evaluation) -> None:
        """Write RUN_DIR/best/ and RUN_DIR/predictions.jsonl (the state is gathered on every rank)."""
        state = gather_state(self.engine, self.ds_config)
        if self.env.is_main:
            write_task_export(
                self.options.run_dir / "best",
                state,
                self.source,
                self.config,
                self.data.labels,
                {"epoch": epoch, metric_name(self.config): evaluation.metrics[metric_name(self.config)]},
            )
            lines = [
                json.dumps({"index": index, "prediction": prediction, "label": label})
                for index, (prediction, label) in enumerate(zip(evaluation.predictions, evaluation.labels))
            ]
            write_atomic(self.options.run_dir / "predictions.jsonl", "\n".join(lines) + "\n")
        dist.barrier()

    def fit(self) -> dict[str, Any]:
        """Train epoch by epoch, evaluate after each, keep the best, stop after ``patience`` bad epochs."""
        train, metric = self.config.train, metric_name(self.config)
        best: dict[str, Any] | None = None
        stale = 0
        for epoch in range(1, train.epochs + 1):
            started = time.perf_counter()
            loss = self.train_epoch(epoch)
            evaluation = self.evaluate()
            record = {"epoch": epoch, "train_loss": loss, **evaluation.metrics}
            self.history.append(record)
            self.writer.log(self.step, {f"eval_{key}": value for key, value in record.items()})
            improved = is_better(evaluation.metrics[metric], best and best[metric], metric)
            self.log(
                f"epoch {epoch}/{train.epochs} | step {self.step} | train loss {loss:.4f} | "
                + " | ".join(f"{key} {value:.4f}" for key, value in evaluation.metrics.items())
                + f" | {time.perf_counter() - started:.1f}s"
                + (" | best" if improved else "")
            )
            if improved:
                best, stale = record, 0
                self.save_best(epoch, evaluation)
            else:
                stale += 1
            self.write_summary(best, record, stopped=False)
            if train.patience and stale >= train.patience and epoch < train.epochs:
                self.log(
                    f"early stop: {metric} did not improve for {stale} epochs (best epoch {best['epoch']})"
                )
                return self.write_summary(best, record, stopped=True)
        return self.write_summary(best, self.history[-1], stopped=False)

    def write_summary(
        self, best: dict[str, Any] | None, final: dict[str, Any], stopped: bool
    ) -> dict[str, Any]:
        """RUN_DIR/eval.json (rank 0); returns its content."""
        summary = {
            "metric": metric_name(self.config),
            "best_epoch": best["epoch"] if best else None,
            "best": {key: value for key, value in (best or {}).items() if key != "epoch"},
            "final": {key: value for key, value in final.items() if key != "epoch"},
            "epochs_run": final["epoch"],
            "stopped_early": stopped,
        }
        if self.env.is_main:
            write_atomic(self.options.run_dir / "eval.json", json.dumps(summary, indent=1) + "\n")
        return summary

    def close(self) -> None:
        self.writer.close()


def gather_state(engine: Any, ds_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The whole module state_dict on CPU; ZeRO-3 parameters are gathered first (every rank must call)."""
    module = engine.module
    if zero_stage(ds_config) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {name: tensor.detach().cpu().clone() for name, tensor in module.state_dict().items()}
    return {name: tensor.detach().cpu().clone() for name, tensor in module.state_dict().items()}


def build_model(config: FinetuneConfig, source: ModelSource, data: TaskData) -> tuple[TaskModel, list[str]]:
    """The task model, its pre-trained weights loaded, with the freezing applied; and what trains."""
    task = config.task
    outputs = 1 if task.type == "regression" else len(data.labels or [])
    model = TaskModel(source.model_config, task.type, outputs, config.train.head_dropout, task.pooling)
    if source.state_dict is not None:
        load_encoder(model, source.state_dict, source.location)
    trainable = apply_freeze(model, parse_freeze(config.train.freeze))
    return model, trainable


def build(config: FinetuneConfig, options: FinetuneOptions) -> FinetuneRun:
    """Read the model and the data (user errors surface here, before any process group), then join the
    process group and build the engine."""
    seed_everything(config.train.seed)
    source = resolve_source(options.model, options.tokenizer or config.tokenizer, config)
    processor = spm.SentencePieceProcessor(model_file=str(source.spm_path))
    data = load_task_data(options.train_path, options.eval_path, processor, config.task)
    model, trainable = build_model(config, source, data)
    env = ds.setup_distributed()
    global_batch = config.deepspeed.get("train_batch_size")
    batch_known = isinstance(global_batch, int) and global_batch > 0
    steps_per_epoch = math.ceil(len(data.train) / global_batch) if batch_known else 1
    ds_config = resolve_deepspeed_config(config, env.world_size, config.train.epochs * steps_per_epoch)
    engine = ds.build_engine(model.to(env.device), ds_config)
    if env.is_main:
        options.run_dir.mkdir(parents=True, exist_ok=True)
        (options.run_dir / "config.yaml").write_text(config_yaml(config), encoding="utf-8")
        print("resolved config:\n" + config_yaml(config), flush=True)
    dist.barrier()
    writer = MetricsWriter(options.run_dir, enabled=env.is_main)
    run = FinetuneRun(config, options, env, source, data, ds_config, engine, writer, trainable)
    log_decisions(run, steps_per_epoch)
    return run


def log_decisions(run: FinetuneRun, steps_per_epoch: int) -> None:
    """The choices of this run, printed once on rank 0."""
    model = run.engine.module
    # ZeRO-3 leaves each rank a partition; ds_numel is the full size.
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    total = sum(size for size, _ in sizes)
    trainable = sum(size for size, trains in sizes if trains)
    truncated = sum(item.truncated for item in run.data.train + run.data.eval)
    run.log(
        f"task {run.config.task.type} | model {run.source.location} | labels "
        f"{len(run.data.labels) if run.data.labels else 'regression'} | train rows {len(run.data.train)} | "
        f"eval rows {len(run.data.eval)} | truncated rows {truncated} | freeze {run.config.train.freeze} | "
        f"trainable parameters {trainable:,} of {total:,} | world size {run.env.world_size} | "
        f"global batch {run.ds_config['train_batch_size']} | steps per epoch {steps_per_epoch} | "
        f"dtype {ds.precision(run.ds_config)} | device {run.env.device}"
    )


def finetune(config: FinetuneConfig, options: FinetuneOptions) -> dict[str, Any]:
    """Run a whole fine-tuning job; returns the content of eval.json.

    The process group stays up afterwards (DeepSpeed keeps its groups for the life of the process, so a
    second job in the same process needs the same group); the command tears it down on exit.
    """
    run = build(config, options)
    try:
        summary = run.fit()
        run.log(summary_table(summary))
        return summary
    finally:
        run.close()


def summary_table(summary: dict[str, Any]) -> str:
    """A short table: each metric at the best and at the final epoch."""
    lines = [f"{'metric':<18}{'best (epoch ' + str(summary['best_epoch']) + ')':>18}{'final':>12}"]
    for key, value in summary["best"].items():
        lines.append(f"{key:<18}{value:>18.4f}{summary['final'][key]:>12.4f}")
    return "\n".join(lines)
