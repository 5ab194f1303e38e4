"""The simulator plugin: let a gymnasium env be driven by `agent serve`.

`RemotePolicy` turns a gymnasium observation into a decide request (through
`agent.client`), returns the server's decision, and reports rewards and the
end of each episode so the server records full transitions. `run_episode`
drives one episode:

* tabletop envs wrapped in `SkillEnv` send camera images, state, instruction
  and the current skill menu; the decision's skill (or image point) is
  executed. Simulated robots also attach the SIM-ONLY privileged state so the
  server-side oracle can teach;
* flat-observation envs (Pusher-v5, Reacher-v5) send their observation as
  `state` and execute the returned low-level action.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np

from agent.client import AgentClient, DecisionReply

IMAGE_KEYS = ("image", "wrist_image")


def observation_request(obs: Any, info: dict[str, Any]) -> dict[str, Any]:
    """The decide-request fields for a gymnasium observation (pure)."""
    if isinstance(obs, dict):
        state = obs.get("state")
        return {
            "images": {k: np.asarray(obs[k], np.uint8) for k in IMAGE_KEYS if k in obs},
            "state": None if state is None else np.asarray(state, np.float32),
            "instruction": str(obs.get("instruction", info.get("instruction", ""))),
            "options": list(info.get("options", [])),
        }
    return {"state": np.asarray(obs, np.float32).ravel(), "instruction": "", "options": []}


def has_skills(env: gym.Env) -> bool:
    return callable(getattr(env, "step_point", None)) and callable(
        getattr(env, "skill_options", None)
    )


def execute(env: gym.Env, reply: DecisionReply) -> tuple[Any, float, bool, bool, dict[str, Any]]:
    """Carry out a decision: a skill or image point on a SkillEnv, else a low-level action."""
    decision = reply.decision
    if has_skills(env):
        if decision.point is not None:
            return env.step_point(*decision.point)
        if decision.skill_index is not None:
            return env.step(int(decision.skill_index))
        raise ValueError(
            "the server sent no skill or point for a skill env "
            f"(model {reply.model_id}); is it serving the right env?"
        )
    if decision.action is None:
        raise ValueError(f"the server sent no low-level action (model {reply.model_id})")
    space = env.action_space
    action = np.asarray(decision.action, dtype=space.dtype).reshape(space.shape)
    return env.step(np.clip(action, space.low, space.high))


class RemotePolicy:
    """A gymnasium policy whose decisions come from the runtime. Not thread-safe (one per robot)."""

    def __init__(
        self, client: AgentClient | str, *, send_privileged: bool = True, timeout_ms: int = 30_000
    ) -> None:
        self.client = (
            client
            if isinstance(client, AgentClient)
            else AgentClient(client, timeout_ms=timeout_ms, retries=1)
        )
        self.send_privileged = send_privileged
        self.episode_id = ""
        self.step = 0

    def start_episode(self) -> str:
        self.episode_id = uuid.uuid4().hex
        self.step = 0
        return self.episode_id

    def act(
        self, env: gym.Env, obs: Any, info: dict[str, Any], reward: float | None = None
    ) -> DecisionReply:
        """The next decision for `obs`; `reward` is what the previous decision earned."""
        if not self.episode_id:
            self.start_episode()
        sim = None
        privileged = getattr(env, "privileged_state", None)
        if self.send_privileged and callable(privileged):
            sim = privileged()
        reply = self.client.decide(
            episode_id=self.episode_id,
            step=self.step,
            sim=sim,
            reward=reward,
            **observation_request(obs, info),
        )
        self.step += 1
        return reply

    def end_episode(
        self, *, reward: float | None, terminated: bool, truncated: bool, success: bool | None
    ) -> None:
        self.client.end_episode(
            self.episode_id,
            reward=reward,
            terminated=terminated,
            truncated=truncated,
            success=success,
        )
        self.episode_id = ""

    def close(self) -> None:
        self.client.close()


@dataclass
class EpisodeResult:
    episode_id: str
    success: bool | None  # None: the env has no notion of success (no info["is_success"])
    decisions: int
    total_reward: float
    terminated: bool
    truncated: bool
    latencies_ms: list[float] = field(default_factory=list)


def run_episode(
    env: gym.Env, policy: RemotePolicy, seed: int | None = None, max_decisions: int = 1000
) -> EpisodeResult:
    """Reset `env`, let the runtime decide until the episode ends, report it to the server."""
    obs, info = env.reset(seed=seed)
    episode_id = policy.start_episode()
    reward: float | None = None
    total, latencies = 0.0, []
    terminated = truncated = False
    for _ in range(max_decisions):
        reply = policy.act(env, obs, info, reward)
        latencies.append(reply.latency_ms)
        obs, step_reward, terminated, truncated, info = execute(env, reply)
        reward = float(step_reward)
        total += reward
        if terminated or truncated:
            break
    else:
        truncated = True
    success = bool(info["is_success"]) if "is_success" in info else None
    policy.end_episode(reward=reward, terminated=terminated, truncated=truncated, success=success)
    return EpisodeResult(
        episode_id, success, len(latencies), total, terminated, truncated, latencies
    )
