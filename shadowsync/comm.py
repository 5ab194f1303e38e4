"""Horovod collectives as ShadowSync issues them: named, waited on politely, and bounded.

Horovod matches collectives across ranks by name, so every call here takes an
explicit name that must be identical on all ranks and distinct from anything
another thread issues at the same time. Waiting polls with a short sleep
instead of a blocking ``synchronize`` so a background thread does not take a
core from the training workers, and so that a wait can give up: with
`timeout_s`, a collective that another rank never joins (its thread died, it
hung) raises `SyncTimeout` instead of waiting forever. A rank that dies
outright makes Horovod raise on the others by itself. Horovod is imported lazily.
"""

from __future__ import annotations

import time
from typing import Any

import torch


class SyncTimeout(TimeoutError):
    """A collective did not complete in time: another rank has stopped, hung or died."""


def wait(handle: Any, name: str, timeout_s: float | None, poll_interval: float = 0.001) -> Any:
    """The result of an async Horovod collective; SyncTimeout after `timeout_s` (None: never)."""
    import horovod.torch as hvd

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not hvd.poll(handle):
        if deadline is not None and time.monotonic() > deadline:
            raise SyncTimeout(
                f"collective {name!r} did not complete within {timeout_s:g} s: "
                "another rank has stopped, hung or died"
            )
        time.sleep(poll_interval)
    return hvd.synchronize(handle)


def allreduce_sum(
    tensor: torch.Tensor,
    name: str,
    poll_interval: float = 0.001,
    timeout_s: float | None = None,
) -> torch.Tensor:
    """SUM-allreduce `tensor` across all ranks under `name`; returns a new tensor."""
    import horovod.torch as hvd

    handle = hvd.allreduce_async(tensor, name=name, op=hvd.Sum)
    return wait(handle, name, timeout_s, poll_interval)


def broadcast(
    tensor: torch.Tensor, name: str, root: int = 0, timeout_s: float | None = None
) -> torch.Tensor:
    """Rank `root`'s copy of `tensor`, on every rank."""
    import horovod.torch as hvd

    return wait(hvd.broadcast_async(tensor, root_rank=root, name=name), name, timeout_s)


def allgather(tensor: torch.Tensor, name: str, timeout_s: float | None = None) -> torch.Tensor:
    """Every rank's `tensor` concatenated along the first dimension, in rank order."""
    import horovod.torch as hvd

    return wait(hvd.allgather_async(tensor, name=name), name, timeout_s)


def world_size() -> int:
    import horovod.torch as hvd

    return hvd.size()
