"""Batches of an iterable dataset through a torch DataLoader: worker errors, stop signals, exit."""

from __future__ import annotations

import atexit
import signal
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from data_pipeline.errors import UserError

_USER_ERROR = "__user_error__"

# Live multi-worker iterators. Their workers ignore SIGTERM, which is what multiprocessing's own exit
# hook sends them; this hook (registered later, so run earlier) stops them the orderly way first, so a
# program that ends with an unfinished iterator still exits.
_LIVE_ITERATORS: weakref.WeakSet[Any] = weakref.WeakSet()


@atexit.register
def _stop_live_workers() -> None:
    for iterator in list(_LIVE_ITERATORS):
        getattr(iterator, "_shutdown_workers", lambda: None)()


def user_error_marker(error: UserError) -> dict[str, Any]:
    """A batch that stands for ``error``: a dataset yields it and stops.

    torch would wrap a worker's exception with the worker's traceback; the marker carries the
    message only, which :func:`iterate_batches` raises again in the main process.
    """
    return {_USER_ERROR: str(error)}


def _reraise_user_errors(batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for batch in batches:
        if _USER_ERROR in batch:
            message = batch[_USER_ERROR]
            # Stop the workers now: the raised error's traceback would keep them alive (and block
            # interpreter exit) for as long as it is referenced.
            getattr(batches, "_shutdown_workers", lambda: None)()
            raise UserError(message)
        yield batch


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers ignore SIGTERM/SIGINT/SIGUSR1: launchers, SLURM and Ctrl-C signal every process of a job,
    but the main process must finish its step (with these workers' batches) and save before it ends them
    itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _data_loader(dataset: IterableDataset, num_workers: int) -> DataLoader:
    if not isinstance(num_workers, int) or num_workers < 0:
        raise UserError(f"num_workers must be a non-negative integer, got {num_workers!r}")
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        prefetch_factor=2 if num_workers else None,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_ignore_stop_signals if num_workers else None,
    )


def iterate_batches(dataset: IterableDataset, num_workers: int) -> Iterator[dict[str, Any]]:
    """Batches of ``dataset`` through a DataLoader, with worker errors turned back into UserError.

    Args:
        dataset: Yields ready batches, or a :func:`user_error_marker` before it stops.
        num_workers: DataLoader worker processes (0: this process).

    Raises:
        UserError: When ``num_workers`` is not a non-negative integer, or the dataset reported one.
    """
    iterator = iter(_data_loader(dataset, num_workers))
    if num_workers:
        _LIVE_ITERATORS.add(iterator)
    return _reraise_user_errors(iterator)
