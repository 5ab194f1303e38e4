"""The one interface every decision-maker implements.

The server hands a backend a batch of observations from different robots and
gets one decision per observation back. Backends never see sockets, msgpack or
episodes; the server never sees models. This module imports no torch.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np


@dataclass
class Observation:
    """What one robot sees at one decision point (already validated)."""

    robot_id: str
    episode_id: str
    step: int
    instruction: str = ""
    images: dict[str, np.ndarray] = field(default_factory=dict)  # name -> uint8 HxWx3
    state: np.ndarray | None = None  # float32 proprioception / flat observation
    options: list[str] = field(default_factory=list)  # current skill menu, may be empty
    sim: dict[str, Any] | None = None  # SIM-ONLY privileged state (oracle teachers)


@dataclass
class Decision:
    """A backend's answer for one observation.

    `action` is a low-level action; `skill_index`/`skill` pick from
    `Observation.options`; `point` is a 2D image point normalised to 0..1000
    (Cosmos-Reason2's point answers, executed as the `move_to_pixel` skill).
    """

    action: np.ndarray | None = None
    skill_index: int | None = None
    skill: str | None = None
    point: tuple[float, float] | None = None
    reasoning: str | None = None


@dataclass(frozen=True)
class EnvInfo:
    """What a backend may know about the environment it serves."""

    env_id: str
    action_shape: tuple[int, ...] | None = None  # low-level Box action, if any
    action_low: np.ndarray | None = None
    action_high: np.ndarray | None = None
    has_skills: bool = False


class BackendError(RuntimeError):
    """A backend could not decide; the server turns it into an error reply."""


class Backend(abc.ABC):
    """Decide a batch of observations; report model identity; warm up; reload."""

    name: ClassVar[str]

    def __init__(self, env: EnvInfo, model: str | None = None, **options: Any) -> None:
        """Subclasses with options consume them and pass none on."""
        if options:
            raise BackendError(f"the {self.name} backend takes no options, got {sorted(options)}")
        self.env = env
        self.model = model

    @property
    def model_id(self) -> str:
        return self.model or self.name

    @property
    def model_version(self) -> str:
        return "0"

    @abc.abstractmethod
    def decide(self, batch: Sequence[Observation]) -> list[Decision]:
        """One decision per observation, in order. May raise BackendError."""

    def warmup(self) -> None:  # noqa: B027 - optional hook
        """Pay one-off costs (compilation, allocation) before the first robot."""

    def reload(self, model: str | None = None) -> bool:
        """Load newer weights if there are any; True when the version changed."""
        return False

    def stats(self) -> dict[str, Any]:
        """Counters for logs and benchmarks (e.g. parse failures, fallbacks)."""
        return {}
