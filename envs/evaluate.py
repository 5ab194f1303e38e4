"""Oracle success rates per task: `python -m envs.evaluate --seeds 100` prints JSON.

Also home of `run_oracle_episode`, the one oracle rollout loop shared by the
contact sheet and the tests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from envs import ENV_IDS, SkillEnv, make_skill_env, oracle


@dataclass
class EpisodeLog:
    """One oracle episode: what was asked, chosen and seen."""

    seed: int
    instruction: str
    success: bool = False
    skills: list[str] = field(default_factory=list)
    rationales: list[str] = field(default_factory=list)
    low_level_steps: int = 0
    frames: list[np.ndarray] = field(default_factory=list)  # scene image before each skill


def run_oracle_episode(env: SkillEnv, seed: int, keep_frames: bool = False) -> EpisodeLog:
    """Reset with `seed`, let the oracle pick skills until success or the skill limit."""
    obs, info = env.reset(seed=seed)
    log = EpisodeLog(seed, info["instruction"])
    for _ in range(env.max_skills):
        if keep_frames:
            log.frames.append(obs["image"])
        decision = oracle.decide(env.privileged_state(), info["options"])
        obs, _, terminated, truncated, info = env.step(decision.skill_index)
        log.skills.append(info["skill"])
        log.rationales.append(decision.rationale)
        log.low_level_steps += info["low_level_steps"]
        if terminated or truncated:
            break
    if keep_frames:
        log.frames.append(obs["image"])
    log.success = bool(info["is_success"])
    return log


def evaluate(env_ids: list[str], seeds: int, progress: bool = True) -> dict[str, dict]:
    """Success rate, skills and low-level steps per episode for each env id."""
    from tqdm import tqdm

    results = {}
    for env_id in env_ids:
        env = make_skill_env(env_id, images=False)
        start = time.perf_counter()
        logs = [
            run_oracle_episode(env, seed)
            for seed in tqdm(range(seeds), desc=env_id, disable=not progress, file=sys.stderr)
        ]
        env.close()
        results[env_id] = {
            "episodes": seeds,
            "success_rate": sum(log.success for log in logs) / seeds,
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
