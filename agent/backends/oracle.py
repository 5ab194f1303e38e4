"""The env's scripted expert as a backend: the embedded default teacher.

It reads the SIM-ONLY privileged state (`Observation.sim`) that simulated
robots attach and calls the pure `envs.oracle.decide` on it; real robots,
which send no `sim`, get a clear error instead of a guess.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from agent.backends.base import Backend, BackendError, Decision, Observation


class OracleBackend(Backend):
    name = "oracle"

    def decide(self, batch: Sequence[Observation]) -> list[Decision]:
        from envs.oracle import decide

        decisions = []
        for obs in batch:
            if obs.sim is None:
                raise BackendError(
                    "the oracle needs the simulator's privileged state "
                    "(observation.sim); only simulated robots can use it"
                )
            try:
                answer = decide(obs.sim, list(obs.options))
            except (KeyError, TypeError, ValueError) as exc:
                raise BackendError(f"oracle could not decide: {exc}") from exc
            picked = answer.skill_index >= 0  # -1: no menu was sent, only the action counts
            decisions.append(
                Decision(
                    action=np.asarray(answer.action, np.float32),
                    skill_index=answer.skill_index if picked else None,
                    skill=answer.skill if picked else None,
                    reasoning=answer.rationale,
                )
            )
        return decisions
