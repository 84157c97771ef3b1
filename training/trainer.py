"""The pre-training loop as a handful of verbs: build, resume, step, evaluate, save, fit.

The loop is the same for every method (BERT's MLM, SimCLR): the method (:mod:`training.methods`) supplies
the loader, the model, an optional client optimizer, the micro-batch forward, the step metrics and the
evaluation; the checkpoint manager (:mod:`training.checkpoint_manager`) saves and resumes the run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data_pipeline.errors import UserError
from data_pipeline.tables import format_table
from training import engine as ds
from training.checkpoint import SampleTrace
from training.checkpoint_manager import CheckpointManager, LoaderPart, ResumePlan, RunIdentity, TraceLog
from training.config import Config, config_hash, config_yaml, method_of
from training.deepspeed_config import resolve_deepspeed_config, zero_stage
from training.methods import Method, MethodContext, build_method
from training.metrics import MetricsWriter, format_progress
from training.rng_state import capture_rng, restore_rng
from training.seeding import seed_everything
from training.stop import StopRequest

HOST_SUMS = ("tokens", "samples", "stop")
"""What the trainer adds to a method's sums before the step's one all-reduce."""


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
    verify_shards: str = "full"
    """Shard checks against the manifest: ``full`` (size at start, sha256 at first open), ``size``, ``none``."""
    init_from: str | None = None
    """Initial BERT weights and architecture (a run, export or HF directory); a checkpoint to resume wins."""


@dataclass
class Progress:
    """Counters saved in every checkpoint (a checkpoint part)."""

    step: int = 0
    tokens_seen: int = 0
    samples_seen: int = 0

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.samples_seen = state["samples_seen"]


@dataclass
class Trainer:
    """One rank's training run. :func:`build` makes it; :meth:`fit` runs it."""

    config: Config
    options: RunOptions
    env: ds.DistEnv
    method: Method
    ds_config: dict[str, Any]
    engine: Any
    writer: MetricsWriter
    checkpoints: CheckpointManager
    progress: Progress
    batches: Iterator[dict[str, Any]] | None = None
    stop: StopRequest = field(default_factory=StopRequest)
    rng_at_step_start: dict[str, Any] | None = None
    """Generator states before the current step: what a save after a failed step must record."""

    @property
    def loader(self) -> Any:
        """The method's resumable training loader."""
        return self.method.loader

    def log(self, message: str) -> None:
        """Print on rank 0 only."""
        if self.env.is_main:
            print(message, flush=True)

    def resume(self, plan: ResumePlan | None) -> None:
        """Load the planned checkpoint (or start fresh), start the batch stream, then commit to the start.

        RNG states are restored after the data iterator exists (see :meth:`CheckpointManager.restore_rng`).
        Only once everything has loaded does the run change files: newer tags move aside, the metrics
        are cut back to the step and RUN_DIR/config.yaml is written, so a refused resume changes nothing.
        """
        self.checkpoints.load(self.engine, plan)
        self.batches = iter(self.loader)
        if plan is not None and not self.checkpoints.restore_rng(plan):
            # A new rank (another world size) gets fresh but reproducible generator states.
            seed_everything(self.config.train.seed + 1_000_003 * self.progress.step + self.env.rank)
        self.checkpoints.adopt(plan)
        dropped = self.writer.keep_until(self.progress.step)
        if self.env.is_main:
            write_resolved_config(self.config, self.ds_config, self.options.run_dir)
        if plan is not None:
            self.log(
                f"resumed from {plan.source} at step {self.progress.step}"
                + (" (universal checkpoint)" if plan.universal else "")
                + (f"; dropped {dropped} metrics rows of later steps" if dropped else "")
            )

    def step(self) -> dict[str, float]:
        """One optimizer step: ``grad_accum`` micro-batches through forward, backward and DeepSpeed's step.

        Returns:
            The method's step metrics over all ranks (the loss is the mean over ranks and micro-batches),
            ``tokens`` and ``samples`` of the step, and ``stop`` > 0 when any rank was asked to stop.
        """
        if self.batches is None:
            raise RuntimeError("Trainer.resume() starts the batch stream; call it before step()")
        self.rng_at_step_start = capture_rng()
        accumulation, device = self.loader.grad_accum, self.env.device
        micro_sums: list[torch.Tensor] = []  # kept on the device: no micro-step waits for the GPU
        tokens = samples = 0
        sample_ids: list[str] = []  # traced once the step is whole (a data error mid-step leaves no trace)
        for micro in range(accumulation):
            batch = next(self.batches)
            sample_ids.extend(batch["sample_ids"])
            output = self.method.forward(self.engine, batch, self.progress.step, micro)
            self.engine.backward(output.loss)
            self.engine.step()
            micro_sums.append(output.sums)
            tokens += output.tokens
            samples += output.samples
        self.loader.step_done()
        self.checkpoints.traces.add(sample_ids)
        host_values = [tokens, samples, float(self.stop.requested)]  # in the order of HOST_SUMS
        host_sums = torch.tensor(host_values, dtype=torch.float64, device=device)
        # One all-reduce per step (on the device: NCCL reduces only CUDA tensors) also agrees on stopping.
        totals = torch.cat([torch.stack(micro_sums).sum(dim=0).to(device), host_sums])
        dist.all_reduce(totals)
        sums = dict(zip((*self.method.sum_names, *HOST_SUMS), totals.cpu().tolist(), strict=True))
        self.progress.step += 1
        self.progress.tokens_seen += int(sums["tokens"])
        self.progress.samples_seen += int(sums["samples"])
        method_sums = {name: sums[name] for name in self.method.sum_names}
        method_metrics = self.method.step_metrics(method_sums, accumulation * self.env.world_size)
        return {**method_metrics, **{name: sums[name] for name in HOST_SUMS}}

    def evaluate(self) -> dict[str, float]:
        """The method's validation metrics (every rank takes part)."""
        return self.method.evaluate(self.engine)

    def save(self) -> None:
        """Write and commit checkpoint ``step{step:08d}`` (the protocol is :meth:`CheckpointManager.save`)."""
        tag_dir = self.checkpoints.save(self.engine, self.progress.step)
        self.log(f"saved checkpoint {tag_dir}")

    def fit(self) -> int:
        """Train until ``train.total_steps`` (or ``--max-steps``, or a stop signal); save at the end."""
        train = self.config.train
        stop_at = min(train.total_steps, self.options.max_steps or train.total_steps)
        meter, first_step, started = Throughput(self), self.progress.step, time.perf_counter()
        metrics: dict[str, float] = {}
        while self.progress.step < stop_at:
            try:
                metrics = self.step()
            except UserError:
                self.save_before_data_error()
                raise
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
                reason = self.stop.reason or "on another rank"
                self.log(f"stop requested ({reason}): stopped at step {step} after saving")
                break
        if self.checkpoints.last_step != self.progress.step:
            self.save()
        self.log(self.summary(first_step, time.perf_counter() - started, metrics.get("loss")))
        return 0

    def save_before_data_error(self) -> None:
        """Keep the steps done before a data error: save the last completed step (one process only).

        The failed step's optimizer update never happened, so the model, optimizer and loader position are
        those of the last completed step. With several ranks the others are inside the failed step's
        collectives, where no checkpoint can be taken together; the last regular save is the resume point.
        """
        done = self.progress.step
        if self.env.world_size == 1 and done > 0 and self.checkpoints.last_step != done:
            self.log(f"data error in step {done + 1}: saving the checkpoint of step {done} before exiting")
            if self.rng_at_step_start is not None:
                restore_rng(self.rng_at_step_start)  # undo the failed step's draws (dropout, say)
            self.save()

    def summary(self, first_step: int, seconds: float, last_loss: float | None) -> str:
        """The end-of-run table printed on rank 0."""
        steps, total = self.progress.step, self.config.train.total_steps
        rows = [
            ("steps", f"{steps:,} of {total:,} ({steps - first_step:,} in this run)"),
            ("samples seen", f"{self.progress.samples_seen:,}"),
            *([("tokens seen", f"{self.progress.tokens_seen:,}")] if self.progress.tokens_seen else []),
            ("last loss", "-" if last_loss is None else f"{last_loss:.4f}"),
            ("wall time", f"{seconds:,.1f} s"),
            ("checkpoint", str(self.checkpoints.tag_dir(self.checkpoints.last_step or 0))),
        ]
        return "summary\n" + format_table(rows, indent="  ")

    def close(self) -> None:
        """Stop the data workers and close the metrics writer."""
        self.batches = None
        self.writer.close()


