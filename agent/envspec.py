"""What the server knows about the environment it serves, read once at start-up.

`describe_env` builds the env with gymnasium once to read its spaces and skill
menu: they go into the handshake metadata, into the backend's `EnvInfo`, and
into the `ObservationSpec` the server checks every observation against.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.backends.base import EnvInfo
from agent.messages import Observation
from agent.protocol import BAD_OBSERVATION, ProtocolError


@dataclass(frozen=True)
class ObservationSpec:
    """Shapes an env's observations have; observations that differ are refused."""

    state_shape: tuple[int, ...] | None = None
    image_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def check(self, obs: Observation) -> None:
        if self.state_shape is not None:
            if obs.state is None:
                raise ProtocolError(
                    BAD_OBSERVATION, f"state of shape {self.state_shape} is required"
                )
            if obs.state.shape != self.state_shape:
                raise ProtocolError(
                    BAD_OBSERVATION,
                    f"state must have shape {self.state_shape}, got {obs.state.shape}",
                )
        if not self.image_shapes:
            return
        for name, image in obs.images.items():
            want = self.image_shapes.get(name)
            if want is None:
                raise ProtocolError(
                    BAD_OBSERVATION,
                    f"unknown image {name!r}; this env has {sorted(self.image_shapes)}",
                )
            if image.shape != want:
                raise ProtocolError(
                    BAD_OBSERVATION, f"image {name!r} must have shape {want}, got {image.shape}"
                )


@dataclass(frozen=True)
class EnvDescription:
    info: EnvInfo
    spec: ObservationSpec
    metadata: dict[str, Any]  # msgpack-friendly, goes into the handshake


def describe_space(space: Any) -> dict[str, Any]:
    """A msgpack-friendly description of a gymnasium space."""
    from gymnasium import spaces

    if isinstance(space, spaces.Box):
        return {
            "type": "box",
            "shape": list(space.shape),
            "dtype": space.dtype.str,
            "low": space.low.astype(np.float64).ravel().tolist()[:64],
            "high": space.high.astype(np.float64).ravel().tolist()[:64],
        }
    if isinstance(space, spaces.Discrete):
        return {"type": "discrete", "n": int(space.n)}
    if isinstance(space, spaces.Dict):
        return {"type": "dict", "spaces": {k: describe_space(v) for k, v in space.spaces.items()}}
    if isinstance(space, spaces.Text):
        return {"type": "text", "max_length": int(space.max_length)}
    return {"type": type(space).__name__}


def observation_spec(space: Any) -> ObservationSpec:
    from gymnasium import spaces

    def is_image(s: Any) -> bool:
        return isinstance(s, spaces.Box) and s.dtype == np.uint8 and len(s.shape) == 3

    if isinstance(space, spaces.Dict):
        state = space.spaces.get("state")
        images = {k: tuple(s.shape) for k, s in space.spaces.items() if is_image(s)}
        return ObservationSpec(
            tuple(state.shape) if isinstance(state, spaces.Box) else None, images
        )
    if is_image(space):
        return ObservationSpec(None, {"image": tuple(space.shape)})
    if isinstance(space, spaces.Box) and len(space.shape) == 1:
        return ObservationSpec(tuple(space.shape), {})
    return ObservationSpec()


def _is_skill_executor(env: Any) -> bool:
    """Whether `env` keeps the skill contract (`envs.skill_env.SkillExecutor`)."""
    try:
        from envs.skill_env import SkillExecutor
    except ImportError:  # a runtime without the tabletop suite serves plain gymnasium envs
        return False
    return isinstance(env, SkillExecutor)


def describe_env(env_id: str) -> EnvDescription:
    """Make `env_id` once (tabletop ids are registered by importing `envs`) and describe it."""
    import gymnasium as gym

    with contextlib.suppress(ImportError):
        import envs  # noqa: F401 - registers the tabletop ids

    try:
        env = gym.make(env_id)
    except Exception as exc:
        raise ValueError(f"cannot make env {env_id!r}: {exc}") from exc
    try:
        base = env.unwrapped
        has_skills = _is_skill_executor(base)
        options: list[str] = []
        if has_skills:
            env.reset(seed=0)
            options = list(base.skill_options())
        action = env.action_space
        box = isinstance(action, gym.spaces.Box)
        info = EnvInfo(
            env_id=env_id,
            action_shape=tuple(action.shape) if box else None,
            action_low=action.low.copy() if box else None,
            action_high=action.high.copy() if box else None,
            has_skills=has_skills,
        )
        metadata = {
            "env_id": env_id,
            "observation_space": describe_space(env.observation_space),
            "action_space": describe_space(action),
            "has_skills": has_skills,
            "skill_options": options,
        }
        return EnvDescription(info, observation_spec(env.observation_space), metadata)
    finally:
        env.close()
