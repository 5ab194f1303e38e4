"""Horovod collectives as ShadowSync issues them: named, and waited on politely.

Horovod matches collectives across ranks by name, so every call here takes an
explicit name that must be identical on all ranks and distinct from anything
another thread issues at the same time. Waiting polls with a short sleep
instead of a blocking ``synchronize`` so a background thread does not take a
core from the training workers. Horovod is imported lazily.
"""

from __future__ import annotations

import time

import torch


def allreduce_sum(tensor: torch.Tensor, name: str, poll_interval: float = 0.001) -> torch.Tensor:
    """SUM-allreduce `tensor` across all ranks under `name`; returns a new tensor."""
    import horovod.torch as hvd

    handle = hvd.allreduce_async(tensor, name=name, op=hvd.Sum)
    while not hvd.poll(handle):
        time.sleep(poll_interval)
    return hvd.synchronize(handle)


def broadcast(tensor: torch.Tensor, name: str, root: int = 0) -> torch.Tensor:
    """Rank `root`'s copy of `tensor`, on every rank."""
    import horovod.torch as hvd

    return hvd.broadcast(tensor, root_rank=root, name=name)


def world_size() -> int:
    import horovod.torch as hvd

    return hvd.size()
