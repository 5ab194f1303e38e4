"""The one rollout loop: any `Policy` drives any gymnasium env for an episode.

Policies are the runtime over ZeroMQ (`envs.plugin.RemotePolicy`), the oracle
run locally (`envs.oracle.OraclePolicy`) and `LocalPolicy`, which runs any
batch decider in this process (a backend, the torch student
`agent.student.inference.TorchStudent`, the ONNX runner
`agent.student.onnx.OnnxRunner` on an edge robot); all of them are driven by
`run_episode`, and every decision is carried out by `execute`:

* on a skill env (`envs.skill_env.SkillChoiceEnv`) a decision's skill index
  (or image point) is executed;
* elsewhere (Pusher-v5, Reacher-v5, the low-level tabletop env) its
  low-level action is clipped to the action space and stepped.

The loop keeps the episode's history (the skills executed so far) and hands
it to the policy, so policies with memory need no bookkeeping of their own.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import gymnasium as gym
import numpy as np

from agent.messages import Decision, Observation
from envs.skill_env import SkillChoiceEnv

IMAGE_KEYS = ("image", "wrist_image")


class BatchDecider(Protocol):
    """Anything that decides a batch of observations: a backend, the torch student, the ONNX
    runner. An exception in a decision's place (a backend's `BackendError`) is raised."""

    def decide(self, observations: Sequence[Observation]) -> Sequence[Decision | Exception]: ...


class Policy(Protocol):
    """Decides an env's next step. Not thread-safe: one per robot."""

    def start_episode(self, env: gym.Env, episode_id: str, seed: int | None) -> None:
        """A new episode begins (after `env.reset`)."""

    def decide(
        self,
        env: gym.Env,
        obs: Any,
        info: dict[str, Any],
        *,
        reward: float | None,
        history: list[str],
    ) -> Decision:
        """The next decision; `reward` is what the previous one earned, `history` the
        skills executed so far in this episode (oldest first)."""

    def end_episode(
        self, *, reward: float | None, terminated: bool, truncated: bool, success: bool | None
    ) -> None:
        """The episode is over; `reward` is what the last decision earned."""


@dataclass
class EpisodeResult:
    """What one episode did (JSON-friendly unless `frames` were kept)."""

    episode_id: str
    seed: int | None
    success: bool | None  # None: the env has no notion of success (no info["is_success"])
    decisions: int
    total_reward: float
    terminated: bool
    truncated: bool
    latencies_ms: list[float] = field(default_factory=list)
    skills: list[str] = field(default_factory=list)  # executed, in order (skill envs)
    reasoning: list[str | None] = field(default_factory=list)
    decided_by: dict[str, int] = field(default_factory=dict)  # who decided, how often
    model_versions: list[str] = field(default_factory=list)  # distinct, in order of use
    instruction: str = ""
    low_level_steps: int = 0  # simulator steps the skills took (skill envs)
    frames: list[np.ndarray] = field(default_factory=list)  # scene image before each step


def observation_fields(obs: Any, info: dict[str, Any]) -> dict[str, Any]:
    """The `Observation` fields (images, state, instruction, options) of a gymnasium observation."""
    if isinstance(obs, dict):
        state = obs.get("state")
        return {
            "images": {k: np.asarray(obs[k], np.uint8) for k in IMAGE_KEYS if k in obs},
            "state": None if state is None else np.asarray(state, np.float32),
            "instruction": str(obs.get("instruction", info.get("instruction", ""))),
            "options": list(info.get("options", [])),
        }
    return {"state": np.asarray(obs, np.float32).ravel(), "instruction": "", "options": []}


