"""The fine-tuning run under the DeepSpeed engine: build, train an epoch, evaluate, keep the best, stop early.

The loop is the same for text and image tasks; a task kind (:data:`TASK_KINDS`: :class:`~training.finetune.
text_task.TextTask`, :class:`~training.finetune.images.ImageTask`) supplies the model, the batches, the
predictions, the scores and the export of the best epoch.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from numpy.typing import NDArray

from training import engine as ds
from training.checkpoint import write_atomic
from training.deepspeed_config import resolve_deepspeed, zero_stage
from training.finetune.base import FinetuneOptions, Task
from training.finetune.config import (
    IMAGE_TASK_TYPES,
    LOWER_IS_BETTER,
    FinetuneConfig,
    config_yaml,
    metric_name,
    warmup_steps,
)
from training.finetune.images import ImageTask
from training.finetune.text_task import TextTask
from training.metrics import MetricsWriter
from training.seeding import seed_everything

TASK_KINDS: dict[str, Callable[[FinetuneConfig, FinetuneOptions], Task]] = {
    "text": TextTask,
    "image": ImageTask,
}
"""Task kind -> its builder; ``task.type`` picks the kind (see :func:`task_kind`)."""


def task_kind(config: FinetuneConfig) -> str:
    """``image`` for image task types, else ``text``."""
    return "image" if config.task.type in IMAGE_TASK_TYPES else "text"


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


@dataclass
class FinetuneRun:
    """One rank's fine-tuning run; :func:`build` makes it, :meth:`fit` runs it."""

    config: FinetuneConfig
    options: FinetuneOptions
    env: ds.DistEnv
    task: Task
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

    def train_epoch(self, epoch: int) -> float:
        """One pass over the training rows; returns the mean training loss (over ranks and micro-batches)."""
        self.engine.train()
        global_batch = self.ds_config["train_batch_size"]
        micro = self.ds_config["train_micro_batch_size_per_gpu"]
        losses = torch.zeros(2, dtype=torch.float64)  # loss sum, micro-batches
        for indices in epoch_order(self.task.train_rows, global_batch, self.config.train.seed, epoch):
            step_losses = torch.zeros(2, dtype=torch.float64)
            for micro_indices in rank_micro_batches(indices, self.env.rank, self.env.world_size, micro):
                batch = self.task.batch(micro_indices.tolist(), "train", epoch, self.env.device)
                output = self.engine(**batch)
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
        shard = eval_shard(self.task.eval_rows, self.env.rank, self.env.world_size)
        size = self.config.train.eval_batch_size
        mine: list[Any] = []
        with torch.no_grad():
            for start in range(0, len(shard), size):
                indices = shard[start : start + size].tolist()
                output = self.engine(**self.task.batch(indices, "eval", 0, self.env.device))
                mine += self.task.predictions(output.logits, indices)
        gathered: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(gathered, mine)
        predictions = [item for part in gathered for item in part][: self.task.eval_rows]
        metrics, shown, labels = self.task.score(predictions)
        return Evaluation(metrics, shown, labels)

    def save_best(self, epoch: int, evaluation: Evaluation) -> None:
        """Write RUN_DIR/best/ and RUN_DIR/predictions.jsonl (the state is gathered on every rank)."""
        state = gather_state(self.engine, self.ds_config)
        if self.env.is_main:
            self.task.write_best(
                self.options.run_dir / "best",
                state,
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


def build(config: FinetuneConfig, options: FinetuneOptions) -> FinetuneRun:
    """Read the model and the data (user errors surface here, before any process group), then join the
    process group and build the engine."""
    seed_everything(config.train.seed)
    task = TASK_KINDS[task_kind(config)](config, options)
    env = ds.setup_distributed()
    global_batch = config.deepspeed.get("train_batch_size")
    batch_known = isinstance(global_batch, int) and global_batch > 0
    steps_per_epoch = math.ceil(task.train_rows / global_batch) if batch_known else 1
    total_steps = config.train.epochs * steps_per_epoch
    ds_config = resolve_deepspeed(config.deepspeed, env.world_size, total_steps, warmup_steps(total_steps))
    engine = ds.build_engine(task.model.to(env.device), ds_config)
    if env.is_main:
        options.run_dir.mkdir(parents=True, exist_ok=True)
        (options.run_dir / "config.yaml").write_text(config_yaml(config), encoding="utf-8")
        print("resolved config:\n" + config_yaml(config), flush=True)
    dist.barrier()
    writer = MetricsWriter(options.run_dir, enabled=env.is_main)
    run = FinetuneRun(config, options, env, task, ds_config, engine, writer, task.trainable)
    log_decisions(run, steps_per_epoch)
    return run


def log_decisions(run: FinetuneRun, steps_per_epoch: int) -> None:
    """The choices of this run, printed once on rank 0."""
    model = run.engine.module
    # ZeRO-3 leaves each rank a partition; ds_numel is the full size.
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    total = sum(size for size, _ in sizes)
    trainable = sum(size for size, trains in sizes if trains)
    run.log(
        f"{run.task.describe()} | freeze {run.config.train.freeze} | "
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
