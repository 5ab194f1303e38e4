"""Run N simulated robots against `agent serve` and report how they did.

    agent serve --env tabletop/PickPlace-v0 &
    python examples/robot_loop.py --endpoint tcp://127.0.0.1:5555 \
        --env tabletop/PickPlace-v0 --robots 4 --episodes 20 --json

Each robot is its own process (this script with `--robot-index`) with its own
env and `AgentClient`; it reports episodes as JSON lines (no pickle crosses a
process boundary). The server batches the robots' requests. Prints one line per episode, a summary, and with
`--json` one JSON object as the last line (success_rate, episodes, decisions,
p50_ms, p99_ms, decisions_per_s, decided_by, escalation_rate, model_versions,
failed_seeds). Episodes use the seeds SEED .. SEED+EPISODES-1 whatever the
number of robots, so two runs with the same seed face the same scenes.
"""

from __future__ import annotations

import argparse
import json
import queue
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict
from typing import Any

import numpy as np

TICK_S = 1.0


def make_env(env_id: str) -> Any:
    import gymnasium as gym

    import envs

    return envs.make_skill_env(env_id) if env_id in envs.ENV_IDS else gym.make(env_id)


def robot(index: int, args: argparse.Namespace) -> int:
    """One robot (its own process): run its episodes, print one JSON line per event."""

    def emit(kind: str, payload: Any = None) -> None:
        print(json.dumps({"kind": kind, "robot": index, "payload": payload}), flush=True)

    try:
        from agent.client import AgentClient
        from envs.plugin import RemotePolicy
        from envs.rollout import run_episode

        env = make_env(args.env)
        client = AgentClient(
            args.endpoint, timeout_ms=args.timeout_ms, retries=1, robot_id=f"robot-{index}"
        )
        policy = RemotePolicy(client)
        for k in range(args.robot_episodes):
            start = time.time()
            result = run_episode(env, policy, seed=args.seed + args.robot_offset + k)
            result.reasoning = []  # can be long (Cosmos-Reason); recorded by the server anyway
            emit("episode", {**asdict(result), "start": start, "end": time.time()})
        policy.close()
        env.close()
        return 0
    except Exception:
        emit("error", traceback.format_exc())
        return 1


