"""The robot's side of the runtime: a DEALER socket with timeouts and reconnects.

`AgentClient` is NOT thread-safe (ZeroMQ sockets are not): use one client per
thread or process. Every request carries a fresh request id and only the
reply with that id is returned, so a reply that arrives late (after a
timeout) is dropped and never taken for the current one. After a timeout the
socket is closed (LINGER 0) and a new one connects, so a restarted server is
picked up; `retries` resends the request that many times (also after a
`shutting_down` error reply from a server that is stopping).
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import zmq

from agent import protocol as P
from agent.curve import CurveKeys
from agent.messages import (
    DecideRequest,
    DecisionReply,
    EndedReply,
    EndEpisode,
    ErrorReply,
    Hello,
    HelloReply,
    Observation,
    Reply,
    Request,
    StatsReply,
    StatsRequest,
)

DEFAULT_TIMEOUT_MS = 10_000
_robot_counter = itertools.count()


class AgentTimeout(TimeoutError):
    """No reply within the timeout (server down, overloaded or unreachable)."""


class ServerError(RuntimeError):
    """The server answered with an error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message


def default_robot_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{next(_robot_counter)}"


class AgentClient:
    """Talks to `agent serve`. One instance per thread; see the module docstring."""

    def __init__(
        self,
        endpoint: str,
        *,
        timeout_ms: int = DEFAULT_TIMEOUT_MS,
        robot_id: str | None = None,
        retries: int = 0,
        curve: CurveKeys | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.timeout_ms = timeout_ms
        self.robot_id = robot_id or default_robot_id()
        self.retries = retries
        self.curve = curve
        self._context = context or zmq.Context.instance()
        self._ids = itertools.count(1)
        self._socket: zmq.Socket | None = None
        self._metadata: dict[str, Any] | None = None
        self.reconnects = 0
        self.stale_replies = 0
        self._connect()

    # ------------------------------------------------------------------ socket

    def _connect(self) -> None:
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            if self.curve.server_public is None:
                raise ValueError("CURVE client keys need the server's public key")
            sock.curve_serverkey = self.curve.server_public
            sock.curve_publickey = self.curve.public
            sock.curve_secretkey = self.curve.secret
        sock.connect(self.endpoint)
        self._socket = sock
        self._rcvtimeo = -1  # ZeroMQ's default: block

    def reconnect(self) -> None:
        """Drop the socket (and any reply still on its way) and connect a new one."""
        if self._socket is not None:
            self._socket.close(linger=0)
        self.reconnects += 1
        self._connect()

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ requests

    def _request(self, build: Callable[[int], Request], expect: type) -> tuple[Any, float]:
        """Send `build(request_id)`; return the matching reply (of type `expect`) and its latency."""
        if self._socket is None:
            raise RuntimeError("client is closed")
        payload = b""
        for attempt in range(self.retries + 1):
            request_id = next(self._ids)
            payload = P.encode(build(request_id))
            limit = (self._metadata or {}).get("max_message_bytes")
            if limit is not None and len(payload) > limit:
                raise ValueError(
                    f"message of {len(payload)} bytes exceeds the server's limit of {limit} bytes"
                )
            sent = time.perf_counter()
            self._socket.send(payload, copy=len(payload) < 65536)
            try:
                reply = self._await(request_id, sent)
            except ServerError as exc:
                if exc.code != P.SHUTTING_DOWN or attempt == self.retries:
                    raise
                reply = None
                time.sleep(min(0.5, self.timeout_ms / 4000.0))  # let its successor start
            if reply is not None:
                if not isinstance(reply, expect):
                    raise P.ProtocolError(
                        P.BAD_MESSAGE, f"expected a {expect.TYPE} reply, got {reply.TYPE!r}"
                    )
                return reply, 1e3 * (time.perf_counter() - sent)
            self.reconnect()
            if attempt == self.retries:
                break
        hint = ""
        if self._metadata is None and len(payload) > 1024 * 1024:
            hint = (
                f"; a {len(payload)}-byte message over the server's size limit is dropped "
                "unanswered: call hello() first and the client checks the limit before sending"
            )
        raise AgentTimeout(
            f"no reply from {self.endpoint} within {self.timeout_ms} ms "
            f"({self.retries + 1} attempt(s)){hint}"
        )

    def _await(self, request_id: int, sent: float) -> Reply | None:
        """The reply to `request_id`, or None at the deadline.

        A blocking receive with ZeroMQ's own timeout (RCVTIMEO): one call into
        ZeroMQ per reply, where a poll and a receive would be two.
        """
        deadline = sent + self.timeout_ms / 1000.0
        sock = self._socket
        assert sock is not None
        wait_ms = self.timeout_ms
        while wait_ms > 0:
            if wait_ms != self._rcvtimeo:
                sock.setsockopt(zmq.RCVTIMEO, wait_ms)
                self._rcvtimeo = wait_ms
            try:
                frame = sock.recv(copy=False)
            except zmq.Again:
                return None
            reply = P.parse_reply(frame.buffer)
            if reply.request_id == request_id:
                if type(reply) is ErrorReply:
                    raise ServerError(reply.code or "?", reply.message or "")
                return reply
            self.stale_replies += 1  # a late answer to an earlier, timed-out request
            wait_ms = int(1000 * (deadline - time.perf_counter()))
        return None

    def hello(self) -> dict[str, Any]:
        """Handshake: the server's metadata (protocol, env, spaces, backend, limits)."""
        reply, _ = self._request(lambda rid: Hello(rid, self.robot_id), HelloReply)
        if not isinstance(reply.metadata, dict):
            raise P.ProtocolError(P.BAD_MESSAGE, "handshake reply carries no metadata")
        self._metadata = reply.metadata
        return reply.metadata

    @property
    def metadata(self) -> dict[str, Any]:
        return self._metadata if self._metadata is not None else self.hello()

    def decide(
        self,
        *,
        reward: float | None = None,
        seed: int | None = None,
        task: str | None = None,
        **observation: Any,
    ) -> DecisionReply:
        """Ask for the next decision for an `Observation` given by its fields.

        `episode_id` and `step` are required; `images`, `state`, `instruction`,
        `options` and `sim` are optional (see `agent.messages.Observation`).
        `reward` is what the previous decision earned; `seed` and `task` are
        recorded in the episode's summary (send them with the first step).
        """
        obs = Observation(robot_id=self.robot_id, **observation)
        reply, latency_ms = self._request(
            lambda rid: DecideRequest(rid, obs, reward, seed, task), DecisionReply
        )
        if reply.episode_id != obs.episode_id or reply.step != obs.step:
            raise P.ProtocolError(
                P.BAD_MESSAGE,
                f"reply for episode {reply.episode_id} step "
                f"{reply.step}, asked for {obs.episode_id} step {obs.step}",
            )
        reply.latency_ms = latency_ms
        return reply

    def end_episode(
        self,
        episode_id: str,
        *,
        reward: float | None = None,
        terminated: bool = False,
        truncated: bool = False,
        success: bool | None = None,
    ) -> EndedReply:
        """Tell the server the episode is over so it can record it (with the last reward)."""
        reply, _ = self._request(
            lambda rid: EndEpisode(
                rid, self.robot_id, episode_id, reward, terminated, truncated, success
            ),
            EndedReply,
        )
        return reply

    def stats(self) -> dict[str, Any]:
        reply, _ = self._request(StatsRequest, StatsReply)
        return reply.stats if isinstance(reply.stats, dict) else {}
