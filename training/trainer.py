"""The pre-training loop as a handful of verbs: build, resume, step, evaluate, save, fit.

The loop is the same for every objective (BERT's MLM, SimCLR): the objective (:mod:`training.objectives`)
supplies the loader, the model, an optional client optimizer, the micro-batch forward, the step metrics and
the evaluation.
"""

from __future__ import annotations

import dataclasses
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.errors import UserError
from training import checkpoint as ckpt
from training import engine as ds
from training.config import (
    Config,
    config_hash,
    config_yaml,
    objective_of,
    resolve_deepspeed_config,
    zero_stage,
)
from training.metrics import MetricsWriter, format_progress
from training.objectives import Objective, ObjectiveContext, build_objective


@dataclass
class RunOptions:
    """What the command line adds to the config for one invocation."""

    data_dir: str
    """Prepared shard directory (holds manifest.json)."""
    run_dir: Path
    """Where metrics, checkpoints, traces and the resolved config go."""
    max_steps: int | None = None
    """Stop (and save) at this step; the LR schedule still spans ``train.total_steps``."""
    resume: str = "auto"
    """``auto`` (latest complete checkpoint of run_dir, if any), ``never``, or a checkpoint tag folder."""
    trace_samples: bool = False
    """Append the ids of consumed samples to run_dir/trace/rankNNNNN.txt."""


@dataclass
class Progress:
    """Counters saved in every checkpoint."""

    step: int = 0
    tokens_seen: int = 0
    samples_seen: int = 0


@dataclass
class ResumePlan:
    """A checkpoint to continue from, read before the engine exists (it decides the DeepSpeed config)."""

    load_dir: Path
    """Folder holding the tag folder DeepSpeed loads (the original tag or its universal conversion)."""
    tag: str
    state: dict[str, Any]
    source: Path
    """The original tag folder (its per-rank RNG files)."""
    universal: bool


class StopRequest:
    """SIGTERM or SIGUSR1 ask the run to finish the current step, save and exit 0.

    Any rank may receive it; the flag is summed over ranks with the step's metrics, so all ranks stop
    after the same step and save one checkpoint together.
    """

    def __init__(self) -> None:
        self.requested = False
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; on CPU also demand deterministic kernels (bit-exact resume)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if not torch.cuda.is_available():
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Deterministic mode would also NaN-fill every torch.empty; DeepSpeed allocates gradient buckets
        # of hundreds of MB per step that it overwrites anyway, and the fill made steps 20x slower.
        torch.utils.deterministic.fill_uninitialized_memory = False


def find_resume_tag(resume: str, checkpoint_dir: Path) -> Path | None:
    """The tag folder ``--resume`` selects, or None to start fresh.

    Raises:
        UserError: A PATH that is not a complete checkpoint.
    """
    if resume == "never":
        return None
    if resume == "auto":
        return ckpt.latest_complete(checkpoint_dir)
    path = Path(resume)
    if not ckpt.is_complete(path):
        raise UserError(
            f"--resume {resume}: not a complete checkpoint tag folder (no {ckpt.COMPLETE_MARKER})"
        )
    return path


def plan_resume(tag_dir: Path, env: ds.DistEnv, objective: Objective) -> ResumePlan:
    """Check a checkpoint fits this run and convert it to a universal one if the world size changed.

    Raises:
        UserError: A checkpoint of another objective, architecture or tokenizer.
    """
    state = ckpt.read_trainer_state(tag_dir)
    saved_objective = state.get("objective", "bert")  # checkpoints from before SimCLR are BERT's
    if saved_objective != objective.name:
        raise UserError(
            f"checkpoint {tag_dir}: trained with objective {saved_objective!r}, this config trains {objective.name!r}"
        )
    ckpt.check_compatible(tag_dir, state, objective.model_config, objective.data_fingerprint)
    if not ds.needs_universal_conversion(state["world_size"], env.world_size, state["zero_stage"]):
        return ResumePlan(tag_dir.parent, tag_dir.name, state, tag_dir, universal=False)
    universal = tag_dir.with_name(tag_dir.name + ckpt.UNIVERSAL_SUFFIX)
    if env.is_main and not universal.is_dir():
        print(
            f"converting {tag_dir} (world size {state['world_size']}, ZeRO-{state['zero_stage']}) "
            f"to a universal checkpoint for world size {env.world_size}",
            flush=True,
        )
        ds.convert_to_universal(tag_dir, universal)
    dist.barrier()
    return ResumePlan(tag_dir.parent, universal.name, state, tag_dir, universal=True)


