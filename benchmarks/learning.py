"""Learning benchmark: how many oracle episodes the student needs, and what synchronisation costs.

    python benchmarks/learning.py --json                 # the full run (about 40 minutes on 2 cores)
    python benchmarks/learning.py --quick --json         # a smoke run (tests)

1. Record: `agent serve` with the oracle records episodes of every tabletop
   task from simulated robots (`examples/robot_loop.py`), seeds 0..N-1.
2. Learn: for each data size (25/50/100/200 episodes per task) the trainer
   runs under `horovodrun -np 2` with ShadowSync (`--sync ma`), a fixed step
   budget, on the episodes with seed < size.
3. Evaluate, closed loop through the runtime: `agent serve --backend policy`
   serves each student to robots on held-out seeds (from 1,000,000), and the
   oracle on the same seeds. Goal: the student reaches >= 95% of the oracle's
   success on every task with at most 200 episodes per task.
4. Synchronisation: on the largest data size, training samples/s and held-out
   decision accuracy for 1 rank and for 2 ranks with each `--sync`, run one
   after another in alternating rounds; goal: ShadowSync >= 0.9 of `none`'s
   samples/s and no loss of accuracy against `allreduce`.

Prints a table per part and, with --json, one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.launch import run, run_robots, serving, trainer_command

TASKS = ("tabletop/PickPlace-v0", "tabletop/Stack-v0", "tabletop/Sort-v0", "tabletop/Push-v0")
EVAL_SEED = 1_000_000


def note(message: str) -> None:
    print(f"[learning] {message}", file=sys.stderr, flush=True)


def record(out: Path, tasks: tuple[str, ...], episodes: int, robots: int) -> dict[str, Any]:
    """Oracle episodes of every task through the runtime, into out/<task name>/."""
    results = {}
    for env_id in tasks:
        target = out / env_id.split("/")[-1]
        with serving(env_id, "--record", str(target)) as (endpoint, _):
            results[env_id] = run_robots(endpoint, env_id, episodes, seed=0, robots=robots)
        note(f"recorded {episodes} oracle episodes of {env_id}")
    return results


def subset(episodes: Path, out: Path, size: int) -> int:
    """Hard links to the episodes with seed < size (per task directory)."""
    from agent.store import episode_paths, read_summary

    shutil.rmtree(out, ignore_errors=True)
    count = 0
    for path in episode_paths(episodes):
        seed = read_summary(path)["seed"]
        if seed is not None and seed < size:
            target = out / path.relative_to(episodes)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
            count += 1
    return count


def train(
    data: Path, ckpt: Path, ranks: int, sync: str, steps: int, extra: list[str], fresh: bool = True
) -> dict:
    """Train on `data` into `ckpt` until step `steps`: from scratch, or (fresh=False) continuing
    from its last version (its optimizer and step too: `steps` counts from the first step)."""
    if fresh:
        shutil.rmtree(ckpt, ignore_errors=True)
    cmd = trainer_command(
        ranks,
        "--episodes", str(data), "--out", str(ckpt), "--sync", sync,
        "--max-steps", str(steps), "--publish-every-s", "1e9", "--json", "--quiet", *extra,
    )  # fmt: skip
    started = time.monotonic()
    summary = run(cmd, timeout_s=3600, what=f"the trainer ({ranks} ranks, sync {sync})")
    summary["wall_s"] = time.monotonic() - started
    return summary


def evaluate(
    backend: list[str], tasks: tuple[str, ...], seeds: int, robots: int, seed: int = EVAL_SEED
) -> dict:
    """Success per task on the held-out seeds (from `seed`), through `agent serve` with `backend`."""
    per_task = {}
    for env_id in tasks:
        with serving(env_id, *backend) as (endpoint, _):
            s = run_robots(endpoint, env_id, seeds, seed=seed, robots=robots)
        per_task[env_id] = {
            "success": s["success_rate"],
            "p50_ms": s["p50_ms"],
            "failed_seeds": s["failed_seeds"][:20],
        }
    return per_task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="25,50,100,200", help="episodes per task")
    parser.add_argument("--eval-seeds", type=int, default=100, help="held-out seeds per task")
    parser.add_argument("--steps", type=int, default=1500, help="training steps per size")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--robots", type=int, default=2)
    parser.add_argument("--sync-steps", type=int, default=300, help="steps per sync comparison")
    parser.add_argument("--sync-rounds", type=int, default=2)
    parser.add_argument("--syncs", default="none,ma,easgd,bmuf,allreduce")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--out", type=Path, default=Path("runs/learning"))
    parser.add_argument(
        "--parts", default="sizes,sync", help="which parts to run: sizes (success), sync (speed)"
    )
    parser.add_argument(
        "--reuse", action="store_true", help="keep OUT/episodes if it is there (no new recording)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.eval_seeds, args.steps = "3", 2, 30
        args.sync_steps, args.sync_rounds, args.syncs = 20, 1, "none,ma"
        args.tasks = "tabletop/PickPlace-v0,tabletop/Push-v0"
    sizes = sorted(int(s) for s in args.sizes.split(","))
    tasks = tuple(args.tasks.split(","))
    started = time.monotonic()
    out = args.out
    episodes = out / "episodes"
    parts = set(args.parts.split(","))
    recorded: dict = {}
    if not (args.reuse and (episodes.is_dir() or "sizes" not in parts)):
        shutil.rmtree(episodes, ignore_errors=True)
        recorded = record(episodes, tasks, max(sizes), args.robots)
    oracle = {}
    if "sizes" in parts:
        oracle = evaluate(["--backend", "oracle"], tasks, args.eval_seeds, args.robots)
        note(
            "oracle: "
            + ", ".join(f"{t.split('/')[-1]} {r['success']:.2f}" for t, r in oracle.items())
        )

    rows = []
    for size in sizes if "sizes" in parts else []:
        data = out / "data" / str(size)
        linked = subset(episodes, data, size)
        summary = train(data, out / "ckpt" / str(size), args.ranks, "ma", args.steps, [])
        student = evaluate(
            ["--backend", "policy", "--model", str(out / "ckpt" / str(size))],
            tasks,
            args.eval_seeds,
            args.robots,
        )
        ratio = {
            t: (student[t]["success"] / oracle[t]["success"]) if oracle[t]["success"] else None
            for t in tasks
        }
        rows.append(
            {
                "episodes_per_task": size,
                "episodes": linked,
                "train_s": summary["wall_s"],
                "samples_per_s": summary["samples_per_s"],
                "validation_accuracy": summary["validation_accuracy"],
                "student": student,
                "ratio_to_oracle": ratio,
                "goal_met": all(r is not None and r >= 0.95 for r in ratio.values()),
            }
        )
        note(
            f"{size} episodes/task: "
            + ", ".join(f"{t.split('/')[-1]} {student[t]['success']:.2f}" for t in tasks)
            + f" (trained {summary['wall_s']:.0f} s)"
        )

    largest = out / "data" / str(sizes[-1])
    if not largest.is_dir():
        subset(episodes, largest, sizes[-1])
    configs = (
        [(1, "none")] + [(args.ranks, s) for s in args.syncs.split(",")] if "sync" in parts else []
    )
    sync_runs: dict[str, list[dict]] = {f"{r}x{s}": [] for r, s in configs}
    for _ in range(args.sync_rounds):  # alternate so load affects every setting alike
        for ranks, sync in configs:
            s = train(
                largest, out / "ckpt" / f"sync-{ranks}-{sync}", ranks, sync, args.sync_steps, []
            )
            sync_runs[f"{ranks}x{sync}"].append(
                {
                    "samples_per_s": s["samples_per_s"],
                    "validation_accuracy": s["validation_accuracy"],
                }
            )
    sync_table = {}
    base = _median([r["samples_per_s"] for r in sync_runs.get(f"{args.ranks}xnone", [])])
    for key, runs in sync_runs.items():
        sps = _median([r["samples_per_s"] for r in runs])
        sync_table[key] = {
            "samples_per_s": sps,
            "validation_accuracy": _median([r["validation_accuracy"] or 0.0 for r in runs]),
            "ratio_to_none": sps / base if base else None,
            "runs": runs,
        }

    result = {
        "tasks": list(tasks),
        "eval_seeds": args.eval_seeds,
        "steps": args.steps,
        "ranks": args.ranks,
        "oracle": oracle,
        "sizes": rows,
        "goal_met_at": next((r["episodes_per_task"] for r in rows if r["goal_met"]), None),
        "sync": sync_table,
        "parts": sorted(parts),
        "recorded": {t: r["episodes"] for t, r in recorded.items()},
        "load_average": os.getloadavg(),
        "seconds": time.monotonic() - started,
    }
    print_tables(result)
    if args.json:
        print(json.dumps(result), flush=True)
    return 0


def _median(values: list[float]) -> float:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else 0.0


def print_tables(result: dict) -> None:
    tasks = result["tasks"]
    if not result["sizes"]:
        tasks = []
    names = [t.split("/")[-1] for t in tasks]
    if tasks:
        print("success on held-out seeds (student through the runtime / oracle on the same seeds)")
        print(f"{'episodes/task':>14} " + " ".join(f"{n:>16}" for n in names) + f" {'train s':>8}")
    for row in result["sizes"]:
        cells = [
            f"{row['student'][t]['success']:.2f} / {result['oracle'][t]['success']:.2f}"
            for t in tasks
        ]
        print(
            f"{row['episodes_per_task']:>14} "
            + " ".join(f"{c:>16}" for c in cells)
            + f" {row['train_s']:>8.0f}"
        )
    print("training throughput and held-out decision accuracy")
    for key, row in result["sync"].items():
        ratio = "" if row["ratio_to_none"] is None else f" ({row['ratio_to_none']:.2f}x none)"
        print(
            f"{key:>14}: {row['samples_per_s']:8.0f} samples/s{ratio}, "
            f"accuracy {row['validation_accuracy']:.3f}"
        )


if __name__ == "__main__":
    sys.exit(main())
