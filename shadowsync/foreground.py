"""Foreground counterparts (FR-MA, FR-EASGD, FR-BMUF): the same rules, inside the loop.

The training loop calls `step()` after every iteration; every `every`-th call
blocks on a synchronisation round. Rounds are matched by count, so ranks must
call `step()` equally often until they agree to stop (the stop flag rides in a
round, as in the shadow thread).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from shadowsync import comm
from shadowsync.exchange import agree_on_start, average, parameters_of, run_round
from shadowsync.rules import make_rule
from shadowsync.stats import SyncStats


class ForegroundSync:
    """Synchronise replicas every `every` iterations, blocking the caller meanwhile."""

    def __init__(
        self,
        model: torch.nn.Module | Sequence[torch.Tensor],
        algorithm: str = "ma",
        *,
        every: int = 10,
        name: str = "fgsync",
        broadcast: bool = True,
        final_average: bool = True,
        **options: Any,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.params = parameters_of(model)
        self.rule = make_rule(algorithm, **options)
        self.every = every
        self.name = name
        self.broadcast = broadcast
        self.final_average = final_average
        self._stats = SyncStats(algorithm=f"fr-{algorithm}")
        self._size = 0
        self._finished = False
        self._stop_asked = False

    def start(self) -> ForegroundSync:
        self._size = comm.world_size()
        start = agree_on_start(self.params, f"{self.name}.init", self._size, self.broadcast)
        self.rule.start(start, self._size)
        return self

    def step(self, stop: bool = False) -> bool:
        """Count one iteration; every `every`-th runs a blocking round.

        Pass `stop=True` once this rank wants to finish (out of data or time);
        it is remembered, the flag rides along in the next round, and the return
        value is True on every rank from that round on, so all ranks leave the
        loop together.
        """
        if not self._size:
            raise RuntimeError("ForegroundSync.start() was not called")
        if self._finished:
            return True
        self._stop_asked = self._stop_asked or stop
        self._stats.worker_iterations += 1
        if self._stats.worker_iterations % self.every:
            return False
        result = run_round(
            self.params, self.rule, f"{self.name}.round", self._size, stop=self._stop_asked
        )
        self._stats.count_round(result)
        self._finished = result.stop
        return result.stop

    def stop(self) -> SyncStats:
        if not self._size:
            raise RuntimeError("ForegroundSync.start() was not called")
        if self.final_average:
            average(self.params, f"{self.name}.final", self._size)
        return self.stats

    def __enter__(self) -> ForegroundSync:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.stop()

    @property
    def stats(self) -> SyncStats:
        return replace(self._stats)
