"""The episodes a trainer learns from: waiting for enough, sharding them, following new ones.

Shared by the student's trainer (`trainer.train`) and Cosmos-Reason's
(`trainer.cosmos`). Every rank lists the same directory and reads every
file; each keeps its own shard of the training episodes and rank 0 the
held-out ones (`trainer.data.shard_of`, `is_validation`: stable hashes of
the file name, so ranks agree without talking and `--follow` keeps the
assignment as files arrive).
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.store import Episode, follow, iter_episodes
from trainer.data import is_validation, shard_of
from trainer.ranks import Ranks


class Shard(Protocol):
    """What holds a rank's samples (`trainer.data.Dataset`, `trainer.cosmos.data.Examples`)."""

    size: int
    skipped: list[str]

    def add_episode(self, episode: Episode, failed_weight: float = 1.0) -> int: ...

    def add_all(self, episodes: list[Episode], failed_weight: float = 1.0) -> int: ...


@dataclass
class Data:
    train: Any  # this rank's shard (a Shard)
    validation: Any  # held out (rank 0 only holds it; a Shard)
    failed_weight: float
    seen: set[str] = field(default_factory=set)
    watermark: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, episode: Episode, ranks: Ranks) -> bool:
        """Add an episode where it belongs; False if it is another rank's training data."""
        mine = True
        if is_validation(episode):
            if ranks.rank == 0:
                self.validation.add_episode(episode, self.failed_weight)
        elif shard_of(episode, ranks.size) == ranks.rank:
            self.train.add_episode(episode, self.failed_weight)
        else:
            mine = False
        with self.lock:
            self.seen.add(episode.path.name)
            ended = episode.meta.get("ended_at") or 0.0
            self.watermark = {
                "episodes": len(self.seen),
                "latest_ended_at": max(ended, self.watermark.get("latest_ended_at", 0.0)),
            }
        return mine

    def add_first(self, episodes: list[Episode], ranks: Ranks) -> None:
        """The episodes there are at the start; a rank whose shard they leave empty (a tiny
        dataset) trains on all training episodes."""
        others = [e for e in episodes if not self.add(e, ranks)]
        if self.train.size == 0 and others:
            print(
                f"[trainer] rank {ranks.rank}: empty shard, training on all training episodes",
                file=sys.stderr,
                flush=True,
            )
            self.train.add_all(others, self.failed_weight)
        for reason in self.train.skipped + self.validation.skipped:
            ranks.say(f"skipped episode {reason}")
        if self.train.size == 0:
            raise SystemExit(
                f"trainer: rank {ranks.rank} has no training samples (too few episodes?)"
            )


def wait_for_episodes(
    directory: Path, min_episodes: int, keep_waiting: bool, ranks: Ranks, stop: threading.Event
) -> list[Episode]:
    """The episodes there are now (waiting for `min_episodes` when `keep_waiting`, i.e. --follow)."""

    def report(path: Path, exc: Exception) -> None:
        ranks.say(f"skipping {path}: {exc}")

    note_at = time.monotonic()
    while True:
        episodes = list(iter_episodes(directory, on_error=report)) if directory.is_dir() else []
        # every rank lists the same directory; they decide on the mean, so together
        average = ranks.sum([len(episodes)], "trainer.count")[0] / ranks.size
        if average >= min_episodes:
            return episodes
        if not keep_waiting:
            if not directory.is_dir():
                raise SystemExit(f"trainer: {directory} does not exist (record episodes first)")
            raise SystemExit(
                f"trainer: {directory} holds {len(episodes)} readable episodes; "
                f"need at least {min_episodes}"
            )
        if ranks.sum([1.0 if stop.is_set() else 0.0], "trainer.wait.stop")[0] > 0:
            raise SystemExit(0)  # stopped before there was anything to learn from
        if time.monotonic() >= note_at:
            ranks.say(
                f"waiting for {min_episodes} episodes in {directory} ({len(episodes)} so far)"
            )
            note_at = time.monotonic() + 30
        time.sleep(1.0)


def follow_episodes(directory: Path, ranks: Ranks, data: Data, stop: threading.Event) -> None:
    """Add each new episode as it lands (every rank reads the file names; keeps its shard)."""

    def report(path: Path, exc: Exception) -> None:
        ranks.say(f"skipping {path}: {exc}")

    for episode in follow(directory, poll_s=1.0, stop=stop, on_error=report):
        if episode.path.name not in data.seen:
            data.add(episode, ranks)
