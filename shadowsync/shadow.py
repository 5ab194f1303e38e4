"""ShadowSync: a shadow thread that synchronises replicas while workers keep training.

    with ShadowSync(model, algorithm="ma") as sync:
        Hogwild(model, lr=0.05, on_step=sync.tick).run(loss_fn, shards)  # a thread per shard
    print(sync.stats.sync_gap)

Neither the backward pass nor the training loop waits on communication; the
shadow thread snapshots the replica, allreduces, and adds the resulting delta
back, round after round, until every rank has asked to stop.

A training loop with an ordinary optimizer (Adam, ...) wraps its
`optimizer.step()` in `sync.exclusive()`, and so does anything that copies
the weights (a checkpoint): the shadow thread never reads or writes the
replica in the middle of either, so every step and every snapshot is whole.
The allreduce itself runs outside the lock, so the loop never waits on it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch

from shadowsync import comm
from shadowsync.exchange import agree_on_start, average, parameters_of, run_round
from shadowsync.rules import make_rule
from shadowsync.stats import SyncStats


class ShadowSync:
    """Background synchronisation of one model's replicas across Horovod ranks.

    `algorithm` is "ma", "easgd" or "bmuf"; `options` go to the rule (e.g.
    `alpha=0.1` for easgd, `block_momentum=0.875, nesterov=True` for bmuf). `interval` is the
    least time between round starts (0: back to back, as in the paper);
    `min_iterations` holds a round until local workers have `tick`ed that
    many iterations since the previous one, so idle rounds neither waste
    bandwidth nor replay BMUF's block momentum on unchanged weights.
    `timeout_s` bounds every wait for the other ranks: a round that another
    rank never joins (its shadow thread died, it hung) fails this rank's
    shadow thread with `SyncTimeout` after that long, so `running` turns
    False, `error` says why and `stop()` raises, instead of waiting forever
    (None: wait forever; a rank that dies outright fails the others at once). `name`
    prefixes every collective this object issues; give each ShadowSync alive
    at the same time its own name. On exit the shadow threads of all ranks stop
    on the same round and, with `final_average`, the replicas are averaged so
    every rank leaves with the same weights (call it after local workers end).
    """

    def __init__(
        self,
        model: torch.nn.Module | Sequence[torch.Tensor],
        algorithm: str = "ma",
        *,
        name: str = "shadowsync",
        interval: float = 0.0,
        broadcast: bool = True,
        final_average: bool = True,
        poll_interval: float = 0.001,
        min_iterations: int = 0,
        timeout_s: float | None = 60.0,
        **options: Any,
    ) -> None:
        if interval < 0 or poll_interval <= 0 or min_iterations < 0:
            raise ValueError("need interval >= 0, poll_interval > 0 and min_iterations >= 0")
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 (or None), got {timeout_s}")
        self.params = parameters_of(model)
        self.rule = make_rule(algorithm, **options)
        self.name = name
        self.interval = interval
        self.broadcast = broadcast
        self.final_average = final_average
        self.poll_interval = poll_interval
        self.min_iterations = min_iterations
        self.timeout_s = timeout_s
        self._stats = SyncStats(algorithm=algorithm)
        self._size = 0
        self._lock = threading.Lock()
        self._weights = threading.Lock()  # held by the shadow thread while it reads/writes them
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._error: BaseException | None = None

    # ---- lifecycle ----------------------------------------------------------

    def start(self, bounded: bool = True) -> ShadowSync:
        """Agree on the starting weights, then start the shadow thread.

        bounded=False: the agreement waits for the other ranks as long as it
        takes (they may arrive far apart, e.g. after loading their data); the
        rounds are bounded by `timeout_s` either way.
        """
        if self._thread is not None:
            raise RuntimeError("ShadowSync already started")
        self._size = comm.world_size()
        start = agree_on_start(
            self.params,
            f"{self.name}.init",
            self._size,
            self.broadcast,
            self.timeout_s if bounded else None,
        )
        self.rule.start(start, self._size)
        self._thread = threading.Thread(target=self._loop, name=f"{self.name}-shadow", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> SyncStats:
        """Ask to stop, wait for the lockstep last round, then (optionally) average."""
        if self._thread is None:
            raise RuntimeError("ShadowSync was not started")
        if self._stopped:
            return self.stats
        self._stop.set()
        self._thread.join()
        self._stopped = True
        if self._error is not None:
            raise RuntimeError(
                f"shadow thread {self.name!r} failed: {self._error}"
            ) from self._error
        if self.final_average:
            average(self.params, f"{self.name}.final", self._size, self.timeout_s)
        return self.stats

    def __enter__(self) -> ShadowSync:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._thread is not None and not self._stopped:
            self.stop()

    # ---- called by workers ----------------------------------------------------

    def tick(self, iterations: int = 1) -> None:
        """Count local worker iterations (for the sync gap); thread-safe, cheap."""
        with self._lock:
            self._stats.worker_iterations += iterations

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """A block in which the shadow thread neither reads nor writes the weights.

        Wrap an optimizer step (so no round lands in the middle of it) or a
        copy of the weights (so a checkpoint is one consistent replica). Held
        only briefly by the shadow thread (a copy or an add, not the allreduce).
        """
        with self._weights:
            yield

    @property
    def running(self) -> bool:
        """True while the shadow thread is still synchronising."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def error(self) -> BaseException | None:
        """Why the shadow thread stopped, if it failed (e.g. `SyncTimeout`)."""
        return self._error

    @property
    def stats(self) -> SyncStats:
        with self._lock:
            return replace(self._stats)

    # ---- the shadow thread ----------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                started = time.perf_counter()
                with self._lock:
                    iterations_at_round = self._stats.worker_iterations
                result = run_round(
                    self.params,
                    self.rule,
                    f"{self.name}.round",
                    self._size,
                    stop=self._stop.is_set(),
                    poll_interval=self.poll_interval,
                    guard=self._weights,
                    timeout_s=self.timeout_s,
                )
                with self._lock:
                    self._stats.count_round(result)
                if result.stop:
                    return
                rest = self.interval - (time.perf_counter() - started)
                if rest > 0:
                    self._stop.wait(rest)
                self._wait_for_progress(iterations_at_round + self.min_iterations)
        except BaseException as exc:  # surfaced by stop() in the caller's thread
            self._error = exc

    def _wait_for_progress(self, target: int) -> None:
        """Hold the next round until local workers reach `target` iterations (or stop is asked).

        Other ranks' rounds simply wait in their allreduce meanwhile; their
        workers keep training.
        """
        while not self._stop.is_set():
            with self._lock:
                if self._stats.worker_iterations >= target:
                    return
            self._stop.wait(self.poll_interval)
