"""Run under horovodrun -np 2: rank 1's shadow thread dies; rank 0 must not wait forever.

Both ranks train a small model with ShadowSync(timeout_s=TIMEOUT). After a
few rounds rank 1's update rule raises inside its shadow thread (a bug, or a
thread killed), so rank 1 stops joining rounds while its process lives on
and, worst case, its training loop does not notice for a while (2 x TIMEOUT).
Each rank writes OUT_DIR/rank<r>.json: when its shadow thread stopped, the
error it reports, and how long after rank 1's thread died.
"""

import json
import sys
import time
from pathlib import Path

import horovod.torch as hvd
import torch

from shadowsync import ShadowSync

TIMEOUT = 3.0


class ThreadKilled(RuntimeError):
    pass


def main(out: Path) -> None:
    hvd.init()
    rank = hvd.rank()
    torch.manual_seed(rank)
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    sync = ShadowSync(model, "ma", name="dead", interval=0.01, timeout_s=TIMEOUT)
    died_at = torch.zeros(1, dtype=torch.float64)
    if rank == 1:
        outgoing = sync.rule.outgoing

        def dying(snapshot):
            if sync.stats.rounds >= 5:
                died_at[0] = time.time()
                raise ThreadKilled("rank 1's shadow thread was killed")
            return outgoing(snapshot)

        sync.rule.outgoing = dying
    sync.start()
    deadline = time.monotonic() + 20 * TIMEOUT
    x, y = torch.randn(64, 8), torch.randn(64, 1)

    def going() -> bool:
        if rank == 1 and died_at[0]:  # rank 1 trains on, unaware, for a while
            return time.time() < died_at[0] + 2 * TIMEOUT
        return sync.running

    while going() and time.monotonic() < deadline:  # the training loop goes on
        with sync.exclusive():
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
        sync.tick()
        time.sleep(0.002)
    stopped_at = time.time() if rank == 0 else None
    error = sync.error
    record = {
        "rank": rank,
        "rounds": sync.stats.rounds,
        "still_running": sync.running,
        "error_type": type(error).__name__ if error is not None else None,
        "error": str(error) if error is not None else None,
        "stopped_at": stopped_at,
        "thread_died_at": float(died_at[0]) or None,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    sys.exit(0)  # no hvd.shutdown(): the peer is gone, nothing is left to agree on
