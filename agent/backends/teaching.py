"""A student backend with a teacher: DAgger labels, mixing, and escalation when unsure.

    agent serve --backend policy --model CKPT --teacher oracle [--beta B] [--escalate-below P]

* Labels: the teacher decides on the same observations, in the same backend
  call, and its decision is recorded as the step's label (`teacher_*`
  columns) whoever acted, so the trainer learns the right choice in the
  states the student itself reaches. `label="escalated"` asks the teacher only
  where it acts (a Cosmos-Reason teacher is then asked for the hard steps only).
* Mixing (`beta`): the teacher's decision is executed with probability B
  (1: the teacher acts, 0: the student acts), drawn per robot and step from
  a seeded hash, so a run is reproducible; recorded as `teacher:<name>`.
* Escalation (`escalate_below`): where the student's probability for its
  choice is below P, the teacher's decision is executed instead, recorded as
  `escalated:<name>`.

What `decided_by` says is `agent.labels`'s, which the learners read.

Hot reload: new versions of the student and of a versioned teacher (a
post-trained Cosmos-Reason CKPT) are both picked up; the served identity is
the student's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent import labels
from agent.backends.base import Backend, BackendError
from agent.messages import Decision, Observation, TeacherLabel

LABELS = ("every", "escalated")


def draw(seed: int, robot_id: str, episode_id: str, step: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, robot, episode, step)."""
    key = f"{seed}/{robot_id}/{episode_id}/{step}".encode()
    return struct.unpack("<Q", hashlib.blake2b(key, digest_size=8).digest())[0] / 2**64


@dataclass
class Loaded:
    """New versions of the student and the teacher, either of which may be None."""

    student: Any = None
    teacher: Any = None


@dataclass
class TeachingCounters:
    decisions: int = 0
    teacher_acted: int = 0  # mixing (beta) picked the teacher
    escalated: int = 0  # the student was unsure
    teacher_calls: int = 0
    teacher_decisions: int = 0
    teacher_failed: int = 0


class Teaching(Backend):
    """Wraps a student backend and a teacher backend (see the module docstring)."""

    name = "teaching"

    def __init__(
        self,
        student: Backend,
        teacher: Backend,
        *,
        beta: float = 0.0,
        escalate_below: float | None = None,
        label: str = "every",
        seed: int = 0,
    ) -> None:
        if not 0.0 <= beta <= 1.0:
            raise BackendError(f"beta must be in [0, 1], got {beta}")
        if escalate_below is not None and not 0.0 <= escalate_below <= 1.0:
            raise BackendError(f"escalate_below must be in [0, 1], got {escalate_below}")
        if label not in LABELS:
            raise BackendError(f"label must be one of {LABELS}, got {label!r}")
        if label == "escalated" and beta > 0:
            raise BackendError("beta > 0 needs the teacher on every step (label=every)")
        self.name = f"{student.name}+{teacher.name}"  # type: ignore[misc]
        self.env = student.env
        self.model = student.model
        self.options = None
        self.student, self.teacher = student, teacher
        self.beta, self.escalate_below, self.label, self.seed = beta, escalate_below, label, seed
        every = [e for e in (student.reload_every_s, teacher.reload_every_s) if e is not None]
        self.reload_every_s = min(every) if every else None
        self.counters = TeachingCounters()

    @property
    def model_id(self) -> str:
        return self.student.model_id

    @property
    def model_version(self) -> str:
        return self.student.model_version

    def warmup(self) -> None:
        self.student.warmup()
        self.teacher.warmup()

    def load_version(self) -> Loaded | None:
        """Whatever is new of either; a refusal of one does not hold back the other's version
        (each counts its refusals in its own stats)."""
        loaded, refused = Loaded(), []
        for role in ("student", "teacher"):
            try:
                setattr(loaded, role, getattr(self, role).load_version())
            except BackendError as exc:
                refused.append(f"{role}: {exc}")
        if loaded.student is None and loaded.teacher is None:
            if refused:
                raise BackendError("; ".join(refused))
            return None
        return loaded

    def swap(self, loaded: Loaded) -> None:
        if loaded.student is not None:
            self.student.swap(loaded.student)
        if loaded.teacher is not None:
            self.teacher.swap(loaded.teacher)

    def check(self, obs: Observation) -> None:
        """The student must be able to decide; the teacher too when it labels every step
        (asked only for some steps, it fails those steps alone)."""
        self.student.check(obs)
        if self.label == "every":
            self.teacher.check(obs)

    def decide(self, batch: Sequence[Observation]) -> list[Decision | BackendError]:
        decisions = self.student.decide(batch)
        teacher_name = self.teacher.name
        for d in decisions:
            if isinstance(d, Decision):
                d.decided_by = d.decided_by or self.student.name
        mixed = [
            self.beta > 0 and draw(self.seed, o.robot_id, o.episode_id, o.step) < self.beta
            for o in batch
        ]
        unsure = [
            self.escalate_below is not None
            and isinstance(d, Decision)
            and d.confidence is not None
            and d.confidence < self.escalate_below
            for d in decisions
        ]
        ask = [
            i
            for i in range(len(batch))
            if isinstance(decisions[i], Decision)
            and (self.label == "every" or mixed[i] or unsure[i])
        ]
        if ask:
            self.counters.teacher_calls += 1
            taught = self.teacher.decide([batch[i] for i in ask])
            if len(taught) != len(ask):
                raise BackendError(f"the teacher returned {len(taught)} decisions for {len(ask)}")
            self.counters.teacher_decisions += len(ask)
            for i, t in zip(ask, taught, strict=True):
                student = decisions[i]
                assert isinstance(student, Decision)
                if isinstance(t, BackendError):  # no label for this step
                    self.counters.teacher_failed += 1
                    if mixed[i] or unsure[i]:  # the teacher was to act and cannot
                        decisions[i] = BackendError(f"the teacher could not decide: {t}")
                    continue
                t.decided_by = t.decided_by or teacher_name
                label = TeacherLabel(t, self.teacher.model_id)
                if mixed[i] or unsure[i]:
                    acted = Decision(
                        action=t.action,
                        skill_index=t.skill_index,
                        skill=t.skill,
                        point=t.point,
                        reasoning=t.reasoning,
                        decided_by=labels.acted(teacher_name, escalated=not mixed[i]),
                        confidence=student.confidence,
                        teacher=label,
                        model_version=student.model_version,
                    )
                    if mixed[i]:
                        self.counters.teacher_acted += 1
                    else:
                        self.counters.escalated += 1
                    decisions[i] = acted
                else:
                    student.teacher = label
        self.counters.decisions += len(batch)
        return decisions

    def stats(self) -> dict[str, Any]:
        c: dict[str, Any] = dataclasses.asdict(self.counters)
        n = c["decisions"] or 1
        c["escalation_rate"] = c["escalated"] / n
        c["teacher_share"] = (c["escalated"] + c["teacher_acted"]) / n
        return {**c, "student": self.student.stats(), "teacher": self.teacher.stats()}
