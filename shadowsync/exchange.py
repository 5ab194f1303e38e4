"""One synchronisation round and the start/end agreements, shared by shadow and foreground.

A round SUM-allreduces the rule's contribution with one extra element, the
stop flag. Every rank sees the same sum, so all ranks leave on the same round
(lockstep stop): a rank that finishes early never leaves the others averaging
against the zeros `hvd.join()` would contribute.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from shadowsync import comm
from shadowsync.flat import add_flat_, copy_flat_, flatten
from shadowsync.rules import Rule


@dataclass(frozen=True)
class RoundResult:
    stop: bool  # some rank asked to stop: every rank leaves after this round
    bytes_sent: int
    comm_seconds: float  # in the allreduce
    round_seconds: float  # snapshot, allreduce and apply


def run_round(
    params: Sequence[torch.Tensor],
    rule: Rule,
    name: str,
    n: int,
    stop: bool = False,
    poll_interval: float = 0.001,
    guard: AbstractContextManager | None = None,
    timeout_s: float | None = None,
) -> RoundResult:
    """Snapshot, exchange and apply one round of `rule`; returns whether all ranks stop now.

    `guard` (a lock) is held while the replica is read and while the delta is
    added, never during the allreduce, so a caller holding it sees whole rounds.
    `timeout_s` bounds the wait for the other ranks (`comm.SyncTimeout`).
    """
    guard = guard or contextlib.nullcontext()
    round_started = time.perf_counter()
    with guard:
        snapshot = flatten(params)
    contribution = rule.outgoing(snapshot)
    flag = torch.tensor(
        [1.0 if stop else 0.0], dtype=contribution.dtype, device=contribution.device
    )
    payload = torch.cat([contribution, flag])
    started = time.perf_counter()
    total = comm.allreduce_sum(payload, name, poll_interval, timeout_s)
    comm_seconds = time.perf_counter() - started
    last = bool(total[-1].item() > 0)
    delta = rule.incoming(snapshot, total[:-1], n, last=last)
    with guard:
        add_flat_(params, delta)
    nbytes = payload.numel() * payload.element_size()
    return RoundResult(
        stop=last,
        bytes_sent=nbytes,
        comm_seconds=comm_seconds,
        round_seconds=time.perf_counter() - round_started,
    )


def replicate(
    params: Sequence[torch.Tensor], name: str, root: int = 0, timeout_s: float | None = None
) -> torch.Tensor:
    """Make every replica equal to rank `root`'s; returns the shared flat weights."""
    flat = comm.broadcast(flatten(params), name, root, timeout_s)
    copy_flat_(params, flat)
    return flat


def agree_on_start(
    params: Sequence[torch.Tensor],
    name: str,
    n: int,
    broadcast: bool,
    timeout_s: float | None = None,
) -> torch.Tensor:
    """The shared starting point for a rule's state, identical on every rank.

    With `broadcast`, every replica becomes rank 0's and that is the start;
    otherwise the replicas stay as they are and the rule starts from their mean.
    """
    if broadcast:
        return replicate(params, name, timeout_s=timeout_s)
    return mean_replica(params, name, n, timeout_s)


def mean_replica(
    params: Sequence[torch.Tensor], name: str, n: int, timeout_s: float | None = None
) -> torch.Tensor:
    """The mean of all replicas as a flat vector (blocking; the replicas are untouched)."""
    return comm.allreduce_sum(flatten(params), name, timeout_s=timeout_s) / n


def average(
    params: Sequence[torch.Tensor], name: str, n: int, timeout_s: float | None = None
) -> None:
    """Blocking consensus: every replica becomes the mean of all replicas."""
    copy_flat_(params, mean_replica(params, name, n, timeout_s))


def parameters_of(model: torch.nn.Module | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors to synchronise: a module's parameters or an explicit list."""
    params = list(model.parameters()) if isinstance(model, torch.nn.Module) else list(model)
    if not params:
        raise ValueError("nothing to synchronise: the model has no parameters")
    for p in params:
        if not torch.is_floating_point(p):
            raise TypeError(f"can only synchronise floating-point tensors, got {p.dtype}")
    return params
