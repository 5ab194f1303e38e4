"""SkillEnv: the tabletop env as a multiple-choice "what is the next action?" env.

Action `i` executes the i-th sentence of the current option menu (listed in
`info["options"]`) through the env's skill executor; one skill step is many
low-level steps, and the cameras render once per skill.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
from gymnasium import spaces

from envs.skills import MAX_OPTIONS


class SkillEnv(gym.Wrapper):
    """Discrete(MAX_OPTIONS) over the current skill menu of a tabletop env."""

    def __init__(self, env: gym.Env, max_skills: int = 40) -> None:
        super().__init__(env)
        if not hasattr(env.unwrapped, "execute_skill"):
            raise TypeError(f"{env.unwrapped!r} has no skill executor (not a tabletop env)")
        self.action_space = spaces.Discrete(MAX_OPTIONS)
        self.max_skills = max_skills
        self._skills_done = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self._skills_done = 0
        return self.env.reset(seed=seed, options=options)

    def step(self, action: int):
        menu = self.env.unwrapped.skill_options()
        index = int(action)
        if not 0 <= index < len(menu):
            raise ValueError(
                f"skill index {index} is out of range: the current menu has {len(menu)} "
                f"options (0..{len(menu) - 1}): {menu}"
            )
        return self._execute(menu[index], None)

    def step_point(self, x: float, y: float):
        """Execute move_to_pixel for a scene-camera point normalised to 0..1000."""
        return self._execute("", (float(x), float(y)))

    def skill_options(self) -> list[str]:
        return self.env.unwrapped.skill_options()

    def privileged_state(self) -> dict[str, Any]:
        return self.env.unwrapped.privileged_state()

    def _execute(self, skill: str, point: tuple[float, float] | None):
        base = self.env.unwrapped
        result = base.execute_skill(skill, point=point)
        self._skills_done += 1
        info = base.info()
        info["skill"] = skill or f"move to the point ({point[0]:.0f}, {point[1]:.0f})"
        info["low_level_steps"] = result.steps
        info["skill_completed"] = result.completed
        truncated = self._skills_done >= self.max_skills and not result.terminated
        return base.observation(), result.reward, result.terminated, truncated, info
