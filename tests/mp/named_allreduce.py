"""Run under horovodrun: a named allreduce issued from a background thread.

Each rank writes what it saw to OUT_DIR/rank<r>.json so the test can check
both ranks, not just the launcher's exit code.
"""

import json
import sys
import threading
import time
from pathlib import Path

import horovod.torch as hvd
import torch


def main(out_dir: Path) -> None:
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    result: dict = {}

    def background() -> None:
        tensor = torch.full((1000,), float(rank + 1))
        handle = hvd.allreduce_async(tensor, name="test.background.sum", op=hvd.Sum)
        while not hvd.poll(handle):
            time.sleep(0.001)
        result["sum"] = hvd.synchronize(handle).tolist()

    thread = threading.Thread(target=background, name="shadow")
    thread.start()
    # The main thread keeps issuing its own, differently named collectives.
    avg = hvd.allreduce(torch.tensor([float(rank)]), name="test.main.avg", op=hvd.Average)
    thread.join(timeout=60)
    assert not thread.is_alive(), "background allreduce did not finish"
    record = {"rank": rank, "size": size, "avg": avg.item(), "sum": result["sum"]}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(record))
    hvd.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
