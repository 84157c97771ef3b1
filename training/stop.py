"""How a run is asked to stop: signals, a vanished launcher, and a rank that stopped answering.

A stop request never interrupts a step or a save: it sets a flag that the trainer reads at the next step
boundary, where all ranks agree to save one checkpoint together and exit 0.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
"""SIGTERM (pre-emption, the launcher), SIGINT (Ctrl-C) and SIGUSR1 all mean: save, then exit 0."""

LAUNCHER_MODULE = "deepspeed.launcher.launch"
"""The per-node process the ``deepspeed`` command starts; it starts the ranks."""

LAUNCHER_POLL_S = 1.0
"""How often a rank checks that its launcher is still there."""


class RankFailure(Exception):
    """Another rank failed or stopped answering. The CLI prints the message, without a traceback, and
    exits 1: the run cannot continue, but nothing about the user's input is wrong."""


class StopRequest:
    """SIGTERM, SIGINT or SIGUSR1 ask the run to finish the current step, save and exit 0.

    Any rank may receive it; the flag is summed over ranks with the step's metrics, so all ranks stop
    after the same step and save one checkpoint together. SIGINT no longer raises KeyboardInterrupt, so
    Ctrl-C can never cut a save in half.

    Under the ``deepspeed`` command a rank also stops when that command or its per-node launcher is gone:
    SIGTERM to the ``deepspeed`` command ends it without passing the signal on, which would otherwise
    leave the ranks training as orphans.
    """

    def __init__(self) -> None:
        self.requested = False
        self.reason = ""
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)
        watch = LauncherWatch.of_this_process()
        if watch is not None:
            threading.Thread(target=watch.wait_until_gone, args=(self.request,), daemon=True).start()

    def request(self, reason: str) -> None:
        """Ask for a stop at the next step boundary (the first reason is kept)."""
        if not self.requested:
            self.reason = reason
        self.requested = True

    def _handle(self, signum: int, frame: Any) -> None:
        self.request(signal.Signals(signum).name)


def _parent_of(pid: int) -> int | None:
    """The parent pid of ``pid`` from /proc (None: the process is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    # "pid (command) state ppid ...": the command may hold spaces and ")", so split after the last ")".
    return int(stat.rsplit(")", 1)[1].split()[1])


def _command_line(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode("utf-8", errors="replace").split("\0")


class LauncherWatch:
    """The two launcher processes above a rank started by the ``deepspeed`` command, and whether they live.

    The tree is ``deepspeed`` (runner) -> ``python -m deepspeed.launcher.launch`` -> ranks. The launcher
    passes SIGINT/SIGTERM on to the ranks, but the runner passes nothing on: when it ends, the launcher
    and the ranks would keep running.
    """

    def __init__(self, launcher_pid: int, runner_pid: int) -> None:
        self.launcher_pid = launcher_pid
        self.runner_pid = runner_pid

    @classmethod
    def of_this_process(cls) -> LauncherWatch | None:
        """The watch of this rank, or None when it was not started by DeepSpeed's launcher (or off Linux)."""
        launcher_pid = os.getppid()
        if LAUNCHER_MODULE not in _command_line(launcher_pid):
            return None
        runner_pid = _parent_of(launcher_pid)
        return None if runner_pid is None else cls(launcher_pid, runner_pid)

    def gone(self) -> str | None:
        """Which launcher process has ended (a process that ends has its children re-parented), or None."""
        if os.getppid() != self.launcher_pid:
            return "the deepspeed launcher ended"
        if _parent_of(self.launcher_pid) != self.runner_pid:
            return "the deepspeed command ended"
        return None

    def wait_until_gone(self, on_gone: Callable[[str], None]) -> None:
        """Poll until a launcher process ends, then call ``on_gone(reason)`` once (in a daemon thread)."""
        while True:
            time.sleep(LAUNCHER_POLL_S)
            reason = self.gone()
            if reason is not None:
                on_gone(reason)
                return
