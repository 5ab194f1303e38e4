"""The student deciding in torch: a batch of observations to decisions, and the student as a `Policy`.

`decide` (featurise, forward, `trainer.features.choose`) is used by the
`policy` backend of the runtime and by `StudentPolicy`, which runs a
checkpoint in process inside the rollout loop (envs.rollout) without a server.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.messages import Decision, Observation
from trainer.features import Featuriser, choose


def decide(
    model: Any, featuriser: Featuriser, observations: Sequence[Observation]
) -> list[Decision]:
    """The student's decisions for a batch (torch, inference mode)."""
    import torch

    arrays = featuriser(observations)
    with torch.inference_mode():
        scores, actions = model(**{k: torch.from_numpy(v) for k, v in arrays.items()})
    return choose(scores.numpy(), None if actions is None else actions.numpy(), observations)


class StudentPolicy:
    """A published version of the student as a rollout-loop `Policy`, in this process."""

    def __init__(self, checkpoint: str | Path, threads: int = 1) -> None:
        import torch

        from trainer.checkpoint import load

        torch.set_num_threads(threads)
        self.model, self.version = load(checkpoint)
        self.featuriser = Featuriser(self.version.features)
        self.model_version = self.version.name
        self.episode_id = ""

    def start_episode(self, env: Any, episode_id: str, seed: int | None) -> None:
        self.episode_id = episode_id

    def decide(
        self, env: Any, obs: Any, info: dict[str, Any], *, reward: float | None, history: list[str]
    ) -> Decision:
        from envs.rollout import observation_fields

        observation = Observation(
            "local", self.episode_id, len(history), **observation_fields(obs, info), history=history
        )
        (decision,) = decide(self.model, self.featuriser, [observation])
        decision.decided_by = "policy"
        return decision

    def end_episode(self, **_: Any) -> None:
        pass
