"""Recorded episodes to training samples: labels, shards, and a growing in-memory dataset.

Labels (docs/episodes.md): a step's teacher label (`teacher_*` columns) where
it has one, else the executed decision when a teacher made it (the rule of
`agent.labels`). The student's own choices and fallbacks are never labels.
Steps, with the history each one saw, come from `agent.store.Episode.steps()`.

Episodes are assigned to ranks and to the held-out set by a stable hash of
their file name, so every rank agrees without talking, and `--follow` keeps
the assignment as files arrive. Frames are decoded and resized once, when an
episode is added; a batch is then a gather from preallocated arrays.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.labels import is_teacher
from agent.messages import Observation
from agent.store import Episode
from agent.student.features import Featuriser

VALIDATION_BUCKETS = 10  # one in ten episodes (by name) is held out


def bucket(episode: Episode, buckets: int) -> int:
    """A stable bucket of an episode, from its file name."""
    return zlib.crc32(episode.path.name.encode()) % buckets


def is_validation(episode: Episode) -> bool:
    return bucket(episode, VALIDATION_BUCKETS) == 0


def shard_of(episode: Episode, world: int) -> int:
    """Which rank trains on `episode` (validation episodes are nobody's)."""
    return zlib.crc32(b"shard:" + episode.path.name.encode()) % world


@dataclass
class Labelled:
    """One step as a learner sees it, with its label."""

    observation: Observation
    skill: int | None  # the teacher's option index, or None
    action: np.ndarray | None  # the teacher's low-level action, or None
    weight: float = 1.0
    rationale: str | None = None  # the teacher's reasoning for it, where recorded


def samples(episode: Episode, failed_weight: float = 1.0) -> list[Labelled]:
    """The labelled steps of one episode (unlabelled steps still count as history)."""
    backend = episode.meta.get("backend")
    weight = 1.0 if episode.success is not False else failed_weight
    out = []
    for step in episode.steps():
        obs, decision = step.observation, step.decision
        label = decision.teacher.decision if decision.teacher is not None else None
        teacher = is_teacher(decision.decided_by, backend)
        skill = label.skill_index if label is not None else None
        if skill is None and teacher:
            skill = decision.skill_index
        action = label.action if label is not None else None
        if action is None and teacher and not obs.options:
            action = decision.action
        rationale = label.reasoning if label is not None else None
        if rationale is None and teacher:
            rationale = decision.reasoning
        if obs.options and skill is not None and 0 <= skill < len(obs.options):
            out.append(Labelled(obs, int(skill), None, weight, rationale))
        elif not obs.options and action is not None:
            out.append(Labelled(obs, None, np.asarray(action, np.float32), weight, rationale))
    return out


@dataclass
class Dataset:
    """Featurised samples in growing arrays; `add` from one thread, `batch` from another."""

    featuriser: Featuriser
    capacity: int = 1024
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    size: int = 0
    episodes: int = 0
    skipped: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_episode(self, episode: Episode, failed_weight: float = 1.0) -> int:
        """Featurise and append an episode's labelled steps; returns how many were added.

        An episode that does not fit the featuriser (state size, menu length,
        missing camera) is skipped whole, with the reason in `skipped`.
        """
        try:
            rows = [self._row(s) for s in samples(episode, failed_weight)]
        except ValueError as exc:
            self.skipped.append(f"{episode.path.name}: {exc}")
            return 0
        if not rows:
            return 0
        with self._lock:
            self._reserve(self.size + len(rows), rows[0])
            for row in rows:
                for name, value in row.items():
                    self.arrays[name][self.size] = value
                self.size += 1
            self.episodes += 1
        return len(rows)

    def add_all(self, episodes: Iterable[Episode], failed_weight: float = 1.0) -> int:
        return sum(self.add_episode(e, failed_weight) for e in episodes)

    def _row(self, sample: Labelled) -> dict[str, Any]:
        row: dict[str, Any] = self.featuriser.one(sample.observation)
        c = self.featuriser.config
        target = np.zeros(c.max_options, np.float32)
        if sample.skill is not None:
            target[sample.skill] = 1.0
        row["target"] = target
        row["has_skill"] = sample.skill is not None
        if c.action_dim:
            action = np.zeros(c.action_dim, np.float32)
            if sample.action is not None:
                if sample.action.shape != (c.action_dim,):
                    raise ValueError(
                        f"action of shape {sample.action.shape}, the student has {c.action_dim}"
                    )
                action = sample.action
            row["action"] = action
            row["has_action"] = sample.action is not None
        row["weight"] = np.float32(sample.weight)
        return row

    def _reserve(self, needed: int, example: dict[str, Any]) -> None:
        if not self.arrays:
            self.arrays = {
                name: np.zeros((self.capacity, *np.shape(v)), np.asarray(v).dtype)
                for name, v in example.items()
            }
        capacity = len(next(iter(self.arrays.values())))
        if needed <= capacity:
            return
        while capacity < needed:
            capacity *= 2
        for name, array in self.arrays.items():
            grown = np.zeros((capacity, *array.shape[1:]), array.dtype)
            grown[: self.size] = array[: self.size]
            self.arrays[name] = grown

    def batch(self, size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """`size` samples drawn uniformly (with replacement) from everything added so far."""
        with self._lock:
            if not self.size:
                raise ValueError("the dataset is empty")
            index = rng.integers(0, self.size, size)
            return {name: array[index] for name, array in self.arrays.items()}

    def all(self, limit: int | None = None) -> dict[str, np.ndarray]:
        """The first `limit` samples (all by default), in order: for validation."""
        with self._lock:
            n = self.size if limit is None else min(limit, self.size)
            return {name: array[:n].copy() for name, array in self.arrays.items()}