@dataclass
class Trainer:
    """One rank's training run. :func:`build` makes it; :meth:`fit` runs it."""

    config: Config
    options: RunOptions
    env: ds.DistEnv
    objective: Objective
    ds_config: dict[str, Any]
    engine: Any
    writer: MetricsWriter
    progress: Progress = field(default_factory=Progress)
    trace: ckpt.SampleTrace | None = None
    trace_lengths: dict[str, int] = field(default_factory=dict)
    batches: Iterator[dict[str, Any]] | None = None
    stop: StopRequest = field(default_factory=StopRequest)
    last_saved: int = -1

    @property
    def checkpoint_dir(self) -> Path:
        return self.options.run_dir / "checkpoints"

    @property
    def loader(self) -> Any:
        """The objective's resumable training loader."""
        return self.objective.loader

    def log(self, message: str) -> None:
        """Print on rank 0 only."""
        if self.env.is_main:
            print(message, flush=True)

    def resume(self, plan: ResumePlan | None) -> None:
        """Load the planned checkpoint (or start fresh), then start the batch stream.

        RNG states are restored last, after the data iterator exists: creating a DataLoader iterator
        draws from torch's generator, which an uninterrupted run did once at its very start.
        """
        if plan is not None:
            ds.load_checkpoint(self.engine, plan.load_dir, plan.tag)
            # The JSON copy of the client state: every rank reads the same, whatever the ZeRO stage.
            state = plan.state
            self.progress = Progress(state["step"], state["tokens_seen"], state["samples_seen"])
            self.loader.load_state_dict(state["loader"])
            # Traces of another run directory (``--resume OTHER_RUN/checkpoints/TAG``) stay there: this run's
            # traces start empty at the resumed step.
            own_checkpoint = plan.source.parent.resolve() == self.checkpoint_dir.resolve()
            self.trace_lengths = dict(state.get("trace_lengths", {})) if own_checkpoint else {}
            self.last_saved = self.progress.step
            self.log(
                f"resumed from {plan.source} at step {self.progress.step}"
                + (" (universal checkpoint)" if plan.universal else "")
            )
        if self.env.is_main:
            ckpt.truncate_traces(self.options.run_dir, self.trace_lengths)
        dist.barrier()
        self.batches = iter(self.loader)
        if plan is not None and not ckpt.load_rng(plan.source, self.env.rank):
            # A new rank (another world size) gets fresh but reproducible generator states.
            seed_everything(self.config.train.seed + 1_000_003 * self.progress.step + self.env.rank)

    def step(self) -> dict[str, float]:
        """One optimizer step: ``grad_accum`` micro-batches through forward, backward and DeepSpeed's step.

        Returns:
            The objective's step metrics over all ranks (the loss is the mean over ranks and micro-batches),
            ``tokens`` and ``samples`` of the step, and ``stop`` > 0 when any rank was asked to stop.
        """
        if self.batches is None:
            raise RuntimeError("Trainer.resume() starts the batch stream; call it before step()")
        accumulation, device = self.loader.grad_accum, self.env.device
        micro_sums: list[torch.Tensor] = []  # kept on the device: no micro-step waits for the GPU
        tokens = samples = 0
        for micro in range(accumulation):
            batch = next(self.batches)
            if self.trace is not None:
                self.trace.add(batch["sample_ids"])
            output = self.objective.forward(self.engine, batch, self.progress.step, micro)
            self.engine.backward(output.loss)
            self.engine.step()
            micro_sums.append(output.sums)
            tokens += output.tokens
            samples += output.samples
        self.loader.step_done()
        model_sums = torch.stack(micro_sums).sum(dim=0)
        host_sums = torch.tensor([tokens, samples, float(self.stop.requested)], dtype=torch.float64, device=device)
        # One all-reduce per step (on the device: NCCL reduces only CUDA tensors) also agrees on stopping.
        totals = torch.cat([model_sums.to(device), host_sums])
        dist.all_reduce(totals)
        totals = totals.cpu()
        width = model_sums.numel()
        self.progress.step += 1
        self.progress.tokens_seen += int(totals[width])
        self.progress.samples_seen += int(totals[width + 1])
        return {
            **self.objective.step_metrics(totals[:width], accumulation * self.env.world_size),
            "tokens": float(totals[width]),
            "samples": float(totals[width + 1]),
            "stop": float(totals[width + 2]),
        }

    def evaluate(self) -> dict[str, float]:
        """The objective's validation metrics (every rank takes part)."""
        return self.objective.evaluate(self.engine)

    def client_state(self) -> dict[str, Any]:
        """The JSON state of a checkpoint (RNG states go to per-rank files beside it)."""
        return {
            "step": self.progress.step,
            "tokens_seen": self.progress.tokens_seen,
            "samples_seen": self.progress.samples_seen,
            "epoch": self.loader.epoch,
            "loader": self.loader.state_dict(),
            "config_hash": config_hash(self.config),
            "objective": self.objective.name,
            "model_config": self.objective.model_config,
            "tokenizer_sha256": self.objective.data_fingerprint,
            # Where the manifest and tokenizer live: `pretrain export` copies the tokenizer and summarises
            # the data in the model card.
            "data_dir": str(Path(self.options.data_dir).resolve()),
            "world_size": self.env.world_size,
            "zero_stage": zero_stage(self.ds_config),
            "trace_lengths": self.trace_lengths,
        }

    def save(self) -> None:
        """Write checkpoint ``step{step:08d}`` and commit it (protocol in :mod:`training.checkpoint`)."""
        tag = ckpt.tag_for_step(self.progress.step)
        tag_dir = self.checkpoint_dir / tag
        if self.env.is_main and tag_dir.exists():
            # A tag of an abandoned timeline (resumed from an older one): never let its marker vouch for it.
            ckpt.remove_tag(self.checkpoint_dir, tag)
        if self.trace is not None:
            gathered: list[Any] = [None] * self.env.world_size
            dist.all_gather_object(gathered, (self.trace.path.name, self.trace.committed_length()))
            self.trace_lengths.update(dict(gathered))
        state = self.client_state()
        ds.save_checkpoint(self.engine, self.checkpoint_dir, tag, state)
        ckpt.save_rng(tag_dir, self.env.rank)
        if self.env.is_main:
            ckpt.write_trainer_state(tag_dir, state)
        dist.barrier()
        if self.trace is not None:
            self.trace.append_pending()
        dist.barrier()
        if self.env.is_main:
            ckpt.mark_complete(self.checkpoint_dir, tag)
            ckpt.prune(self.checkpoint_dir, self.config.train.keep_last)
        dist.barrier()
        self.last_saved = self.progress.step
        self.log(f"saved checkpoint {tag_dir}")

    def fit(self) -> int:
        """Train until ``train.total_steps`` (or ``--max-steps``, or a stop signal); save at the end."""
        train = self.config.train
        stop_at = min(train.total_steps, self.options.max_steps or train.total_steps)
        meter, first_step, started = Throughput(self), self.progress.step, time.perf_counter()
        metrics: dict[str, float] = {}
        while self.progress.step < stop_at:
            metrics = self.step()
            step = self.progress.step
            meter.add(metrics)
            if step % train.log_every == 0 or step == stop_at or metrics["stop"]:
                self.writer.log(step, meter.report(metrics))
            if train.val_every and step % train.val_every == 0:
                evaluation = self.evaluate()
                if evaluation:
                    self.writer.log(step, evaluation)
            if step % train.save_every == 0 or metrics["stop"]:
                self.save()
            if metrics["stop"]:
                self.log(f"stop requested: stopped at step {step} after saving")
                break
        if self.last_saved != self.progress.step:
            self.save()
        self.log(self.summary(first_step, time.perf_counter() - started, metrics.get("loss")))
        return 0

    def summary(self, first_step: int, seconds: float, last_loss: float | None) -> str:
        """The end-of-run table printed on rank 0."""
        rows = [
            ("steps", f"{self.progress.step:,} of {self.config.train.total_steps:,} ({self.progress.step - first_step:,} in this run)"),
            ("samples seen", f"{self.progress.samples_seen:,}"),
            *([("tokens seen", f"{self.progress.tokens_seen:,}")] if self.progress.tokens_seen else []),
            ("last loss", "-" if last_loss is None else f"{last_loss:.4f}"),
            ("wall time", f"{seconds:,.1f} s"),
            ("checkpoint", str(self.checkpoint_dir / ckpt.tag_for_step(self.last_saved))),
        ]
        width = max(len(name) for name, _ in rows)
        return "summary\n" + "\n".join(f"  {name.ljust(width)}  {value}" for name, value in rows)

    def close(self) -> None:
        """Stop the data workers and close the metrics writer."""
        self.batches = None
        self.writer.close()


