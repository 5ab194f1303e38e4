"""The env's scripted expert as a backend: the embedded default teacher.

It reads the SIM-ONLY privileged state (`Observation.sim`) that simulated
robots attach and calls the pure `envs.oracle.decide` on it; real robots,
which send no `sim`, get a clear error instead of a guess. The `sim` dict
comes from the robot, so `check` validates it whole before it is batched.
"""

from __future__ import annotations

from collections.abc import Sequence

from agent.backends.base import Backend, BackendError, BadObservation
from agent.messages import Decision, Observation


class OracleBackend(Backend):
    name = "oracle"

    def check(self, obs: Observation) -> None:
        from envs.oracle import check_privileged

        if obs.sim is None:
            raise BadObservation(
                "the oracle needs the simulator's privileged state "
                "(observation.sim); only simulated robots can use it"
            )
        try:
            check_privileged(obs.sim)
        except ValueError as exc:
            raise BadObservation(f"bad observation.sim: {exc}") from None

    def decide(self, batch: Sequence[Observation]) -> list[Decision | BackendError]:
        from envs.oracle import as_decision, decide

        decisions: list[Decision | BackendError] = []
        for obs in batch:
            try:
                self.check(obs)
                decisions.append(as_decision(decide(obs.sim, list(obs.options))))
            except BadObservation as exc:
                decisions.append(BackendError(str(exc)))
            except Exception as exc:  # a well-formed scene the oracle has no answer for
                decisions.append(BackendError(f"oracle could not decide: {exc}"))
        return decisions
