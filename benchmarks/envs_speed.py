"""Tabletop env speed: low-level env steps/s vs raw mujoco.mj_step on the same model.

Prints JSON. `physics_ratio` = (env steps/s x frame_skip) / raw mj_step/s, both
measured here in one run on the same model and state (median of interleaved
rounds); the goal is >= 0.5.
Rendering is measured separately at 224x224 (scene camera).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import envs  # first: it sets the offscreen rendering default before MuJoCo loads

# isort: split
import gymnasium as gym
import mujoco
import numpy as np


def raw_seconds(model: mujoco.MjModel, data: mujoco.MjData, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        mujoco.mj_step(model, data)
    return time.perf_counter() - start


def env_seconds(env: gym.Env, actions: np.ndarray) -> float:
    start = time.perf_counter()
    for action in actions:
        _, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            env.reset()
    return time.perf_counter() - start


def render_fps(env_id: str, frames: int, size: int) -> float:
    env = gym.make(env_id, image_size=size)
    env.reset(seed=0)
    base = env.unwrapped
    base.observation()  # create the GL context outside the timing
    start = time.perf_counter()
    for _ in range(frames):
        base.observation()
    fps = frames / (time.perf_counter() - start)
    env.close()
    return fps


def measure(env_id: str, steps: int, frames: int, size: int, rounds: int) -> dict:
    """Short interleaved rounds (raw, wrapped env, bare env) so shared-CPU load hits all
    three alike; the raw physics restarts from the env's current state every round."""
    env = gym.make(env_id, images=False)
    base, skip = env.unwrapped, env.unwrapped.frame_skip
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    raw_data = mujoco.MjData(base.model)
    chunk = max(1, steps // rounds)
    raw_rates, env_rates, bare_rates, ratios, bare_ratios = [], [], [], [], []
    for _ in range(rounds):
        mujoco.mj_copyData(raw_data, base.model, base.data)
        raw = chunk * skip / raw_seconds(base.model, raw_data, chunk * skip)
        wrapped = chunk / env_seconds(env, rng.uniform(-1, 1, (chunk, 4)).astype(np.float32))
        bare = chunk / env_seconds(base, rng.uniform(-1, 1, (chunk, 4)).astype(np.float32))
        raw_rates.append(raw)
        env_rates.append(wrapped)
        bare_rates.append(bare)
        ratios.append(wrapped * skip / raw)
        bare_ratios.append(bare * skip / raw)
    env.close()
    return {
        "frame_skip": skip,
        "raw_mj_steps_per_s": round(float(np.median(raw_rates))),
        "env_steps_per_s": round(float(np.median(env_rates))),
        "env_steps_per_s_unwrapped": round(float(np.median(bare_rates))),
        "physics_ratio": round(float(np.median(ratios)), 3),
        "physics_ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
        "physics_ratio_unwrapped": round(float(np.median(bare_ratios)), 3),
        f"render_fps_{size}": round(render_fps(env_id, frames, size), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="low-level env steps per env")
    parser.add_argument("--frames", type=int, default=200, help="rendered frames per env")
    parser.add_argument("--size", type=int, default=224, help="square image size")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds (median kept)")
    parser.add_argument("--env", action="append", choices=sorted(envs.ENV_IDS))
    args = parser.parse_args()
    results = {
        env_id: measure(env_id, args.steps, args.frames, args.size, args.rounds)
        for env_id in args.env or sorted(envs.ENV_IDS)
    }
    report = {
        "benchmark": "envs_speed",
        "load_average_1m": round(os.getloadavg()[0], 2),
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
