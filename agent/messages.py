"""The runtime's messages as dataclasses: what robots send and what the server answers.

This module and `agent.protocol` (the codec) are the wire layer: numpy only,
nothing of the server, the backends or the envs, so a robot can vendor them
with `agent.client`. Every field of every message is listed once, here;
`agent.protocol` encodes these objects and decodes bytes back into them.
See docs/protocol.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np


@dataclass
class Observation:
    """What one robot sees at one decision point.

    `history` is not sent by robots: the server fills it with the skills it
    answered earlier in this episode (oldest first), so a policy with memory
    sees what was executed; local policies keep it themselves.
    """

    robot_id: str
    episode_id: str
    step: int
    instruction: str = ""
    images: dict[str, np.ndarray] = field(default_factory=dict)  # name -> uint8 HxWx3
    state: np.ndarray | None = None  # float32 proprioception / flat observation
    options: list[str] = field(default_factory=list)  # current skill menu, may be empty
    sim: dict[str, Any] | None = None  # SIM-ONLY privileged state (oracle teachers)
    history: list[str] = field(default_factory=list)  # executed skills, oldest first


@dataclass
class TeacherLabel:
    """What a teacher would have done at a step, whoever acted (DAgger's label)."""

    decision: Decision
    model: str  # the teacher's model id


@dataclass
class Decision:
    """A backend's answer for one observation.

    `action` is a low-level action; `skill_index`/`skill` pick from
    `Observation.options`; `point` is a 2D image point normalised to 0..1000
    (Cosmos-Reason2's point answers, executed as the `move_to_pixel` skill).
    `decided_by` says who produced it (see docs/episodes.md; the server fills
    in the backend's name when a backend leaves it empty). `confidence` is a
    policy's probability for its choice, where it has one. `teacher` never
    travels on the wire: it is recorded as the step's label. `model_version`
    is set by a backend that serves several versions at once (per-episode
    consistency); the reply's `model_version` then says which one decided.
    """

    action: np.ndarray | None = None
    skill_index: int | None = None
    skill: str | None = None
    point: tuple[float, float] | None = None
    reasoning: str | None = None
    decided_by: str | None = None
    confidence: float | None = None
    teacher: TeacherLabel | None = None
    model_version: str | None = None

    @property
    def sentence(self) -> str | None:
        """The skill sentence this decision executes (a point is `move_to_pixel`'s sentence)."""
        if self.skill is not None:
            return self.skill
        if self.point is not None:
            return point_sentence(*self.point)
        return None


def point_sentence(x: float, y: float) -> str:
    """The skill sentence of an image point (the tabletop envs parse exactly this)."""
    return f"move to the point ({x:.0f}, {y:.0f})"


# --------------------------------------------------------------------------- requests


@dataclass
class Hello:
    TYPE: ClassVar[str] = "hello"
    request_id: int
    robot_id: str


@dataclass
class DecideRequest:
    """One robot asks for its next decision.

    `reward` is what its previous decision earned; `seed` and `task` are
    optional episode facts (recorded in the episode's summary).
    """

    TYPE: ClassVar[str] = "decide"
    request_id: int
    observation: Observation
    reward: float | None = None
    seed: int | None = None
    task: str | None = None


@dataclass
class EndEpisode:
    TYPE: ClassVar[str] = "end"
    request_id: int
    robot_id: str
    episode_id: str
    reward: float | None = None  # earned by the last decision
    terminated: bool = False
    truncated: bool = False
    success: bool | None = None


@dataclass
class StatsRequest:
    TYPE: ClassVar[str] = "stats"
    request_id: int


Request = Hello | DecideRequest | EndEpisode | StatsRequest


# --------------------------------------------------------------------------- replies


@dataclass
class HelloReply:
    TYPE: ClassVar[str] = "hello"
    request_id: int
    metadata: dict[str, Any]


@dataclass
class DecisionReply:
    """A decision plus how it was made. `latency_ms` is measured by the client, not sent."""

    TYPE: ClassVar[str] = "decision"
    request_id: int
    episode_id: str
    step: int
    decision: Decision
    model_id: str
    model_version: str
    timing: dict[str, float] = field(default_factory=dict)  # queue_ms, inference_ms, batch_size
    latency_ms: float | None = None


@dataclass
class EndedReply:
    TYPE: ClassVar[str] = "ended"
    request_id: int
    episode_id: str
    steps: int
    recorded: bool


@dataclass
class StatsReply:
    TYPE: ClassVar[str] = "stats"
    request_id: int
    stats: dict[str, Any]


@dataclass
class ErrorReply:
    TYPE: ClassVar[str] = "error"
    request_id: int | None
    episode_id: str | None
    code: str
    message: str


Reply = HelloReply | DecisionReply | EndedReply | StatsReply | ErrorReply
