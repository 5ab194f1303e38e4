"""A backend that costs nothing: zero actions, first skill. For benchmarks and plumbing tests."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from agent.backends.base import Backend
from agent.messages import Decision, Observation


class ZeroBackend(Backend):
    name = "zero"

    def decide(self, batch: Sequence[Observation]) -> list[Decision]:
        shape = self.env.action_shape
        return [
            Decision(
                action=None if shape is None else np.zeros(shape, np.float32),
                skill_index=0 if obs.options else None,
                skill=obs.options[0] if obs.options else None,
            )
            for obs in batch
        ]