def launch(
    index: int, episodes: int, offset: int, args: argparse.Namespace, out: queue.Queue
) -> subprocess.Popen:
    """Start robot `index` as a subprocess; a thread forwards its JSON lines to `out`."""
    cmd = [
        sys.executable,
        __file__,
        "--robot-index",
        str(index),
        "--robot-episodes",
        str(episodes),
        "--robot-offset",
        str(offset),
        "--endpoint",
        args.endpoint,
        "--env",
        args.env,
        "--seed",
        str(args.seed),
        "--timeout-ms",
        str(args.timeout_ms),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)

    def forward() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                out.put(json.loads(line))
            except json.JSONDecodeError:
                print(line, end="", file=sys.stderr)
        proc.wait()
        out.put({"kind": "done", "robot": index, "payload": proc.returncode})

    threading.Thread(target=forward, daemon=True).start()
    return proc


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's figures; `escalation_rate` is the share of decisions escalated to a teacher."""
    latencies = np.array([ms for r in results for ms in r["latencies_ms"]], dtype=np.float64)
    decisions = int(latencies.size)
    judged = [r["success"] for r in results if r["success"] is not None]
    wall = max(r["end"] for r in results) - min(r["start"] for r in results) if results else 0.0
    decided_by: dict[str, int] = {}
    for r in results:
        for who, n in r["decided_by"].items():
            decided_by[who] = decided_by.get(who, 0) + n
    escalated = sum(n for who, n in decided_by.items() if who.startswith("escalated:"))
    versions = sorted({v for r in results for v in r["model_versions"]})
    failed = sorted(r["seed"] for r in results if r["success"] is False)
    return {
        "success_rate": float(np.mean(judged)) if judged else None,
        "episodes": len(results),
        "decisions": decisions,
        "p50_ms": float(np.percentile(latencies, 50)) if decisions else None,
        "p99_ms": float(np.percentile(latencies, 99)) if decisions else None,
        "decisions_per_s": decisions / wall if wall > 0 else 0.0,
        "decided_by": decided_by,
        "escalation_rate": escalated / decisions if decisions else 0.0,
        "model_versions": versions,
        "failed_seeds": failed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--endpoint", default="tcp://127.0.0.1:5555")
    parser.add_argument("--env", default="tabletop/PickPlace-v0")
    parser.add_argument("--robots", type=int, default=4)
    parser.add_argument("--episodes", type=int, default=20, help="episodes in total")
    parser.add_argument(
        "--seed", type=int, default=0, help="episodes use seeds SEED .. SEED+EPISODES-1"
    )
    parser.add_argument("--timeout-ms", type=int, default=30_000, help="per decision")
    parser.add_argument("--deadline-s", type=float, default=1800, help="give up after this long")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress bar on stderr (default: when stderr is a terminal)",
    )
    parser.add_argument("--robot-index", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--robot-episodes", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--robot-offset", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.robot_index is not None:
        return robot(args.robot_index, args)
    if args.robots < 1 or args.episodes < 1:
        parser.error("--robots and --episodes must be >= 1")

    from tqdm import tqdm

    out: queue.Queue = queue.Queue()
    shares = [n for n in split(args.episodes, args.robots) if n > 0]
    print(
        f"robot loop: {len(shares)} robots × {args.env} → {args.endpoint}, "
        f"{args.episodes} episodes",
        flush=True,
    )
    offsets = [sum(shares[:i]) for i in range(len(shares))]
    procs = [launch(i, n, offsets[i], args, out) for i, n in enumerate(shares)]

    results: list[dict[str, Any]] = []
    errors: list[str] = []
    running = set(range(len(procs)))
    deadline = time.monotonic() + args.deadline_s
    try:  # robots never outlive this script (deadline, Ctrl-C, a crash)
        bar_off = None if args.progress is None else not args.progress
        with tqdm(
            total=args.episodes, unit="episode", file=sys.stderr, leave=False, disable=bar_off
        ) as bar:
            while running and time.monotonic() < deadline:
                try:
                    event = out.get(timeout=TICK_S)
                except queue.Empty:
                    continue
                kind, index, payload = event["kind"], event["robot"], event["payload"]
                if kind == "episode":
                    results.append(payload)
                    bar.update(1)
                    outcome = {True: "success", False: "FAILED", None: "ended"}[payload["success"]]
                    bar.write(
                        f"robot {index}  episode {len(results):3d}  {outcome:7s}  "
                        f"{payload['decisions']:3d} decisions  "
                        f"median {np.median(payload['latencies_ms']):6.2f} ms  "
                        f"reward {payload['total_reward']:8.2f}"
                    )
                elif kind == "error":
                    errors.append(f"robot {index} failed:\n{payload}")
                else:
                    running.discard(index)
                    if payload != 0 and not any(e.startswith(f"robot {index} ") for e in errors):
                        errors.append(f"robot {index} exited with code {payload}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    if running:
        errors.append(f"deadline of {args.deadline_s} s passed with robots {sorted(running)} busy")

    summary = summarise(results)
    for error in errors:
        print(error, file=sys.stderr)
    p50 = summary["p50_ms"] or float("nan")
    p99 = summary["p99_ms"] or float("nan")
    rate = summary["success_rate"]
    rate_text = "n/a (env reports no success)" if rate is None else f"{rate:.0%}"
    print(
        f"success rate {rate_text} over {summary['episodes']} episodes · "
        f"{summary['decisions']} decisions · latency p50 {p50:.2f} ms, p99 {p99:.2f} ms · "
        f"{summary['decisions_per_s']:.1f} decisions/s",
        flush=True,
    )
    if args.json:
        print(json.dumps(summary), flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
