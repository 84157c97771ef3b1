"""The one module that knows DeepSpeed: process group, engine construction, ZeRO and checkpoint I/O."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import io
import os
import re
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

from data_pipeline.errors import UserError
from training.deepspeed_config import ADAM_TYPES
from training.stop import RankFailure

# Environment a launcher (deepspeed, torchrun, srun wrappers) sets for each rank, MASTER_PORT included.
# Without one the run is a single process and these defaults apply; it needs no port (see setup_distributed).
RANK_ENV_DEFAULTS = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}

DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0
"""How long a collective waits for the other ranks by default (``train.collective_timeout_s``)."""

PROBE_TIMEOUT_S = 60.0
"""The longest wait, after a failed collective, for the other ranks to answer the check that names them."""

COLLECTIVE_FAILURES = ("timed out", "connection closed by peer", "connection reset by peer")
"""Words of gloo's errors when a peer stopped answering (lowercase)."""

SHM_BUFFER_PREFIX = "deepspeed_allreduce_buffer"
"""DeepSpeed's CPU comm op maps one /dev/shm file per rank: PREFIX_{uid}_{addr}_{port}_{rank}."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S
    """Seconds a collective waits for the other ranks before it fails."""
    probe_group: Any = None
    """A gloo group used for nothing but naming the ranks that stopped answering (None: one process)."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that logs and writes shared files."""
        return self.rank == 0


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def setup_distributed(collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> DistEnv:
    """Join the process group from RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* (none set: a single process).

    NCCL on CUDA, gloo on CPU. Works the same under the DeepSpeed launcher, torchrun or no launcher.

    Args:
        collective_timeout_s: Seconds a collective waits for the other ranks before it raises (gloo) or
            aborts the process (NCCL's watchdog). Defaults to 600.
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
    timeout = timedelta(seconds=collective_timeout_s)
    default_group_timeout(timeout)
    if not launched and not dist.is_initialized():
        # One process without a launcher: a file rendezvous needs no TCP port, so nothing can race
        # for the port between picking it and binding it.
        handle, store = tempfile.mkstemp(prefix="pretrain-rendezvous-")
        os.close(handle)
        os.unlink(store)  # the file store creates it afresh
        atexit.register(_remove_quietly, store)
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1, timeout=timeout)
    if not dist.is_initialized() or not deepspeed.comm.is_initialized():
        announce_op_compile("ShareMemCommBuilder", "CPU shared-memory communication")
        deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    probe_group = None
    if world_size > 1:
        probe_group = dist.new_group(backend="gloo", timeout=timeout)
        # Every rank has mapped every rank's buffer once all pass this barrier; the names are no longer
        # needed, so each rank unlinks its own now and no run (not even one killed with -9) leaves any.
        dist.barrier(group=probe_group)
    remove_shm_buffer(rank)
    return DistEnv(rank, world_size, local_rank, device, collective_timeout_s, probe_group)


def default_group_timeout(timeout: timedelta) -> None:
    """Give every process group made later the timeout of the default one.

    DeepSpeed builds its data-parallel groups with ``new_group(ranks)``, which would take torch's own
    default of 30 minutes; torch reads that default from these two module attributes.
    """
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout


def remove_shm_buffer(rank: int) -> None:
    """Unlink the /dev/shm buffer DeepSpeed's CPU comm op created for ``rank`` of this job, if any.

    The name holds MASTER_ADDR and MASTER_PORT, so another run's buffers (another port) are never touched.
    """
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    _remove_quietly(f"/dev/shm/{SHM_BUFFER_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}")


def announce_op_compile(builder_name: str, what: str) -> None:
    """Print one line (rank 0) before DeepSpeed compiles one of its C++ ops for the first time.

    DeepSpeed builds ops it did not ship prebuilt on first use, into torch's extension cache: about a
    minute of silence on the first start, none on later ones.

    Args:
        builder_name: The DeepSpeed op builder, e.g. ``ShareMemCommBuilder``.
        what: What the op does, for the message.
    """
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import get_default_build_root

    builder = get_accelerator().create_op_builder(builder_name)
    if builder is None or installed_ops.get(builder.NAME) or os.environ.get("RANK", "0") != "0":
        return
    if not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return  # DeepSpeed will not build it here
    # torch builds into $TORCH_EXTENSIONS_DIR/<name>/, or else <default root>/<python+CUDA tag>/<name>/.
    cache = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    built = f"{builder.NAME}/{builder.NAME}.so"
    if (cache / built).is_file() or any(cache.glob(f"*/{built}")):
        return
    print(
        f"compiling DeepSpeed's {what} op {builder.NAME} once (about a minute; cached in {cache})", flush=True
    )


def raise_if_collective_failed(error: BaseException, env: DistEnv) -> None:
    """Turn a collective that timed out (or lost a peer) into one :class:`RankFailure` line naming the rank.

    gloo's own message names no rank. Every rank that sees the failure joins a monitored barrier on the
    probe group, where rank 0 learns which ranks never came. Other errors return (the caller re-raises).

    Raises:
        RankFailure: ``error`` is a failed collective.
    """
    text = str(error).lower()
    if env.probe_group is None or not any(marker in text for marker in COLLECTIVE_FAILURES):
        return
    timeout_s = env.collective_timeout_s
    probe_s = min(timeout_s, PROBE_TIMEOUT_S)
    waited = f"rank {env.rank} gave up on a collective after {timeout_s:g} s (train.collective_timeout_s)"
    try:
        dist.monitored_barrier(group=env.probe_group, timeout=timedelta(seconds=probe_s), wait_all_ranks=True)
    except RuntimeError as probe_error:
        silent = silent_ranks(str(probe_error))
        if silent:
            message = f"rank {silent} stopped answering: {waited}; nor did it answer a {probe_s:g} s check"
        else:
            message = f"{waited}; rank 0's error names the rank that stopped answering, unless it is rank 0"
        raise RankFailure(message) from None
    raise RankFailure(
        f"{waited}, yet every rank answered a check afterwards: a rank is slower than the timeout allows "
        "(raise it: --set train.collective_timeout_s=SECONDS)"
    )


def silent_ranks(probe_error: str) -> str:
    """The ranks gloo's monitored barrier reports missing on rank 0, as ``1`` or ``1, 3`` ('' if none)."""
    match = re.search(r"Ranks? ([\d, ]*\d) failed to pass", probe_error)
    return match.group(1) if match else ""


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
    if optimizer is None:
        announce_optimizer_compile(ds_config)
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


def announce_optimizer_compile(ds_config: dict[str, Any]) -> None:
    """The compile line of :func:`announce_op_compile` for the Adam op a ``deepspeed.optimizer`` builds.

    ``torch_adam: true`` builds none; otherwise ZeRO-Offload builds the CPU Adam, anything else the fused one.
    """
    section = ds_config.get("optimizer") or {}
    torch_adam = (section.get("params") or {}).get("torch_adam")
    if str(section.get("type", "")).lower() not in ADAM_TYPES or torch_adam:
        return
    offload = ((ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device")
    builder = "CPUAdamBuilder" if offload in ("cpu", "nvme") else "FusedAdamBuilder"
    announce_op_compile(builder, "Adam optimizer")


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
