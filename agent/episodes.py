"""The server's book of open episodes: steps, rewards, idle timeouts, closing.

Single-threaded (owned by the server loop). Finished episodes go to the
`EpisodeWriter` when recording is on; otherwise only step counts are kept,
so a server without `--record` holds no observations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from agent.backends.base import Decision, Observation
from agent.protocol import EndEpisode
from agent.recording import EpisodeBuffer, EpisodeEnd, EpisodeWriter


@dataclass
class _Open:
    buffer: EpisodeBuffer
    last_seen: float
    steps: int = 0


class EpisodeBook:
    def __init__(
        self,
        env_id: str,
        writer: EpisodeWriter | None,
        idle_timeout_s: float,
        max_steps: int = 10_000,
    ) -> None:
        self.env_id = env_id
        self.writer = writer
        self.idle_timeout_s = idle_timeout_s
        self.max_steps = max_steps
        self._open: dict[str, _Open] = {}
        self.closed = 0

    def __len__(self) -> int:
        return len(self._open)

    def record(
        self,
        obs: Observation,
        reward: float | None,
        decision: Decision,
        timing: dict[str, float],
        model_id: str,
        model_version: str,
    ) -> None:
        """A decision was sent; `reward` is what the episode's previous decision earned."""
        now = time.monotonic()
        ep = self._open.get(obs.episode_id)
        if ep is None:
            ep = self._open[obs.episode_id] = _Open(
                EpisodeBuffer(obs.episode_id, obs.robot_id, self.env_id), now
            )
        ep.last_seen = now
        ep.steps += 1
        if self.writer is None:
            return
        last = ep.buffer.last_step
        # the reward belongs to the previous decision; a retried step must not take it
        ep.buffer.set_reward(last if last is not None and last < obs.step else obs.step - 1, reward)
        ep.buffer.add_step(obs, decision, timing, model_id, model_version)
        if len(ep.buffer) >= self.max_steps:
            self._close(obs.episode_id, EpisodeEnd("too_long"))

    def end(self, msg: EndEpisode) -> int:
        """The robot finished an episode; returns how many decisions it had here."""
        ep = self._open.get(msg.episode_id)
        if ep is None:
            return 0
        if ep.buffer.last_step is not None:
            ep.buffer.set_reward(ep.buffer.last_step, msg.reward)
        self._close(msg.episode_id, EpisodeEnd("end", msg.terminated, msg.truncated, msg.success))
        return ep.steps

    def expire_idle(self, now: float | None = None) -> int:
        """Close, as truncated, episodes whose robot went quiet (disconnected or crashed)."""
        now = time.monotonic() if now is None else now
        idle = [eid for eid, ep in self._open.items() if now - ep.last_seen > self.idle_timeout_s]
        for eid in idle:
            self._close(eid, EpisodeEnd("idle_timeout"))
        return len(idle)

    def close_all(self, reason: str = "shutdown") -> None:
        for eid in list(self._open):
            self._close(eid, EpisodeEnd(reason))

    def _close(self, episode_id: str, end: EpisodeEnd) -> None:
        ep = self._open.pop(episode_id)
        self.closed += 1
        if self.writer is not None:
            self.writer.submit(ep.buffer, end)
