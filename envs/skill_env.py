"""The skill-env contract, `SkillEnv`, and a checker for envs that claim the contract.

Two roles, each a `typing.Protocol` checked at runtime:

* `SkillExecutor`: a low-level env that can run skill sentences (the tabletop
  env): `skill_options()`, `privileged_state()`, `execute_skill(sentence,
  point=None)`, `observation()`, `info()`. `SkillEnv` wraps one.
* `SkillChoiceEnv`: a multiple-choice "what is the next action?" env, whose
  action `i` executes the i-th sentence of the current menu
  (`info["options"]`): `skill_options()`, `privileged_state()` (SIM-ONLY,
  msgpack-friendly) and `step_point(x, y)` besides the gymnasium API.
  `SkillEnv` is one; the rollout loop and the runtime's env description go by
  this protocol, never by attribute probing.

`check_skill_env(env)` verifies the contract the way gymnasium's `check_env`
verifies the env API. One skill step is many low-level steps, and the cameras
render once per skill.
"""

from __future__ import annotations

import json
from typing import Any, Protocol, runtime_checkable

import gymnasium as gym
from gymnasium import spaces

from envs.skills import MAX_OPTIONS, point_skill


@runtime_checkable
class SkillExecutor(Protocol):
    """A low-level env that runs skill sentences (what `SkillEnv` wraps)."""

    def skill_options(self) -> list[str]: ...

    def privileged_state(self) -> dict[str, Any]: ...

    def execute_skill(self, skill: str, point: tuple[float, float] | None = None) -> Any: ...

    def observation(self) -> Any: ...

    def info(self) -> dict[str, Any]: ...


@runtime_checkable
class SkillChoiceEnv(Protocol):
    """A multiple-choice env: action i runs option i of `info["options"]`."""

    def skill_options(self) -> list[str]: ...

    def privileged_state(self) -> dict[str, Any]: ...

    def step_point(self, x: float, y: float) -> tuple[Any, float, bool, bool, dict[str, Any]]: ...


class SkillEnv(gym.Wrapper):
    """Discrete(MAX_OPTIONS) over the current skill menu of a `SkillExecutor` env.

    How an episode ends: `terminated` when the task succeeds, `truncated` after
    `max_skills` skill steps (default 40). A skill runs on the unwrapped
    executor (at most 80 low-level steps each), so the registered id's
    `TimeLimit` (its `max_episode_steps`, counted in low-level steps) bounds
    low-level control only and never a skill episode.
    """

    def __init__(self, env: gym.Env, max_skills: int = 40) -> None:
        super().__init__(env)
        if not isinstance(env.unwrapped, SkillExecutor):
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
        info["skill"] = skill or point_skill(*point)
        info["low_level_steps"] = result.steps
        info["skill_completed"] = result.completed
        truncated = self._skills_done >= self.max_skills and not result.terminated
        return base.observation(), result.reward, result.terminated, truncated, info


def check_skill_env(env: gym.Env, seed: int = 0) -> None:
    """Raise AssertionError (with what is wrong) unless `env` keeps the skill-env contract.

    Resets with `seed` and takes one step with option 0; checks the protocol,
    the observation against its space, the menu, the SIM-ONLY state, the
    step's info and that an index outside the menu is refused.
    """
    assert isinstance(env, SkillChoiceEnv), f"{env!r} is not a SkillChoiceEnv"
    assert isinstance(env.action_space, spaces.Discrete), "the action space must be Discrete"
    obs, info = env.reset(seed=seed)
    assert env.observation_space.contains(obs), "reset's observation is outside the space"
    _check_menu(info, env.skill_options())
    assert isinstance(info.get("instruction"), str), "info['instruction'] must be a string"
    try:
        json.dumps(env.privileged_state())
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"privileged_state() must be plain JSON types: {exc}") from None
    try:
        env.step(len(info["options"]))
    except ValueError:
        pass
    else:
        raise AssertionError("an index outside the menu must raise ValueError")
    obs, reward, terminated, truncated, info = env.step(0)
    assert env.observation_space.contains(obs), "step's observation is outside the space"
    assert isinstance(reward, float | int), "the reward must be a number"
    assert isinstance(terminated, bool) and isinstance(truncated, bool)
    assert isinstance(info.get("skill"), str), "info['skill'] must name the executed skill"
    assert isinstance(info.get("is_success"), bool), "info['is_success'] must be a bool"
    _check_menu(info, env.skill_options())


def _check_menu(info: dict[str, Any], menu: list[str]) -> None:
    options = info.get("options")
    assert isinstance(options, list) and options, "info['options'] must be a non-empty list"
    assert len(options) <= MAX_OPTIONS, f"at most {MAX_OPTIONS} options, got {len(options)}"
    assert all(isinstance(o, str) and o for o in options), "options must be non-empty strings"
    assert options == menu, "info['options'] must equal skill_options()"
