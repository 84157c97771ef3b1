"""Write a DeepSpeed hostfile (``HOST slots=N`` per line) from a SLURM allocation or a host list.

    # inside an sbatch/salloc allocation: hosts from SLURM_JOB_NODELIST, slots from SLURM_GPUS_ON_NODE
    python -m launch.hostfile --slurm > hostfile
    python -m launch.hostfile --slurm --slots 8 --output hostfile
    # an explicit list
    python -m launch.hostfile --hosts node1,node2 --slots 8 > hostfile
    # then, from the first host (ssh to the others) ...
    deepspeed --hostfile hostfile --module training --config configs/bert-base.yaml --data DATA --run-dir RUN
    # ... or on every node without ssh (what launch/sbatch_multinode.sh does)
    deepspeed --hostfile hostfile --no_ssh --num_nodes 2 --node_rank $SLURM_NODEID --master_addr HOST0 \
        --master_port 29500 --module training --config configs/bert-base.yaml --data DATA --run-dir RUN
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from data_pipeline.errors import UserError

HOST_PATTERN = re.compile(r"^[A-Za-z0-9_.\-:\[\]]+$")


def hostfile_lines(hosts: Sequence[str], slots: int) -> list[str]:
    """``HOST slots=N`` lines, one per distinct host, in the given order.

    Raises:
        UserError: No hosts, a repeated or malformed host name, or slots < 1.
    """
    if slots < 1:
        raise UserError(f"--slots must be at least 1, got {slots}")
    if not hosts:
        raise UserError("no hosts given")
    seen: set[str] = set()
    for host in hosts:
        if not HOST_PATTERN.match(host):
            raise UserError(f"host {host!r} is not a valid host name")
        if host in seen:
            raise UserError(f"host {host!r} listed twice")
        seen.add(host)
    return [f"{host} slots={slots}" for host in hosts]


def parse_host_list(text: str) -> list[str]:
    """``a,b, c`` -> ``["a", "b", "c"]`` (empty items ignored)."""
    return [item.strip() for item in text.split(",") if item.strip()]


def scontrol_hostnames(nodelist: str) -> list[str]:
    """Expand a compressed SLURM node list (``node[01-03]``) with ``scontrol show hostnames``."""
    try:
        done = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                              check=False)
    except FileNotFoundError as error:
        raise UserError("--slurm needs the `scontrol` command (run inside a SLURM allocation)") from error
    if done.returncode != 0:
        raise UserError(f"scontrol show hostnames {nodelist!r} failed: {done.stderr.strip()}")
    return done.stdout.split()


def gpus_per_node(env: Mapping[str, str]) -> int | None:
    """Slots per node from SLURM_GPUS_ON_NODE (or the count in SLURM_GPUS_PER_NODE, e.g. ``h100:8``)."""
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = env.get(key, "").strip()
        if value:
            count = value.rsplit(":", 1)[-1]
            if not count.isdigit():
                raise UserError(f"{key}={value!r}: expected a GPU count")
            return int(count)
    return None


def slurm_hosts_and_slots(env: Mapping[str, str], slots: int | None,
                          expand: Callable[[str], list[str]] = scontrol_hostnames) -> tuple[list[str], int]:
    """The allocation's hosts and the slots per host (``--slots`` wins over SLURM's GPU count).

    Raises:
        UserError: Not inside an allocation, or no slot count anywhere.
    """
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise UserError("--slurm: SLURM_JOB_NODELIST is not set (run inside sbatch/salloc)")
    chosen = slots if slots is not None else gpus_per_node(env)
    if chosen is None:
        raise UserError("--slurm: SLURM_GPUS_ON_NODE is not set; give --slots N")
    return expand(nodelist), chosen


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch.hostfile", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--slurm", action="store_true", help="hosts of the current SLURM allocation")
    source.add_argument("--hosts", help="comma-separated host names")
    parser.add_argument("--slots", type=int, default=None,
                        help="processes (GPUs) per host; with --slurm defaults to SLURM_GPUS_ON_NODE")
    parser.add_argument("--output", default=None, help="write here instead of stdout")
    return parser


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.slurm:
            hosts, slots = slurm_hosts_and_slots(os.environ if env is None else env, args.slots)
        else:
            if args.slots is None:
                raise UserError("--hosts needs --slots N")
            hosts, slots = parse_host_list(args.hosts), args.slots
        text = "\n".join(hostfile_lines(hosts, slots)) + "\n"
    except UserError as error:
        print(f"launch.hostfile: error: {error}", file=sys.stderr)
        return 2
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
