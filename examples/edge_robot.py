"""A robot running the exported student itself: onnxruntime, no server, no torch.

    python examples/edge_robot.py --model policy.onnx --env tabletop/PickPlace-v0 \\
        --episodes 20 --seed 1000000 --json

Runs the episodes through the one rollout loop (`envs.rollout.run_episode`)
with the ONNX runner (`agent.student.onnx.OnnxRunner` as a `LocalPolicy`), prints a line per episode and a summary, and
with `--json` one JSON object as the last line, with the keys of
`examples/robot_loop.py` (success_rate, episodes, decisions, p50_ms, p99_ms,
decisions_per_s, decided_by, escalation_rate, model_versions, failed_seeds)
plus `providers`. Episodes use the seeds SEED .. SEED+EPISODES-1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from robot_loop import make_env, summarise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="an exported .onnx file")
    parser.add_argument("--env", default="tabletop/PickPlace-v0")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--providers",
        default="CPUExecutionProvider",
        help="onnxruntime execution providers, in order (e.g. TensorrtExecutionProvider,"
        "CUDAExecutionProvider,CPUExecutionProvider with onnxruntime-gpu)",
    )
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = parser.parse_args(argv)
    from agent.extras import MissingExtra, require

    try:
        require("edge", "examples/edge_robot.py")
        require("sim", "examples/edge_robot.py")
    except MissingExtra as exc:
        print(f"edge robot: {exc}", file=sys.stderr)
        return 2
    from agent.student.onnx import EdgeError, OnnxRunner
    from envs.rollout import LocalPolicy, run_episode

    try:
        runner = OnnxRunner(args.model, args.providers.split(","), args.threads)
    except EdgeError as exc:
        print(f"edge robot: {exc}", file=sys.stderr)
        return 2
    policy = LocalPolicy(runner, "onnx", robot_id="edge")
    env = make_env(args.env)
    print(
        f"edge robot: {args.env}, student {policy.model_version} from {args.model} "
        f"on {runner.providers}",
        flush=True,
    )
    results = []
    for k in range(args.episodes):
        start = time.time()
        result = run_episode(env, policy, seed=args.seed + k)
        results.append({**asdict(result), "frames": [], "start": start, "end": time.time()})
        outcome = {True: "success", False: "FAILED", None: "ended"}[result.success]
        print(
            f"episode {k + 1:3d}  seed {result.seed}  {outcome:7s}  {result.decisions} decisions",
            flush=True,
        )
    env.close()
    summary = {**summarise(results), "providers": runner.providers}
    rate = summary["success_rate"]
    print(
        f"success rate {'n/a' if rate is None else f'{rate:.0%}'} over {summary['episodes']} episodes · "
        f"latency p50 {summary['p50_ms']:.2f} ms, p99 {summary['p99_ms']:.2f} ms",
        flush=True,
    )
    if args.json:
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