class Throughput:
    """Samples and tokens per second between two logged steps, turned into the method's rates."""

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
        method = self.trainer.method
        record = {
            **{key: value for key, value in metrics.items() if key not in HOST_SUMS},
            **ds.optimizer_metrics(self.trainer.engine),
            **method.rates(self.samples / elapsed, self.tokens / elapsed),
            **self.trainer.loader.progress_metrics(),  # epoch; per source in a mixture
        }
        self.started, self.samples, self.tokens = now, 0.0, 0.0
        shown = {key: record[key] for key in method.progress_keys if key in record}
        self.trainer.log(
            format_progress(self.trainer.progress.step, self.trainer.config.train.total_steps, shown)
        )
        return record


def log_decisions(trainer: Trainer, plan: ResumePlan | None) -> None:
    """The choices of this run, printed once on rank 0."""
    parameters = sum(p.numel() for p in trainer.engine.module.parameters())
    if zero_stage(trainer.ds_config) == 3:
        parameters = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.engine.module.parameters())
    ds_config, loader, init_from = trainer.ds_config, trainer.loader, trainer.options.init_from
    trainer.log(
        f"method {trainer.method.name} | world size {trainer.env.world_size} | grad accumulation "
        f"{loader.grad_accum} | micro batch {ds_config['train_micro_batch_size_per_gpu']} | global batch "
        f"{ds_config['train_batch_size']} | parameters {parameters:,} | ZeRO stage {zero_stage(ds_config)} | "
        f"dtype {ds.precision(ds_config)} | device {trainer.env.device} | "
        f"steps per epoch {loader.steps_per_epoch} | "
        + (f"resume from {plan.source}" if plan else "fresh start")
        + (f" (weights of --init-from {init_from})" if plan is None and init_from else "")
    )
    if plan is not None and init_from is not None:
        trainer.log(
            f"--init-from {init_from} is not used: the run resumes from its checkpoint "
            f"{plan.source} (weights, optimizer, schedule and data position); it gave the architecture only"
        )


