"""Run under horovodrun: every ShadowSync algorithm in sequence, then an uneven finish.

Each rank trains its own shard of a shared regression task with every
algorithm (S-MA, S-EASGD, S-BMUF, their FR-* counterparts, and no sync) and
writes OUT_DIR/rank<r>.json: loss before/after on a common held-out set, the
replica's final weights (before any final averaging), and the sync stats.
"""

import json
import sys
import time
from pathlib import Path

import horovod.torch as hvd
import torch

from shadowsync import ForegroundSync, Hogwild, ShadowSync
from shadowsync.flat import flatten

FEATURES = 20
LR = 0.02


def make_data(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    teacher = torch.Generator().manual_seed(1234)
    w_true = torch.randn(FEATURES, 1, generator=teacher)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=gen)
    y = torch.tanh(x @ w_true) + 0.05 * torch.randn(n, 1, generator=gen)
    return x, y


def make_model() -> torch.nn.Module:
    # Different init on each rank: the synchroniser's broadcast must make them equal.
    torch.manual_seed(hvd.rank())
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
    )


def eval_loss(model: torch.nn.Module, data) -> float:
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(data[0]), data[1]).item()


def shards(data, workers: int, batch: int = 16):
    x, y = data
    batches = [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)]
    return [batches[w::workers] for w in range(workers)]


def settle(sync: ShadowSync, rounds: int, timeout: float = 20.0) -> None:
    """Let the shadow thread run a few more rounds with training over (replicas converge)."""
    target = sync.stats.rounds + rounds
    deadline = time.monotonic() + timeout
    while sync.stats.rounds < target and time.monotonic() < deadline:
        time.sleep(0.01)


def train(kind: str, algorithm: str, data, held_out) -> dict:
    model = make_model()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)  # same start for "none" too
    loss_before = eval_loss(model, held_out)

    def loss_fn(batch):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)

    stats = None
    if kind == "shadow":
        # bmuf: rounds only after local progress, or the idle rounds while the other
        # rank finishes would replay its block momentum far past the trained weights.
        idle_guard = {"min_iterations": 1} if algorithm == "bmuf" else {}
        with ShadowSync(
            model, algorithm, name=f"t.{algorithm}", final_average=False, **idle_guard
        ) as sync:
            Hogwild(model, lr=LR, on_step=sync.tick).run(loss_fn, shards(data, 2))
            # Both ranks done before the stop round, so replicas can be compared after it.
            hvd.allreduce(torch.zeros(1), name=f"t.{algorithm}.trained")
            if algorithm == "bmuf":
                # A round may still be in flight with a snapshot from mid-training; one
                # more gated round makes every snapshot in the stop round fresh.
                sync.tick()
                settle(sync, rounds=1)
            else:
                settle(sync, rounds=5)
        stats = sync.stats.as_dict()
    elif kind == "foreground":
        with ForegroundSync(
            model, algorithm, every=5, name=f"t.fr.{algorithm}", final_average=False
        ) as sync:
            Hogwild(model, lr=LR, on_step=lambda _: sync.step()).run(loss_fn, shards(data, 1))
        stats = sync.stats.as_dict()
    else:
        Hogwild(model, lr=LR).run(loss_fn, shards(data, 2))
    return {
        "loss_before": loss_before,
        "loss_after": eval_loss(model, held_out),
        "params": flatten(list(model.parameters())).tolist(),
        "stats": stats,
    }


def uneven_finish() -> dict:
    """Rank 0 stops early; rank 1 keeps going, then trains on alone, then both average."""
    value = torch.full((1000,), float(hvd.rank() + 1))
    with ShadowSync([value], "ma", name="t.uneven", broadcast=False, interval=0.002) as sync:
        time.sleep(0.5 if hvd.rank() == 0 else 1.5)
        after_sync = value.clone()
        still_running = sync.running
        if hvd.rank() == 1:
            value.add_(1.0)  # local progress after the lockstep stop
    return {
        "rounds": sync.stats.rounds,
        "still_running_late": still_running if hvd.rank() == 1 else None,
        "after_sync": [after_sync.min().item(), after_sync.max().item()],
        "final": [value.min().item(), value.max().item()],
    }


def idle_rounds() -> dict:
    """With min_iterations, rounds wait for local progress: none while workers idle."""
    value = torch.full((100,), float(hvd.rank() + 1))
    with ShadowSync([value], "bmuf", name="t.idle", broadcast=False, min_iterations=1) as sync:
        settle(sync, rounds=1)  # the first round needs no progress
        time.sleep(0.3)  # no ticks: no further round may run
        rounds_idle = sync.stats.rounds
        sync.tick()
        settle(sync, rounds=1)
        rounds_after_tick = sync.stats.rounds
    return {
        "rounds_idle": rounds_idle,
        "rounds_after_tick": rounds_after_tick,
        "rounds": sync.stats.rounds,
        "final": [value.min().item(), value.max().item()],
    }


def exclusive_block() -> dict:
    """Inside `exclusive()` no round touches the weights; after it, rounds average again."""
    value = torch.full((1000,), float(hvd.rank() + 1))
    with ShadowSync([value], "ma", name="t.exclusive", broadcast=False, interval=0.001) as sync:
        settle(sync, rounds=2)
        with sync.exclusive():
            value.fill_(10.0 * (hvd.rank() + 1))  # a "step" no round may interleave with
            rounds_before = sync.stats.rounds
            time.sleep(0.3)
            held = [value.min().item(), value.max().item()]
            rounds_during = sync.stats.rounds - rounds_before
        settle(sync, rounds=3)
        after = [value.min().item(), value.max().item()]
    return {"held": held, "rounds_during": rounds_during, "after": after}


def foreground_stop() -> dict:
    """Rank 0 asks to stop once, between rounds: the request waits for the next round."""
    value = torch.full((10,), float(hvd.rank() + 1))
    with ForegroundSync([value], "ma", every=5, name="t.fr.stop", broadcast=False) as sync:
        for i in range(1, 51):
            if sync.step(stop=hvd.rank() == 0 and i == 2):
                break
    return {"left_at": i, "rounds": sync.stats.rounds, "final": value.tolist()}


def main(out_dir: Path) -> None:
    hvd.init()
    torch.set_num_threads(1)
    data = make_data(seed=100 + hvd.rank(), n=3000)
    held_out = make_data(seed=999, n=1000)
    record = {"rank": hvd.rank(), "size": hvd.size(), "runs": {}}
    for kind, algorithm in [
        ("none", "none"),
        ("shadow", "ma"),
        ("shadow", "easgd"),
        ("shadow", "bmuf"),
        ("foreground", "ma"),
        ("foreground", "easgd"),
        ("foreground", "bmuf"),
    ]:
        label = algorithm if kind == "none" else f"{kind[0]}-{algorithm}"
        record["runs"][label] = train(kind, algorithm, data, held_out)
    record["uneven"] = uneven_finish()
    record["idle"] = idle_rounds()
    record["foreground_stop"] = foreground_stop()
    record["exclusive"] = exclusive_block()
    (out_dir / f"rank{hvd.rank()}.json").write_text(json.dumps(record))
    hvd.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
