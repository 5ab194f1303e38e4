"""This process's place in a training job, and the trainer's bounded collectives.

Horovod only when `horovodrun` started the process. Every collective the
trainer waits on can be given a deadline (`Ranks.timeout_s`): a rank that
stopped or hung must stop the others with an error, never hang them. Text
crosses ranks as bytes in a tensor; nothing is pickled.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shadowsync.comm import SyncTimeout, allgather, allreduce_sum, broadcast


@dataclass
class Ranks:
    """This rank, the job's size, and Horovod (None on one process).

    With `timeout_s` set (once training runs; setting up can take long on one
    rank, fitting the featuriser), every collective here gives up after that
    long (`SyncTimeout`).
    """

    rank: int = 0
    size: int = 1
    hvd: Any = None  # horovod.torch, under horovodrun
    timeout_s: float | None = None

    @classmethod
    def start(cls) -> Ranks:
        if "HOROVOD_RANK" not in os.environ:
            return cls()
        import horovod.torch as hvd

        hvd.init()
        return cls(hvd.rank(), hvd.size(), hvd)

    def say(self, message: str) -> None:
        """A progress line on stderr, from rank 0 only."""
        if self.rank == 0:
            print(f"[trainer] {message}", file=sys.stderr, flush=True)

    def sum(self, values: list[float], name: str) -> list[float]:
        """Element-wise sum over ranks (identity on one process)."""
        if self.hvd is None:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        return allreduce_sum(tensor, name, 0.001, self.timeout_s).tolist()

    def gather_text(self, text: str, name: str) -> list[str]:
        """Every rank's ASCII `text` of the same length (e.g. a digest), in rank order."""
        if self.hvd is None:
            return [text]
        row = torch.from_numpy(np.frombuffer(text.encode(), np.uint8).copy())[None]
        gathered = allgather(row, name, self.timeout_s).numpy()
        return [bytes(r).decode() for r in gathered]

    def broadcast_text(self, text: str, name: str) -> str:
        """Rank 0's `text` on every rank."""
        if self.hvd is None:
            return text
        data = np.frombuffer(text.encode(), np.uint8) if self.rank == 0 else np.zeros(0, np.uint8)
        n = int(broadcast(torch.tensor([data.size]), f"{name}.n", 0, self.timeout_s).item())
        buf = torch.zeros(n, dtype=torch.uint8)
        if self.rank == 0:
            buf[:] = torch.from_numpy(data.copy())
        return bytes(broadcast(buf, f"{name}.data", 0, self.timeout_s).numpy()).decode()

    def broadcast_tensors(self, tensors: dict[str, torch.Tensor], name: str) -> None:
        """Rank 0's values of `tensors` (same names and shapes on every rank), in place."""
        if self.hvd is None:
            return
        for key in sorted(tensors):
            tensors[key].copy_(broadcast(tensors[key], f"{name}.{key}", 0, self.timeout_s))

    def failures(self) -> tuple[type[BaseException], ...]:
        """What collectives raise when the job has lost a rank."""
        if self.hvd is None:
            return (SyncTimeout,)
        from horovod.common.exceptions import HorovodInternalError

        return (SyncTimeout, HorovodInternalError)


class Watchdog:
    """Ends this rank with an error when the training loop makes no step for `timeout_s`.

    For loops whose collectives block inside Horovod (`--sync allreduce`'s
    gradient allreduce), where no wait can be given a deadline.
    """

    def __init__(self, ranks: Ranks, timeout_s: float) -> None:
        self.ranks, self.timeout_s = ranks, timeout_s
        self._beat = time.monotonic()
        self._done = threading.Event()
        threading.Thread(target=self._watch, name="trainer-watchdog", daemon=True).start()

    def beat(self) -> None:
        self._beat = time.monotonic()

    def stop(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self.timeout_s / 4)):
            if time.monotonic() - self._beat > self.timeout_s:
                print(
                    f"[trainer] rank {self.ranks.rank}: no training step for "
                    f"{self.timeout_s:g} s (another rank stopped or hung); exiting",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(1)
