"""The env's scripted expert as a backend: the embedded default teacher.

It reads the SIM-ONLY privileged state (`Observation.sim`) that simulated
robots attach and calls the pure `envs.oracle.decide` on it; real robots,
which send no `sim`, get a clear error instead of a guess.
"""

from __future__ import annotations

from collections.abc import Sequence

from agent.backends.base import Backend, BackendError
from agent.messages import Decision, Observation


class OracleBackend(Backend):
    name = "oracle"

    def decide(self, batch: Sequence[Observation]) -> list[Decision]:
        from envs.oracle import as_decision, decide

        decisions = []
        for obs in batch:
            if obs.sim is None:
                raise BackendError(
                    "the oracle needs the simulator's privileged state "
                    "(observation.sim); only simulated robots can use it"
                )
            try:
                decisions.append(as_decision(decide(obs.sim, list(obs.options))))
            except (KeyError, TypeError, ValueError) as exc:
                raise BackendError(f"oracle could not decide: {exc}") from exc
        return decisions