class Throughput:
    """Samples and tokens per second between two logged steps, turned into the objective's rates."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.started = time.perf_counter()
        self.samples = self.tokens = 0.0

    def add(self, metrics: dict[str, float]) -> None:
        self.samples += metrics["samples"]
        self.tokens += metrics["tokens"]

    def report(self, metrics: dict[str, float]) -> dict[str, float]:
        """The metrics of the logged step plus rates since the previous report; prints the progress line."""
        now = time.perf_counter()
        elapsed = max(now - self.started, 1e-9)
        objective = self.trainer.objective
        record = {
            **{key: value for key, value in metrics.items() if key not in ("tokens", "samples", "stop")},
            **ds.optimizer_metrics(self.trainer.engine),
            **objective.rates(self.samples / elapsed, self.tokens / elapsed),
            "epoch": self.trainer.loader.epoch,
        }
        self.started, self.samples, self.tokens = now, 0.0, 0.0
        shown = {key: record[key] for key in objective.progress_keys if key in record}
        self.trainer.log(
            format_progress(self.trainer.progress.step, self.trainer.config.train.total_steps, shown)
        )
        return record


def log_decisions(trainer: Trainer, plan: ResumePlan | None) -> None:
    """The choices of this run, printed once on rank 0."""
    parameters = sum(p.numel() for p in trainer.engine.module.parameters())
    if zero_stage(trainer.ds_config) == 3:
        parameters = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.engine.module.parameters())
    trainer.log(
        f"objective {trainer.objective.name} | world size {trainer.env.world_size} | grad accumulation {trainer.loader.grad_accum} | "
        f"micro batch {trainer.ds_config['train_micro_batch_size_per_gpu']} | global batch "
        f"{trainer.ds_config['train_batch_size']} | parameters {parameters:,} | ZeRO stage "
        f"{zero_stage(trainer.ds_config)} | dtype {ds.precision(trainer.ds_config)} | device {trainer.env.device} | "
        f"steps per epoch {trainer.loader.steps_per_epoch} | "
        + (f"resume from {plan.source}" if plan else "fresh start")
    )


def build(config: Config, options: RunOptions) -> tuple[Trainer, ResumePlan | None]:
    """Join the process group, build loader, model and engine, and plan the resume."""
    env = ds.setup_distributed()
    seed_everything(config.train.seed)
    ds_config = resolve_deepspeed_config(config, env.world_size)
    context = ObjectiveContext(config, env, ds_config, options.data_dir)
    objective = build_objective(objective_of(config), context)
    checkpoint_dir = options.run_dir / "checkpoints"
    if env.is_main:
        options.run_dir.mkdir(parents=True, exist_ok=True)
        removed = ckpt.remove_incomplete(checkpoint_dir)
        if removed:
            print(f"removed incomplete checkpoints {removed}", flush=True)
        # The effective DeepSpeed section: gradient accumulation and the scheduler length filled in.
        resolved = config_yaml(dataclasses.replace(config, deepspeed=ds_config))
        print("resolved config:\n" + resolved, flush=True)
        (options.run_dir / "config.yaml").write_text(resolved, encoding="utf-8")
    dist.barrier()
    tag_dir = find_resume_tag(options.resume, checkpoint_dir)
    if env.is_main and tag_dir is not None and tag_dir.parent.resolve() == checkpoint_dir.resolve():
        # Resuming from an older tag abandons the newer ones: `--resume auto` must not pick them later.
        dropped = ckpt.remove_newer(checkpoint_dir, ckpt.step_of_tag(tag_dir.name) or 0)
        if dropped:
            print(f"removed checkpoints newer than {tag_dir.name}: {dropped}", flush=True)
    plan = plan_resume(tag_dir, env, objective) if tag_dir else None
    engine = ds.build_engine(
        objective.model,
        ds.with_universal_loading(ds_config) if plan and plan.universal else ds_config,
        objective.optimizer,
    )
    writer = MetricsWriter(options.run_dir, enabled=env.is_main)
    trainer = Trainer(config, options, env, objective, ds_config, engine, writer)
    if options.trace_samples:
        trainer.trace = ckpt.SampleTrace.for_rank(options.run_dir, env.rank)
    return trainer, plan


def train(config: Config, options: RunOptions) -> int:
    """Run (or continue) a pre-training run; returns the exit code."""
    trainer, plan = build(config, options)
    try:
        log_decisions(trainer, plan)
        trainer.resume(plan)
        return trainer.fit()
    finally:
        trainer.close()
        ds.teardown_distributed()