class LocalPolicy:
    """A batch decider as a rollout-loop `Policy`, in this process: no server.

    Each step becomes an `Observation` (with the episode's history, as the
    server would fill it) decided alone; `decided_by` names the decider in the
    result where it leaves it empty. `model_version` is the decider's, read at
    every step (a backend that hot-reloads changes it).
    """

    def __init__(self, decider: BatchDecider, decided_by: str, robot_id: str = "local") -> None:
        self.decider = decider
        self.decided_by = decided_by
        self.robot_id = robot_id
        self.episode_id = ""

    @property
    def model_version(self) -> str | None:
        return getattr(self.decider, "model_version", None)

    def start_episode(self, env: gym.Env, episode_id: str, seed: int | None) -> None:
        self.episode_id = episode_id

    def decide(
        self,
        env: gym.Env,
        obs: Any,
        info: dict[str, Any],
        *,
        reward: float | None,
        history: list[str],
    ) -> Decision:
        observation = Observation(
            self.robot_id,
            self.episode_id,
            len(history),
            **observation_fields(obs, info),
            history=history,
        )
        (decision,) = self.decider.decide([observation])
        if isinstance(decision, Exception):
            raise decision
        decision.decided_by = decision.decided_by or self.decided_by
        return decision

    def end_episode(self, **_: Any) -> None:
        pass


class RandomChoice:
    """The baseline every learner is shown next to: a uniformly random option of the menu at
    every step (seeded)."""

    model_version = "random"

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def start_episode(self, env: gym.Env, episode_id: str, seed: int | None) -> None:
        pass

    def decide(self, env: gym.Env, obs: Any, info: dict[str, Any], **_: Any) -> Decision:
        options = info["options"]
        pick = int(self.rng.integers(len(options)))
        return Decision(skill_index=pick, skill=options[pick], decided_by="random")

    def end_episode(self, **_: Any) -> None:
        pass


def execute(env: gym.Env, decision: Decision) -> tuple[Any, float, bool, bool, dict[str, Any]]:
    """Carry out a decision: a skill or image point on a skill env, else a low-level action."""
    if isinstance(env, SkillChoiceEnv):
        if decision.point is not None:
            return env.step_point(*decision.point)
        if decision.skill_index is not None:
            return env.step(int(decision.skill_index))
        raise ValueError(
            f"the decision (by {decision.decided_by or 'an unnamed policy'}) has no skill or "
            "point for a skill env; is the server serving the right env?"
        )
    if decision.action is None:
        raise ValueError(
            f"the decision (by {decision.decided_by or 'an unnamed policy'}) has no low-level action"
        )
    space = env.action_space
    action = np.asarray(decision.action, dtype=space.dtype).reshape(space.shape)
    return env.step(np.clip(action, space.low, space.high))


def run_episode(
    env: gym.Env,
    policy: Policy,
    seed: int | None = None,
    *,
    max_decisions: int = 1000,
    keep_frames: bool = False,
) -> EpisodeResult:
    """Reset `env` with `seed` and let `policy` decide until the episode ends."""
    obs, info = env.reset(seed=seed)
    result = EpisodeResult(uuid.uuid4().hex, seed, None, 0, 0.0, False, False)
    result.instruction = str(info.get("instruction", ""))
    policy.start_episode(env, result.episode_id, seed)
    reward: float | None = None
    for _ in range(max_decisions):
        if keep_frames and isinstance(obs, dict) and "image" in obs:
            result.frames.append(obs["image"])
        start = time.perf_counter()
        decision = policy.decide(env, obs, info, reward=reward, history=list(result.skills))
        result.latencies_ms.append(1e3 * (time.perf_counter() - start))
        _count(result, decision, getattr(policy, "model_version", None))
        obs, step_reward, terminated, truncated, info = execute(env, decision)
        if "skill" in info:
            result.skills.append(info["skill"])
        result.low_level_steps += int(info.get("low_level_steps", 0))
        reward = float(step_reward)
        result.total_reward += reward
        result.terminated, result.truncated = bool(terminated), bool(truncated)
        if terminated or truncated:
            break
    else:
        result.truncated = True
    if keep_frames and isinstance(obs, dict) and "image" in obs:
        result.frames.append(obs["image"])
    result.success = bool(info["is_success"]) if "is_success" in info else None
    policy.end_episode(
        reward=reward,
        terminated=result.terminated,
        truncated=result.truncated,
        success=result.success,
    )
    return result


def _count(result: EpisodeResult, decision: Decision, version: str | None) -> None:
    result.decisions += 1
    result.reasoning.append(decision.reasoning)
    who = decision.decided_by or "unknown"
    result.decided_by[who] = result.decided_by.get(who, 0) + 1
    if version is not None and version not in result.model_versions:
        result.model_versions.append(version)
