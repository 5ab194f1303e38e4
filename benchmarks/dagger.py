"""DAgger and escalation benchmark: the student learns from the oracle's labels on its own states.

    python benchmarks/dagger.py --json                  # full run
    python benchmarks/dagger.py --quick --json          # smoke run (tests)

1. Start from a student trained on 25 oracle episodes per task (behaviour
   cloning, the learning benchmark's recipe: `horovodrun -np 2`, ShadowSync).
2. Rounds: the runtime serves the student (`--backend policy --teacher oracle
   --beta 0`: the student acts, the oracle labels every step), robots run
   new training seeds and every episode is recorded with the oracle's label
   on each step; the trainer continues from the last version on all the
   data; the student is evaluated closed loop through the runtime on the same
   held-out seeds as the oracle. The table counts teacher-labelled episodes.
   Goal: >= 95% of the oracle's success on every task with at most half the
   teacher-labelled episodes behaviour cloning needed (`--bc-episodes`, from
   benchmarks/learning.py).
3. Escalation: the first (weakest) student, served with `--teacher oracle
   --escalate-below P --label escalated`, for several P: success and share
   of decisions escalated. Goal: at some P, success within 2 points of the
   teacher's with at most 20% of decisions escalated.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from learning import EVAL_SEED, TASKS, evaluate, note, record, subset, train

from agent.launch import run_robots, serving

DAGGER_SEED = 500_000  # the training seeds of the student-acted episodes


def collect(
    ckpt: Path, out: Path, tasks: tuple[str, ...], episodes: int, seed: int, robots: int
) -> dict:
    """Student-acted, oracle-labelled episodes into out/<task>/."""
    results = {}
    for env_id in tasks:
        args = ["--backend", "policy", "--model", str(ckpt), "--teacher", "oracle", "--record"]
        with serving(env_id, *args, str(out / env_id.split("/")[-1])) as (endpoint, _):
            results[env_id] = run_robots(endpoint, env_id, episodes, seed=seed, robots=robots)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--start", type=int, default=25, help="oracle episodes per task to start from"
    )
    parser.add_argument(
        "--per-round", type=int, default=25, help="student episodes per task a round"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1500, help="training steps from scratch")
    parser.add_argument("--round-steps", type=int, default=750, help="steps a round (continuing)")
    parser.add_argument("--eval-seeds", type=int, default=100)
    parser.add_argument("--thresholds", default="0.5,0.7,0.8,0.9,0.95,0.99")
    parser.add_argument("--bc-episodes", type=int, default=None, help="what BC needed (per task)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--robots", type=int, default=2)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--out", type=Path, default=Path("runs/dagger"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.start, args.per_round, args.rounds = 3, 2, 1
        args.steps, args.round_steps, args.eval_seeds, args.thresholds = 30, 20, 2, "0.9"
        args.tasks = "tabletop/PickPlace-v0"
    tasks = tuple(args.tasks.split(","))
    os.environ.setdefault("MUJOCO_GL", "egl")
    started = time.monotonic()
    out = args.out
    data = out / "data"
    shutil.rmtree(out, ignore_errors=True)

    record(out / "oracle", tasks, args.start, args.robots)
    subset(out / "oracle", data / "oracle", args.start)
    oracle = evaluate(["--backend", "oracle"], tasks, args.eval_seeds, args.robots)
    ckpt = out / "ckpt"
    summary = train(data, ckpt, args.ranks, "ma", args.steps, [])
    first = out / "first"
    shutil.copytree(ckpt, first)  # the weakest student, for the escalation curve

    rows = []
    labelled = args.start
    for round_ in range(args.rounds + 1):
        student = evaluate(
            ["--backend", "policy", "--model", str(ckpt)], tasks, args.eval_seeds, args.robots
        )
        ratio = {
            t: student[t]["success"] / oracle[t]["success"] if oracle[t]["success"] else None
            for t in tasks
        }
        rows.append(
            {
                "round": round_,
                "teacher_labelled_episodes_per_task": labelled,
                "student": student,
                "ratio_to_oracle": ratio,
                "goal_met": all(r is not None and r >= 0.95 for r in ratio.values()),
                "train_s": summary["wall_s"],
            }
        )
        note(
            f"round {round_} ({labelled} labelled episodes/task): "
            + ", ".join(f"{t.split('/')[-1]} {student[t]['success']:.2f}" for t in tasks)
        )
        if round_ == args.rounds:
            break
        collect(
            ckpt,
            data / f"round{round_ + 1}",
            tasks,
            args.per_round,
            DAGGER_SEED + 10_000 * round_,
            args.robots,
        )
        labelled += args.per_round
        summary = train_on(data, ckpt, args)

    curve = []
    for p in [float(v) for v in args.thresholds.split(",")]:
        backend = [
            "--backend", "policy", "--model", str(first), "--teacher", "oracle",
            "--escalate-below", str(p), "--label", "escalated",
        ]  # fmt: skip
        per_task, escalated, decisions = {}, 0.0, 0
        for env_id in tasks:
            with serving(env_id, *backend) as (endpoint, _):
                s = run_robots(
                    endpoint, env_id, args.eval_seeds, seed=EVAL_SEED, robots=args.robots
                )
            per_task[env_id] = s["success_rate"]
            escalated += s["escalation_rate"] * s["decisions"]
            decisions += s["decisions"]
        mean = sum(per_task.values()) / len(per_task)
        teacher_mean = sum(oracle[t]["success"] for t in tasks) / len(tasks)
        curve.append(
            {
                "threshold": p,
                "success": per_task,
                "mean_success": mean,
                "escalation_rate": escalated / max(1, decisions),
                "within_2_points": mean >= teacher_mean - 0.02,
            }
        )
        note(
            f"escalate below {p}: success {mean:.3f}, escalated {escalated / max(1, decisions):.1%}"
        )

    met = next((r for r in rows if r["goal_met"]), None)
    result = {
        "tasks": list(tasks),
        "oracle": oracle,
        "rounds": rows,
        "dagger_episodes_needed": None
        if met is None
        else met["teacher_labelled_episodes_per_task"],
        "bc_episodes_needed": args.bc_episodes,
        "half_of_bc": None
        if met is None or args.bc_episodes is None
        else met["teacher_labelled_episodes_per_task"] <= args.bc_episodes / 2,
        "escalation": curve,
        "escalation_goal_met": any(
            c["within_2_points"] and c["escalation_rate"] <= 0.2 for c in curve
        ),
        "load_average": os.getloadavg(),
        "seconds": time.monotonic() - started,
    }
    print("DAgger rounds (student / oracle success on held-out seeds)")
    for r in rows:
        cells = " ".join(
            f"{r['student'][t]['success']:.2f}/{oracle[t]['success']:.2f}" for t in tasks
        )
        print(
            f"round {r['round']}: {r['teacher_labelled_episodes_per_task']:4d} labelled episodes/task  {cells}"
        )
    print("escalation (first student, oracle teacher)")
    for c in curve:
        print(
            f"P={c['threshold']:<5} success {c['mean_success']:.3f}  escalated {c['escalation_rate']:.1%}"
        )
    if args.json:
        print(json.dumps(result), flush=True)
    return 0


def train_on(data: Path, ckpt: Path, args: argparse.Namespace) -> dict:
    """Continue from the last version (the trainer resumes from CKPT/LATEST) on all the data."""
    from agent.launch import run, trainer_command

    cmd = trainer_command(
        args.ranks,
        "--episodes", str(data), "--out", str(ckpt), "--sync", "ma",
        "--max-steps", str(args.round_steps), "--publish-every-s", "1e9", "--json", "--quiet",
    )  # fmt: skip
    begun = time.monotonic()
    summary = run(cmd, timeout_s=3600, what="the trainer")
    summary["wall_s"] = time.monotonic() - begun
    return summary


if __name__ == "__main__":
    sys.exit(main())
