"""The one module that knows DeepSpeed: process group, engine construction, ZeRO and checkpoint I/O."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

from data_pipeline.errors import UserError

# Environment a launcher (deepspeed, torchrun, srun wrappers) sets for each rank, MASTER_PORT included.
# Without one the run is a single process and these defaults apply; it needs no port (see setup_distributed).
RANK_ENV_DEFAULTS = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that logs and writes shared files."""
        return self.rank == 0


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def setup_distributed() -> DistEnv:
    """Join the process group from RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* (none set: a single process).

    NCCL on CUDA, gloo on CPU. Works the same under the DeepSpeed launcher, torchrun or no launcher.
    """
    launched = "WORLD_SIZE" in os.environ
    for key, value in RANK_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not launched and not dist.is_initialized():
        # One process without a launcher: a file rendezvous needs no TCP port, so nothing can race
        # for the port between picking it and binding it.
        handle, store = tempfile.mkstemp(prefix="pretrain-rendezvous-")
        os.close(handle)
        os.unlink(store)  # the file store creates it afresh
        atexit.register(_remove_quietly, store)
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    if not dist.is_initialized() or not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


def teardown_distributed() -> None:
    """Leave the process group (so that the process exits promptly)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def build_engine(
    model: torch.nn.Module, ds_config: dict[str, Any], optimizer: torch.optim.Optimizer | None = None
) -> Any:
    """Wrap the model in a DeepSpeed engine (optimizer, scheduler, ZeRO and precision from ``ds_config``).

    Args:
        model: The model, on its device.
        ds_config: The resolved DeepSpeed config.
        optimizer: A client optimizer (e.g. LARS) used instead of a ``deepspeed.optimizer`` section; the
            config's scheduler then drives its learning rate. Defaults to None (the section's optimizer).

    Raises:
        UserError: DeepSpeed rejects the ``deepspeed:`` section of the config.
    """
    try:
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=None if optimizer else [p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            config=ds_config,
        )
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"deepspeed config rejected by DeepSpeed: {error}") from error
    return engine


def with_universal_loading(ds_config: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``ds_config`` that makes the engine load universal checkpoints."""
    resolved = dict(ds_config)
    resolved["checkpoint"] = {**(resolved.get("checkpoint") or {}), "load_universal": True}
    return resolved


def precision(ds_config: dict[str, Any]) -> str:
    """``bf16``, ``fp16`` or ``fp32``: the training dtype a DeepSpeed config selects."""
    for name in ("bf16", "fp16"):
        if (ds_config.get(name) or {}).get("enabled"):
            return name
    return "fp32"


def optimizer_metrics(engine: Any) -> dict[str, float]:
    """Learning rate, global gradient norm and (fp16) loss scale after the last optimizer step."""
    metrics = {"lr": float(engine.get_lr()[0])}
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    if engine.fp16_enabled():
        metrics["loss_scale"] = float(getattr(engine.optimizer, "cur_scale", 0.0))
    return metrics


def save_checkpoint(engine: Any, checkpoint_dir: Path, tag: str, client_state: dict[str, Any]) -> None:
    """Every rank writes its part of ``checkpoint_dir/tag``; DeepSpeed's own ``latest`` file is not written.

    The trainer's pointer (checkpoint.py) replaces it, and is only written once the tag is complete.
    """
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    # ds_to_universal refuses checkpoints without this entry; a plain (non-Megatron) model has no
    # tensor/pipeline slicing to describe, so the version alone is the complete description.
    state = {
        UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    }
    state.update(client_state)
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state=state, save_latest=False)


def load_checkpoint(engine: Any, checkpoint_dir: Path, tag: str) -> dict[str, Any]:
    """Load model, optimizer and scheduler state of ``checkpoint_dir/tag``; return the client state."""
    load_path, client_state = engine.load_checkpoint(
        str(checkpoint_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise UserError(f"checkpoint {checkpoint_dir / tag}: DeepSpeed found nothing to load")
    return client_state or {}


def needs_universal_conversion(saved_world_size: int, world_size: int, stage: int) -> bool:
    """ZeRO 1-3 shards optimizer state by rank, so a new world size needs a universal checkpoint.

    Stage 0 keeps the whole optimizer state in one file and loads on any world size directly.
    """
    return stage > 0 and saved_world_size != world_size


def convert_to_universal(tag_dir: Path, output_dir: Path) -> None:
    """Run DeepSpeed's ``ds_to_universal`` conversion in this process (call on one rank only).

    Output goes to a temporary sibling that is renamed to ``output_dir`` when complete, so an interrupted
    conversion is never mistaken for a finished one.
    """
    from deepspeed.checkpoint import ds_to_universal

    partial = output_dir.with_name(output_dir.name + ".partial")
    if partial.exists():
        import shutil

        shutil.rmtree(partial)
    args = argparse.Namespace(
        input_folder=str(tag_dir),
        output_folder=str(partial),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    # The converter prints a progress report per parameter; keep the training log readable.
    with contextlib.redirect_stdout(io.StringIO()):
        ds_to_universal.main(args)
    os.replace(partial, output_dir)
