"""Tabletop env speed: low-level env steps/s vs raw mujoco.mj_step on the same model.

Prints JSON. `physics_ratio` = (env steps/s x frame_skip) / raw mj_step/s, both
measured here in one run on the same model and state; the goal is >= 0.5.
Rendering is measured separately at 224x224 (scene camera).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym
import mujoco
import numpy as np

import envs


def raw_steps_per_s(model: mujoco.MjModel, data: mujoco.MjData, steps: int) -> float:
    mujoco.mj_step(model, data, nstep=100)  # warm up
    start = time.perf_counter()
    for _ in range(steps):
        mujoco.mj_step(model, data)
    return steps / (time.perf_counter() - start)


def env_steps_per_s(env: gym.Env, steps: int, seed: int) -> float:
    env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    actions = rng.uniform(-1, 1, (steps, 4)).astype(np.float32)
    start = time.perf_counter()
    for action in actions:
        _, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            env.reset()
    return steps / (time.perf_counter() - start)


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
    """Best of `rounds` interleaved runs each, so shared-CPU noise hits both sides alike."""
    env = gym.make(env_id, images=False)
    base = env.unwrapped
    env.reset(seed=0)
    data = mujoco.MjData(base.model)
    data.qpos[:], data.ctrl[:] = base.data.qpos, base.data.ctrl
    raw, wrapped, bare = 0.0, 0.0, 0.0
    for _ in range(rounds):
        raw = max(raw, raw_steps_per_s(base.model, data, steps * base.frame_skip))
        wrapped = max(wrapped, env_steps_per_s(env, steps, seed=0))
        bare = max(bare, env_steps_per_s(base, steps, seed=0))
    env.close()
    return {
        "frame_skip": base.frame_skip,
        "raw_mj_steps_per_s": round(raw),
        "env_steps_per_s": round(wrapped),
        "env_steps_per_s_unwrapped": round(bare),
        "physics_ratio": round(wrapped * base.frame_skip / raw, 3),
        "physics_ratio_unwrapped": round(bare * base.frame_skip / raw, 3),
        f"render_fps_{size}": round(render_fps(env_id, frames, size), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="low-level env steps per env")
    parser.add_argument("--frames", type=int, default=200, help="rendered frames per env")
    parser.add_argument("--size", type=int, default=224, help="square image size")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repeats (best kept)")
    parser.add_argument("--env", action="append", choices=sorted(envs.ENV_IDS))
    args = parser.parse_args()
    results = {env_id: measure(env_id, args.steps, args.frames, args.size, args.rounds)
               for env_id in args.env or sorted(envs.ENV_IDS)}  # fmt: skip
    print(json.dumps({"benchmark": "envs_speed", "results": results}, indent=2))


if __name__ == "__main__":
    main()
