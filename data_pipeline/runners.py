"""The runner a job's Beam options choose: its full name, its worker count, and the code its workers get.

Local runs use Beam's DirectRunner. ``--runner DaskRunner`` selects :mod:`data_pipeline.dask_runner`
(Beam's DaskRunner with exact multi-output handling). Any other runner (Dataflow, Flink, Spark,
Portable) runs the job on workers that must install this project: the job builds a wheel of it and
passes it as ``--extra_package``, unless the user already gave ``--setup_file`` or ``--extra_package(s)``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from data_pipeline.errors import UserError

LOCAL_RUNNERS = ("DirectRunner", "direct", "BundleBasedDirectRunner", "SwitchingDirectRunner")
DASK_RUNNER = "data_pipeline.dask_runner.DaskRunner"
# Names a user may give for the Dask runner; Beam's own class misroutes multi-output ParDos.
DASK_RUNNER_NAMES = ("DaskRunner", "dask", "apache_beam.runners.dask.dask_runner.DaskRunner", DASK_RUNNER)
# Options that already tell a cluster's workers how to get this project's code. (A
# ``--requirements_file`` brings third-party libraries, not this project: the wheel is still staged.)
STAGING_OPTIONS = ("setup_file", "extra_package", "extra_packages")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# What a wheel of the project is built from (see pyproject.toml).
PROJECT_FILES = ("pyproject.toml", "README.md")
PROJECT_PACKAGES = ("data_pipeline", "training", "launch")
IGNORED_WHEN_STAGING = shutil.ignore_patterns("__pycache__", "*.pyc")


def option_name(arg: str) -> str:
    """``--name=value`` or ``--name`` -> ``name``."""
    return arg.lstrip("-").split("=", 1)[0]


def option_value(beam_args: list[str], name: str) -> str | None:
    """The last value of ``--name=value`` in ``beam_args`` (already in ``=`` form), or None."""
    values = [
        arg.split("=", 1)[1]
        for arg in beam_args
        if arg.startswith("--") and "=" in arg and option_name(arg) == name
    ]
    return values[-1] if values else None


def is_local(runner: str | None) -> bool:
    """Whether ``runner`` runs the job inside this process tree (Beam's DirectRunner)."""
    return runner is None or runner in LOCAL_RUNNERS


def is_dask(runner: str | None) -> bool:
    """Whether ``runner`` names the Dask runner (any accepted spelling)."""
    return runner in DASK_RUNNER_NAMES


def resolve_runner(beam_args: list[str]) -> list[str]:
    """``beam_args`` with the Dask runner under its full class name; a UserError for unusable options.

    Raises:
        UserError: ``--runner DaskRunner`` without ``dask[distributed]`` installed, or Dask options
            (``--dask_client_address``, ...) given for another runner.
    """
    runner = option_value(beam_args, "runner")
    dask_options = sorted({option_name(arg) for arg in beam_args if option_name(arg).startswith("dask_")})
    if not is_dask(runner):
        if dask_options:
            raise UserError(
                f"--{dask_options[0]}: only valid with --runner DaskRunner (got --runner {runner})"
            )
        return beam_args
    if importlib.util.find_spec("distributed") is None:
        raise UserError(
            f"--runner {runner}: needs dask[distributed]: run ./install.sh or pip install 'pretrain[dask]'"
        )
    return [f"--runner={DASK_RUNNER}" if option_name(arg) == "runner" else arg for arg in beam_args]


def worker_count(options: Any) -> int | None:
    """How many workers the options ask for, or None when only the cluster knows (Dask, autoscaling).

    Local: ``--direct_num_workers`` (1 when unset). Dataflow: ``--max_num_workers`` or
    ``--num_workers``. Flink: ``--parallelism``. Only the job's balance depends on it, never its output.
    """
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions, WorkerOptions

    runner = options.view_as(StandardOptions).runner
    if is_local(runner):
        return options.view_as(DirectOptions).direct_num_workers or 1
    workers = options.view_as(WorkerOptions)
    parallelism = options.get_all_options().get("parallelism") or -1
    for count in (workers.max_num_workers, workers.num_workers, parallelism):
        if count is not None and count > 0:
            return int(count)
    return None


def build_project_wheel(directory: str) -> Path:
    """A wheel of this project built into ``directory`` (no dependencies, no network): what workers install.

    Raises:
        UserError: The project's source tree (``pyproject.toml``) is not beside the installed package,
            or the build failed.
    """
    if not (PROJECT_ROOT / "pyproject.toml").is_file():
        raise UserError(
            f"--runner: cluster workers need this project's code, but {PROJECT_ROOT} holds no "
            "pyproject.toml to build it from: pass --extra_package=pretrain-*.whl (or --setup_file)"
        )
    # Built from a clean copy: an in-tree build would reuse (and leave) a stale build/ directory.
    source = Path(directory) / "source"
    source.mkdir(parents=True)
    for name in PROJECT_FILES:
        shutil.copy2(PROJECT_ROOT / name, source / name)
    for package in PROJECT_PACKAGES:
        shutil.copytree(PROJECT_ROOT / package, source / package, ignore=IGNORED_WHEN_STAGING)
    command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
               "--no-index", "--wheel-dir", directory, str(source)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    shutil.rmtree(source, ignore_errors=True)
    wheels = sorted(Path(directory).glob("pretrain-*.whl"))
    if done.returncode != 0 or not wheels:
        raise UserError(f"cannot build the wheel staged for the workers: {done.stderr.strip()[-2000:]}")
    return wheels[-1]


def staging_arguments(beam_args: list[str]) -> list[str]:
    """``--extra_package=<wheel of this project>`` for a runner whose workers need it, else nothing.

    Nothing for the local and Dask runners (their workers run this environment's code) or when the
    user passed any of ``STAGING_OPTIONS``. The wheel goes to a new temporary directory.
    """
    runner = option_value(beam_args, "runner")
    if is_local(runner) or is_dask(runner) or any(option_name(arg) in STAGING_OPTIONS for arg in beam_args):
        return []
    wheel = build_project_wheel(tempfile.mkdtemp(prefix="pretrain-staged-"))
    print(f"pretrain: staging {wheel} for the {runner} workers", file=sys.stderr)
    return [f"--extra_package={os.fspath(wheel)}"]
