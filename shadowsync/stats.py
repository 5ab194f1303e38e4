"""What a synchroniser reports: rounds, sync gap, bytes moved, time in communication."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shadowsync.exchange import RoundResult


@dataclass
class SyncStats:
    """Counters of one synchroniser; `sync_gap` is worker iterations per sync round."""

    algorithm: str
    rounds: int = 0
    worker_iterations: int = 0
    bytes_sent: int = 0
    comm_seconds: float = 0.0
    round_seconds: float = 0.0

    @property
    def sync_gap(self) -> float | None:
        """Mean worker iterations between two consecutive rounds (None before the first)."""
        return self.worker_iterations / self.rounds if self.rounds else None

    def count_round(self, result: RoundResult) -> None:
        self.rounds += 1
        self.bytes_sent += result.bytes_sent
        self.comm_seconds += result.comm_seconds
        self.round_seconds += result.round_seconds

    def as_dict(self) -> dict:
        return {**asdict(self), "sync_gap": self.sync_gap}
