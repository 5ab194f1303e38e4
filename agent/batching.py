"""When to hand the waiting requests to the backend: adaptive cross-robot batching.

A fixed batch window would add its whole length to every lone robot's
latency. Instead the server decides as soon as waiting cannot pay off:

* the batch is full (`max_batch`), or
* every robot active in the last `active_window_s` already has a request
  waiting (nobody else is coming), which makes a lone robot's request go
  straight through, or
* the oldest request has waited `timeout_s`, or as long as one backend call
  takes, whichever is shorter: waiting longer than a call costs more than the
  call it could save, so a backend that costs nothing per call is never
  waited for.

Requests that pile up while the backend is busy form the next batch on their
own, so a slow backend batches naturally under load.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

UNKNOWN_COST = float("inf")


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

    def window_s(self, call_cost_s: float = UNKNOWN_COST) -> float:
        """Longest useful wait: the configured window, capped at one backend call."""
        return min(self.timeout_s, call_cost_s)

    def should_flush(
        self,
        pending: int,
        oldest_age_s: float,
        active_robots: int,
        call_cost_s: float = UNKNOWN_COST,
    ) -> bool:
        if pending == 0:
            return False
        return (
            pending >= self.max_batch
            or pending >= active_robots
            or oldest_age_s >= self.window_s(call_cost_s)
        )

    def wait_s(self, oldest_age_s: float, call_cost_s: float = UNKNOWN_COST) -> float:
        """How long more requests may still be awaited for the current batch."""
        return max(0.0, self.window_s(call_cost_s) - oldest_age_s)


class CallCost:
    """Running estimate (EMA) of one backend call's duration, in seconds."""

    def __init__(self, alpha: float = 0.1) -> None:
        self.alpha = alpha
        self.seconds = UNKNOWN_COST

    def update(self, seconds: float) -> None:
        if self.seconds == UNKNOWN_COST:
            self.seconds = seconds
        else:
            self.seconds += self.alpha * (seconds - self.seconds)


class RobotActivity:
    """Robots seen recently, i.e. those whose next request is worth waiting for.

    Kept oldest-first, so forgetting quiet robots only looks at the ones to forget.
    """

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._last_seen: OrderedDict[str, float] = OrderedDict()

    def seen(self, robot_id: str, now: float | None = None) -> None:
        self._last_seen[robot_id] = time.monotonic() if now is None else now
        self._last_seen.move_to_end(robot_id)

    def active(self, now: float | None = None) -> int:
        horizon = (time.monotonic() if now is None else now) - self.window_s
        last_seen = self._last_seen
        while last_seen and next(iter(last_seen.values())) < horizon:
            last_seen.popitem(last=False)
        return len(last_seen)
