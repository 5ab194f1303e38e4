"""The simulator plugin: let a gymnasium env be driven by `agent serve`.

`RemotePolicy` is the rollout loop's `Policy` (envs.rollout) over an
`AgentClient`: it turns a gymnasium observation into a decide request,
returns the server's decision, and reports rewards and the end of each
episode so the server records full transitions:

* skill envs send camera images, state, instruction and the current skill
  menu; simulated tabletop robots (`SkillExecutor` envs, skills or low-level)
  also attach the SIM-ONLY privileged state so the server-side oracle can teach;
* flat-observation envs (Pusher-v5, Reacher-v5) send their observation as
  `state` and execute the returned low-level action.

The first step of an episode carries its seed and env id, which the server
records in the episode's summary.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym

from agent.client import AgentClient
from agent.messages import Decision
from envs.rollout import observation_fields
from envs.skill_env import SkillExecutor


class RemotePolicy:
    """A `Policy` whose decisions come from the runtime. Not thread-safe (one per robot).

    The server keeps the episode's history itself (from what it answered), so
    the `history` the loop passes is not sent.
    """

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
        self.seed: int | None = None
        self.task: str | None = None
        self.model_version: str | None = None

    def start_episode(self, env: gym.Env, episode_id: str, seed: int | None) -> None:
        self.episode_id, self.step, self.seed = episode_id, 0, seed
        self.task = env.spec.id if env.spec is not None else None

    def decide(
        self,
        env: gym.Env,
        obs: Any,
        info: dict[str, Any],
        *,
        reward: float | None = None,
        history: list[str] | None = None,
    ) -> Decision:
        sim = None
        if self.send_privileged and isinstance(env.unwrapped, SkillExecutor):
            sim = env.unwrapped.privileged_state()
        first = self.step == 0
        reply = self.client.decide(
            episode_id=self.episode_id,
            step=self.step,
            sim=sim,
            reward=reward,
            seed=self.seed if first else None,
            task=self.task if first else None,
            **observation_fields(obs, info),
        )
        self.step += 1
        self.model_version = reply.model_version
        return reply.decision

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
