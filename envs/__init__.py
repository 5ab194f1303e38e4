"""Gymnasium + MuJoCo tabletop robot suite with language skills and a scripted oracle.

Importing this package registers the `tabletop/*-v0` ids (string entry points:
MuJoCo is imported only when an env is made) and makes offscreen EGL rendering
the default (`MUJOCO_GL`), once for the whole project.
"""

from __future__ import annotations

import os
from typing import Any

# The one default of the project: render offscreen (EGL) unless the user chose a
# backend. Set before anything can import MuJoCo: every simulator import goes
# through this package (`envs.tabletop`, the rollout loop, the plugin).
os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym

from envs.skill_env import SkillEnv
from envs.skills import MAX_OPTIONS

ENV_IDS: dict[str, str] = {
    "tabletop/PickPlace-v0": "pick_place",
    "tabletop/Stack-v0": "stack",
    "tabletop/Sort-v0": "sort",
    "tabletop/Push-v0": "push",
}
MAX_EPISODE_STEPS = {"pick_place": 300, "stack": 500, "sort": 700, "push": 400}

for _env_id, _task in ENV_IDS.items():
    if _env_id not in gym.registry:
        gym.register(
            id=_env_id,
            entry_point="envs.tabletop.env:TabletopEnv",
            kwargs={"task": _task},
            max_episode_steps=MAX_EPISODE_STEPS[_task],
        )


def make_skill_env(env_id: str, max_skills: int = 40, **kwargs: Any) -> SkillEnv:
    """`gym.make(env_id, **kwargs)` wrapped in the language-skill layer; an episode is
    truncated after `max_skills` skills (see `SkillEnv`)."""
    return SkillEnv(gym.make(env_id, **kwargs), max_skills=max_skills)


__all__ = ["ENV_IDS", "MAX_OPTIONS", "SkillEnv", "make_skill_env"]
