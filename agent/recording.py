"""The server's side of recording: open episodes, idle timeouts and the writer thread.

`EpisodeBook` (single-threaded, owned by the decision loop) keeps every open
episode: the skills it was answered (the `history` a policy with memory
needs) and, when recording, its steps (references, cheap). Finished episodes
go to the `EpisodeWriter`, whose thread turns them into Parquet files with
`agent.store`, so the decision loop never waits on disk. File format and
readers: `agent.store`, docs/episodes.md.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.messages import DecideRequest, DecisionReply, EndEpisode, Observation
from agent.store import (
    Step,
    episode_table,
    free_path,
    remove_stale_tmp,
    write_episode,
)

log = logging.getLogger(__name__)


@dataclass
class EpisodeEnd:
    """How an episode finished."""

    reason: str  # "end" (robot said so), "idle_timeout", "disconnected", "shutdown", "too_long"
    terminated: bool = False
    truncated: bool = True
    success: bool | None = None


@dataclass
class EpisodeBuffer:
    """One open episode (server side, single-threaded)."""

    episode_id: str
    robot_id: str
    env_id: str
    started_at: float = field(default_factory=time.time)
    steps: dict[int, Step] = field(default_factory=dict)  # step -> recorded decision
    skills: dict[int, str] = field(default_factory=dict)  # step -> skill answered
    decisions: int = 0
    last_step: int | None = None
    seed: int | None = None
    task: str | None = None
    peer: bytes | None = None  # the connection (ROUTER routing id) that last sent for it

    def history(self, step: int) -> list[str]:
        """Skills answered before `step`, oldest first (a retried step sees the same history)."""
        return [self.skills[s] for s in sorted(self.skills) if s < step]

    def __len__(self) -> int:
        return len(self.steps)


OnRecorded = Callable[[EpisodeBuffer, bool], None]


class EpisodeWriter:
    """Writes finished episodes in a background thread so the decision loop never blocks on disk.

    `submit` is cheap and thread-safe; its `on_recorded(episode, True)` is
    called on the writer thread once the file is durable (fsynced and renamed
    into place), `on_recorded(episode, False)` if writing failed. `close`
    writes everything submitted, then returns.
    """

    def __init__(self, directory: str | Path, extra_metadata: dict[str, Any] | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(self.directory)
        self._extra = dict(extra_metadata or {})
        self._queue: queue.Queue[tuple[EpisodeBuffer, EpisodeEnd, OnRecorded | None] | None] = (
            queue.Queue()
        )
        self.written = 0  # episodes written so far
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="episode-writer", daemon=True)
        self._thread.start()

    def submit(
        self, buf: EpisodeBuffer, end: EpisodeEnd, on_recorded: OnRecorded | None = None
    ) -> bool:
        """Queue `buf` for writing; False (and no callback) when it has no steps to write."""
        if not len(buf):
            return False
        self._queue.put((buf, end, on_recorded))
        return True

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            buf, end, on_recorded = item
            try:
                steps = [buf.steps[s] for s in sorted(buf.steps)]
                write_episode(
                    episode_table(steps, summary(buf, end, self._extra)),
                    free_path(self.directory, buf.episode_id),
                )
                self.written += 1
                ok = True
            except Exception:
                self.failures += 1
                ok = False
                log.exception("could not record episode %s", buf.episode_id)
            if on_recorded is not None:
                try:  # the writer must outlive a failing callback: later episodes still count
                    on_recorded(buf, ok)
                except Exception:
                    log.exception("the callback for episode %s failed", buf.episode_id)

    def finish(self) -> None:
        """Ask the thread to stop once everything submitted so far is written (non-blocking)."""
        if self._thread.is_alive():
            self._queue.put(None)

    @property
    def busy(self) -> bool:
        return self._thread.is_alive()

    @property
    def pending(self) -> int:
        """Episodes waiting to be written (the one being written is not counted)."""
        return self._queue.qsize()

    def close(self, timeout: float | None = 60.0) -> None:
        """Flush every submitted episode and stop the thread."""
        self.finish()
        self._thread.join(timeout)


def summary(buf: EpisodeBuffer, end: EpisodeEnd, extra: dict[str, Any]) -> dict[str, Any]:
    """What the recorder knows of a finished episode (docs/episodes.md, "Episode summary")."""
    return {
        "episode_id": buf.episode_id,
        "robot_id": buf.robot_id,
        "env_id": buf.env_id,
        "success": end.success,
        "terminated": end.terminated,
        "truncated": end.truncated,
        "end_reason": end.reason,
        "started_at": buf.started_at,
        "ended_at": time.time(),
        "seed": buf.seed,
        "task": buf.task,
        **extra,
    }


class EpisodeBook:
    """The open episodes of one server. Finished ones go to the writer when recording is on;
    otherwise only step counts and answered skills are kept (no observations).

    It also remembers which closed episodes the writer still has and, for the
    last `RECENT_ENDS`, whether they were recorded, so that an `end` repeated
    after a client timeout, or sent after the server closed the episode
    itself, gets the true answer.
    """

    RECENT_ENDS = 4096

    def __init__(
        self,
        env_id: str,
        writer: EpisodeWriter | None,
        idle_timeout_s: float,
        max_steps: int = 10_000,
        disconnect_grace_s: float = 5.0,
        on_recorded: OnRecorded | None = None,
    ) -> None:
        """`on_recorded` is called on the writer's thread for every episode it is given."""
        self.env_id = env_id
        self.writer = writer
        self.on_recorded = on_recorded
        self.idle_timeout_s = idle_timeout_s
        self.max_steps = max_steps
        self.disconnect_grace_s = disconnect_grace_s
        self._open: dict[str, EpisodeBuffer] = {}
        self._last_seen: dict[str, float] = {}
        self._orphaned: dict[str, float] = {}  # episode -> when to close it (its robot left)
        self._writing: dict[str, int] = {}  # episode -> decisions, while the writer has it
        self._recent: OrderedDict[str, tuple[int, bool]] = OrderedDict()  # -> (decisions, recorded)
        self.closed = 0

    def __len__(self) -> int:
        return len(self._open)

    def history(self, obs: Observation, peer: bytes | None = None) -> list[str]:
        """The skills this server answered earlier in `obs`'s episode, oldest first.

        Called when the request arrives: the episode's robot is alive, on `peer`.
        """
        ep = self._open.get(obs.episode_id)
        if ep is None:
            return []
        self._orphaned.pop(obs.episode_id, None)
        if peer is not None:
            ep.peer = peer
        return ep.history(obs.step)

    def disconnected(self, peer: bytes, now: float | None = None) -> int:
        """`peer`'s connection closed: close its episodes unless it comes back within the grace.

        A robot whose client reconnects (after a timeout, say) sends the next
        step of the same episode from a new connection and keeps it open.
        """
        at = (time.monotonic() if now is None else now) + self.disconnect_grace_s
        left = [eid for eid, ep in self._open.items() if ep.peer == peer]
        for eid in left:
            self._orphaned[eid] = at
        return len(left)

    def record(
        self, request: DecideRequest, reply: DecisionReply, peer: bytes | None = None
    ) -> None:
        """`reply` was sent for `request` (whose reward is what the episode's previous decision
        earned); `peer` is the connection it came on."""
        obs, decision = request.observation, reply.decision
        now = time.monotonic()
        ep = self._open.get(obs.episode_id)
        if ep is None:
            ep = self._open[obs.episode_id] = EpisodeBuffer(
                obs.episode_id, obs.robot_id, self.env_id, peer=peer
            )
        self._last_seen[obs.episode_id] = now
        ep.decisions += 1
        ep.seed = ep.seed if request.seed is None else request.seed
        ep.task = ep.task if request.task is None else request.task
        skill = decision.sentence
        if skill is not None:
            ep.skills[obs.step] = skill
        if self.writer is not None:
            # the reward belongs to the previous decision; a retried step must not take it
            last = ep.last_step
            previous = last if last is not None and last < obs.step else obs.step - 1
            if request.reward is not None and previous in ep.steps:
                ep.steps[previous].reward = request.reward
            ep.steps[obs.step] = Step(
                obs, decision, time.time(), None, reply.timing, reply.model_id, reply.model_version
            )
        ep.last_step = obs.step
        if (len(ep.steps) if self.writer is not None else ep.decisions) >= self.max_steps:
            self._close(obs.episode_id, EpisodeEnd("too_long"))

    def end(self, msg: EndEpisode) -> tuple[int, bool | None]:
        """The robot finished an episode: (its decisions here, whether it is recorded).

        None while the writer has it (the book's `on_recorded` will say, then
        `written`); an episode that is neither open nor known was not recorded.
        """
        eid = msg.episode_id
        ep = self._open.get(eid)
        if ep is None:
            if eid in self._writing:
                return self._writing[eid], None
            return self._recent.get(eid, (0, False))
        if ep.last_step is not None and msg.reward is not None and ep.last_step in ep.steps:
            ep.steps[ep.last_step].reward = msg.reward
        end = EpisodeEnd("end", msg.terminated, msg.truncated, msg.success)
        return ep.decisions, None if self._close(eid, end) else False

    def written(self, episode_id: str, recorded: bool) -> int:
        """The writer is done with `episode_id` (called on the server's thread): its decisions."""
        decisions = self._writing.pop(episode_id, 0)
        self._remember(episode_id, decisions, recorded)
        return decisions

    def _remember(self, episode_id: str, decisions: int, recorded: bool) -> None:
        self._recent[episode_id] = (decisions, recorded)
        self._recent.move_to_end(episode_id)
        while len(self._recent) > self.RECENT_ENDS:
            self._recent.popitem(last=False)

    def expire_idle(self, now: float | None = None) -> int:
        """Close, as truncated, episodes whose robot went quiet or whose connection closed."""
        now = time.monotonic() if now is None else now
        idle = [eid for eid, t in self._last_seen.items() if now - t > self.idle_timeout_s]
        for eid in idle:
            self._close(eid, EpisodeEnd("idle_timeout"))
        gone = [eid for eid, t in self._orphaned.items() if now >= t]
        for eid in gone:
            self._close(eid, EpisodeEnd("disconnected"))
        return len(idle) + len(gone)

    def close_all(self, reason: str = "shutdown") -> None:
        for eid in list(self._open):
            self._close(eid, EpisodeEnd(reason))

    def _close(self, episode_id: str, end: EpisodeEnd) -> bool:
        """Close an open episode; True if the writer has it."""
        ep = self._open.pop(episode_id)
        del self._last_seen[episode_id]
        self._orphaned.pop(episode_id, None)
        self.closed += 1
        if self.writer is None or not self.writer.submit(ep, end, self.on_recorded):
            self._remember(episode_id, ep.decisions, False)
            return False
        self._writing[episode_id] = ep.decisions
        return True