def resolved_config(config: Config, ds_config: dict[str, Any]) -> str:
    """The effective config as YAML (its DeepSpeed section with gradient accumulation filled in)."""
    return config_yaml(dataclasses.replace(config, deepspeed=ds_config))


def write_resolved_config(config: Config, ds_config: dict[str, Any], run_dir: Path) -> None:
    """Keep the effective config as RUN_DIR/config.yaml (rank 0, once the run has committed to its start)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(resolved_config(config, ds_config), encoding="utf-8")


def checkpoint_manager_for(
    config: Config,
    options: RunOptions,
    env: ds.DistEnv,
    method: Method,
    ds_config: dict[str, Any],
    progress: Progress,
) -> CheckpointManager:
    """The manager of RUN_DIR/checkpoints over the run's parts: progress, loader position, sample traces."""
    identity = RunIdentity(
        method=method.name,
        model_config=method.model_config,
        data_fingerprint=method.data_fingerprint,
        config_hash=config_hash(config),
        data_dir=str(Path(options.data_dir).resolve()),
        world_size=env.world_size,
        zero_stage=zero_stage(ds_config),
    )
    trace = SampleTrace.for_rank(options.run_dir, env.rank) if options.trace_samples else None
    traces = TraceLog(options.run_dir, env.is_main, trace)
    parts = [progress, LoaderPart(method.loader)]
    checkpoint_dir = options.run_dir / "checkpoints"
    return CheckpointManager(checkpoint_dir, env, identity, parts, traces, config.train.keep_last)


def build(config: Config, options: RunOptions) -> tuple[Trainer, ResumePlan | None]:
    """Join the process group, build loader, model and engine, and plan the resume."""
    env = ds.setup_distributed(config.train.collective_timeout_s)
    seed_everything(config.train.seed)
    ds_config = resolve_deepspeed_config(config, env.world_size)
    if options.init_from is not None and method_of(config) != "bert":
        raise UserError(
            f"--init-from {options.init_from}: BERT runs only, but the config trains {method_of(config)}"
        )
    context = MethodContext(
        config, env, ds_config, options.data_dir, options.verify_shards, init_from=options.init_from
    )
    method = build_method(method_of(config), context)
    if env.is_main:
        print("resolved config:\n" + resolved_config(config, ds_config), flush=True)
    progress = Progress()
    checkpoints = checkpoint_manager_for(config, options, env, method, ds_config, progress)
    plan = checkpoints.plan(options.resume, config.train.total_steps)
    universal = plan is not None and plan.universal
    engine_config = ds.with_universal_loading(ds_config) if universal else ds_config
    engine = ds.build_engine(method.model, engine_config, method.optimizer)
    writer = MetricsWriter(options.run_dir, enabled=env.is_main)
    return Trainer(config, options, env, method, ds_config, engine, writer, checkpoints, progress), plan


def train(config: Config, options: RunOptions) -> int:
    """Run (or continue) a pre-training run; returns the exit code."""
    trainer, plan = build(config, options)
    try:
        log_decisions(trainer, plan)
        trainer.resume(plan)
        return trainer.fit()
    except RuntimeError as error:
        ds.raise_if_collective_failed(error, trainer.env)  # names the rank that stopped answering
        raise
    finally:
        trainer.close()
        ds.teardown_distributed()
