"""When to hand the waiting requests to the backend: adaptive cross-robot batching.

A fixed batch window would add its whole length to every lone robot's
latency. Instead the server decides as soon as waiting cannot pay off:

* the batch is full (`max_batch`), or
* the oldest request has waited `timeout_s`, or
* every robot active in the last `active_window_s` already has a request
  waiting (nobody else is coming), which makes a lone robot's request go
  straight through.

Requests that pile up while the backend is busy form the next batch on their
own, so a slow backend batches naturally under load.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchPolicy:
    max_batch: int = 16
    timeout_s: float = 0.002
    active_window_s: float = 1.0

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.timeout_s < 0:
            raise ValueError(f"batch timeout must be >= 0, got {self.timeout_s}")

    def should_flush(self, pending: int, oldest_age_s: float, active_robots: int) -> bool:
        if pending == 0:
            return False
        return (
            pending >= self.max_batch or oldest_age_s >= self.timeout_s or pending >= active_robots
        )

    def wait_s(self, oldest_age_s: float) -> float:
        """How long more requests may still be awaited for the current batch."""
        return max(0.0, self.timeout_s - oldest_age_s)


class RobotActivity:
    """Robots seen recently, i.e. those whose next request is worth waiting for."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._last_seen: dict[str, float] = {}

    def seen(self, robot_id: str, now: float | None = None) -> None:
        self._last_seen[robot_id] = time.monotonic() if now is None else now

    def active(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        horizon = now - self.window_s
        stale = [r for r, t in self._last_seen.items() if t < horizon]
        for robot in stale:
            del self._last_seen[robot]
        return len(self._last_seen)
