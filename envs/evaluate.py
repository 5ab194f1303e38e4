"""Oracle success rates per task: `python -m envs.evaluate --seeds 100` prints JSON."""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from envs import ENV_IDS, make_skill_env
from envs.oracle import OraclePolicy
from envs.rollout import run_episode


def evaluate(env_ids: list[str], seeds: int, progress: bool = True) -> dict[str, dict]:
    """Success rate, skills and low-level steps per episode for each env id."""
    from tqdm import tqdm

    results = {}
    for env_id in env_ids:
        env = make_skill_env(env_id, images=False)
        start = time.perf_counter()
        policy = OraclePolicy()
        logs = [
            run_episode(env, policy, seed)
            for seed in tqdm(range(seeds), desc=env_id, disable=not progress, file=sys.stderr)
        ]
        env.close()
        results[env_id] = {
            "episodes": seeds,
            "success_rate": sum(bool(log.success) for log in logs) / seeds,
            "failed_seeds": [log.seed for log in logs if not log.success],
            "mean_skills": float(np.mean([len(log.skills) for log in logs])),
            "mean_low_level_steps": float(np.mean([log.low_level_steps for log in logs])),
            "seconds": round(time.perf_counter() - start, 2),
        }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=100, help="episodes per task (seeds 0..N-1)")
    parser.add_argument(
        "--env", action="append", choices=sorted(ENV_IDS), help="env id (repeatable; default: all)"
    )
    parser.add_argument(
        "--min-success", type=float, default=0.95, help="exit 1 if any task is below this rate"
    )
    args = parser.parse_args(argv)
    results = evaluate(args.env or sorted(ENV_IDS), args.seeds)
    print(json.dumps(results, indent=2))
    return 0 if all(r["success_rate"] >= args.min_success for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
