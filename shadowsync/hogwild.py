"""Hogwild: several worker threads train one shared replica without locks.

Workers must not share `.grad` buffers, so each step takes its gradients with
`torch.autograd.grad` and adds them into the weights' `.data` in place
(sparse embedding gradients stay sparse; another worker's backward pass may
still hold the old weights, which is the Hogwild race, not an error). Torch kernels release the GIL, so threads
overlap on the maths.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from shadowsync.exchange import parameters_of


@dataclass
class HogwildStats:
    iterations: int
    examples: int


class Hogwild:
    """Run `workers` threads of lock-free SGD on `model`'s shared parameters.

    `on_step(n)` is called after every worker iteration (pass `ShadowSync.tick`
    so the shadow thread can report its sync gap).
    """

    def __init__(
        self,
        model: torch.nn.Module | Sequence[torch.Tensor],
        lr: float,
        *,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.params = [p for p in parameters_of(model) if p.requires_grad]
        self.lr = lr
        self.on_step = on_step

    def step(self, loss: torch.Tensor) -> None:
        """One SGD step from `loss`, safe to call from several threads at once."""
        grads = torch.autograd.grad(loss, self.params)
        with torch.no_grad():
            for p, g in zip(self.params, grads, strict=True):
                p.data.add_(g, alpha=-self.lr)
        if self.on_step is not None:
            self.on_step(1)

    def run(
        self,
        loss_fn: Callable[[Any], torch.Tensor],
        shards: Sequence[Iterable[Any]],
        batch_size: Callable[[Any], int] = len,
    ) -> HogwildStats:
        """Train one worker thread per shard (an iterable of batches) until all are done.

        The first worker error is re-raised here after all workers have stopped.
        """
        if not shards:
            raise ValueError("need at least one shard (one per worker)")
        errors: list[BaseException] = []
        counts = [[0, 0] for _ in shards]
        stop = threading.Event()

        def work(index: int) -> None:
            try:
                for batch in shards[index]:
                    if stop.is_set():
                        return
                    self.step(loss_fn(batch))
                    counts[index][0] += 1
                    counts[index][1] += batch_size(batch)
            except BaseException as exc:
                errors.append(exc)
                stop.set()

        threads = [
            threading.Thread(target=work, args=(i,), name=f"hogwild-{i}", daemon=True)
            for i in range(len(shards))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise RuntimeError("a Hogwild worker failed") from errors[0]
        return HogwildStats(
            iterations=sum(c[0] for c in counts), examples=sum(c[1] for c in counts)
        )
