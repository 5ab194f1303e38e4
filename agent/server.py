"""The decision server: a ZeroMQ ROUTER that batches robots' requests across robots.

One thread runs the loop: drain the socket, answer hello/end/stats and bad
messages at once, queue decide requests, and hand a batch to the backend when
`BatchPolicy` says waiting cannot pay off. Keeping receive, decide and reply
on one thread avoids hand-offs, which is most of a runtime's per-request cost;
requests that arrive while the backend computes wait in ZeroMQ's queue and
form the next batch. Disk writes happen on the `EpisodeWriter`'s thread; new
model versions are loaded on a reloader thread and swapped in between batches.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from agent import protocol as P
from agent.backends.base import Backend, BackendError, BadObservation
from agent.batching import BatchPolicy, CallCost, RobotActivity
from agent.curve import serve_curve
from agent.envspec import EnvDescription, ObservationSpec
from agent.messages import (
    DecideRequest,
    Decision,
    DecisionReply,
    EndedReply,
    EndEpisode,
    ErrorReply,
    Hello,
    HelloReply,
    Observation,
    Request,
    StatsReply,
)
from agent.recording import EpisodeBook, EpisodeWriter
from agent.reloader import Reloader

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
WRITER_FLUSH_S = 60.0  # on shutdown, answer robots this long at most while recordings flush
log = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    bind: str = DEFAULT_ENDPOINT
    max_batch: int = 16
    batch_timeout_ms: float = 2.0
    max_message_bytes: int = P.DEFAULT_MAX_MESSAGE_BYTES
    episode_timeout_s: float = 30.0
    max_episode_steps: int = 10_000
    record_dir: Path | None = None
    curve_dir: Path | None = None
    reload_every_s: float | None = None  # None: the backend's own default (if it has versions)
    disconnect_grace_s: float = 5.0  # a robot's episodes close this long after its connection
    shutdown_grace_s: float = 0.5  # answer `shutting_down` this long after recordings flushed

    def __post_init__(self) -> None:
        """Refuse settings that would make the server useless (e.g. drop every message)."""
        if self.max_batch < 1:
            raise ValueError(f"max batch must be >= 1, got {self.max_batch}")
        if not self.batch_timeout_ms >= 0:
            raise ValueError(f"batch timeout must be >= 0 ms, got {self.batch_timeout_ms}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max message size must be >= 1 KiB, got {self.max_message_bytes}")
        if not self.episode_timeout_s > 0:
            raise ValueError(f"episode timeout must be > 0 s, got {self.episode_timeout_s}")
        if self.max_episode_steps < 1:
            raise ValueError(f"max episode steps must be >= 1, got {self.max_episode_steps}")
        if self.reload_every_s is not None and not self.reload_every_s > 0:
            raise ValueError(f"reload interval must be > 0 s, got {self.reload_every_s}")
        if self.disconnect_grace_s < 0 or self.shutdown_grace_s < 0:
            raise ValueError("disconnect and shutdown graces must be >= 0 s")


@dataclass
class ServerCounters:
    requests: int = 0
    decisions: int = 0
    errors: int = 0
    batches: int = 0
    max_batch_seen: int = 0
    busy_s: float = 0.0  # the loop's time handling messages and deciding
    backend_s: float = 0.0  # of which in the backend
    backend_cpu_s: float = 0.0  # the loop thread's CPU time in the backend
    refused_messages: int = 0  # over the size limit or a malformed envelope


@dataclass
class _Waiting:
    envelope: list[bytes]
    request: DecideRequest
    received: float  # perf_counter


class Server:
    """Serve `backend` on `config.bind`. `bind()`, then `run()` (blocks until `stop()`)."""

    def __init__(
        self, backend: Backend, config: ServerConfig, env: EnvDescription | None = None
    ) -> None:
        self.backend = backend
        self.config = config
        self.env_id = env.info.env_id if env else backend.env.env_id
        self.spec = env.spec if env else ObservationSpec()
        self.policy = BatchPolicy(config.max_batch, config.batch_timeout_ms / 1000.0)
        self.activity = RobotActivity(self.policy.active_window_s)
        self.call_cost = CallCost()
        self.writer = (
            EpisodeWriter(config.record_dir, {"env_id": self.env_id, "backend": backend.name})
            if config.record_dir
            else None
        )
        self.episodes = EpisodeBook(
            self.env_id,
            self.writer,
            config.episode_timeout_s,
            config.max_episode_steps,
            min(config.disconnect_grace_s, config.episode_timeout_s),
            on_recorded=lambda episode, ok: self._acks.append((episode.episode_id, ok)),
        )
        self._env_metadata = dict(env.metadata) if env else {"env_id": self.env_id}
        self._stop = threading.Event()
        self._context = zmq.Context()
        self._auth: Any = None
        self._socket: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None  # connection events of the ROUTER
        self._peers: dict[int, bytes] = {}  # socket fd -> routing id of the robot on it
        # episodes the writer thread is done with (it appends: id, recorded), and the
        # `end` requests waiting for them (the loop looks often meanwhile)
        self._acks: collections.deque[tuple[str, bool]] = collections.deque()
        self._ends: dict[str, list[tuple[list[bytes], int]]] = {}
        self._rcvtimeo: int | None = None
        self.endpoint: str | None = None
        self._started = time.monotonic()
        self.counters = ServerCounters()
        self._loop_clock: int | None = None  # CPU-time clock of the loop thread
        self._loop_cpu_at_start = 0.0
        every = config.reload_every_s or backend.reload_every_s
        self.reloader = Reloader(backend, every) if every else None
        self.swaps = 0

    # ------------------------------------------------------------------ lifecycle

    def bind(self) -> str:
        """Create and bind the ROUTER socket; returns the bound endpoint (port resolved)."""
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)
        sock.setsockopt(zmq.RCVHWM, 10_000)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        try:
            if self.config.curve_dir is not None:
                self._auth = serve_curve(self._context, sock, Path(self.config.curve_dir))
            sock.bind(self.config.bind)
            self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        except BaseException:
            sock.close(linger=0)
            raise
        self._socket = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return self.endpoint

    def stop(self) -> None:
        """Ask the loop to finish in-flight work and shut down (thread- and signal-safe)."""
        self._stop.set()

    def close(self) -> None:
        """Release everything of a server whose `run()` never started (e.g. bind failed)."""
        if self.writer is not None:
            self.writer.close()
        self._close_sockets(linger=0)

    def _close_sockets(self, linger: int) -> None:
        if self._monitor is not None and self._socket is not None:
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
        if self._socket is not None:
            self._socket.close(linger=linger)
        if self._auth is not None:
            self._auth.stop()
        self._context.term()

    def metadata(self) -> dict[str, Any]:
        return {
            **self._env_metadata,
            "protocol": P.PROTOCOL_VERSION,
            "supported_protocols": list(P.SUPPORTED_VERSIONS),
            "backend": self.backend.name,
            "model_id": self.backend.model_id,
            "model_version": self.backend.model_version,
            "max_batch": self.policy.max_batch,
            "batch_timeout_ms": self.config.batch_timeout_ms,
            "max_message_bytes": self.config.max_message_bytes,
            "episode_timeout_s": self.config.episode_timeout_s,
            "recording": self.writer is not None,
        }

    def stats(self) -> dict[str, Any]:
        c = self.counters
        handled = c.requests or float("inf")  # per-request figures are 0 before any request
        return {
            "requests": c.requests,
            "decisions": c.decisions,
            "errors": c.errors,
            "refused_messages": c.refused_messages,
            "batches": c.batches,
            "max_batch_seen": c.max_batch_seen,
            "mean_batch": c.decisions / max(1, c.batches),
            "runtime_overhead_us": 1e6 * (c.busy_s - c.backend_s) / handled,
            "runtime_cpu_us": 1e6 * (self._loop_cpu_s() - c.backend_cpu_s) / handled,
            "backend_ms_per_batch": 1e3 * c.backend_s / max(1, c.batches),
            "open_episodes": len(self.episodes),
            "closed_episodes": self.episodes.closed,
            "recorded_episodes": self.writer.written if self.writer else 0,
            "record_failures": self.writer.failures if self.writer else 0,
            "uptime_s": time.monotonic() - self._started,
            "model_version": self.backend.model_version,
            "version_swaps": self.swaps,
            "versions_refused": self.reloader.failures if self.reloader else 0,
            "backend": self.backend.stats(),
        }

    # ------------------------------------------------------------------ loop

    def _loop_cpu_s(self) -> float:
        """CPU time the loop thread has used: immune to other processes taking the cores."""
        if self._loop_clock is None:
            return 0.0
        return time.clock_gettime(self._loop_clock) - self._loop_cpu_at_start

    def run(self) -> None:
        self._loop_clock = time.pthread_getcpuclockid(threading.get_ident())
        self._loop_cpu_at_start = time.clock_gettime(self._loop_clock)
        if self._socket is None:
            self.bind()
        sock = self._socket
        assert sock is not None
        waiting: list[_Waiting] = []
        housekeeping = time.monotonic() + 0.25
        if self.reloader is not None:
            self.reloader.start()
        try:
            while not self._stop.is_set():
                if waiting:
                    age = time.perf_counter() - waiting[0].received
                    timeout_ms = self.policy.wait_s(age, self.call_cost.seconds) * 1000.0
                elif self._ends:  # an `ended` reply waits for the writer: look often
                    timeout_ms = 2.0
                else:
                    timeout_ms = 100.0
                frames = self._receive(sock, timeout_ms)
                if frames is not None:
                    self._handle(sock, frames, waiting)
                    if len(waiting) < self.activity.active():  # others may be queued too
                        self._drain(sock, waiting)
                if self._acks:
                    self._send_acks(sock)
                while waiting and self.policy.should_flush(
                    len(waiting),
                    time.perf_counter() - waiting[0].received,
                    self.activity.active(),
                    self.call_cost.seconds,
                ):
                    batch = waiting[: self.policy.max_batch]
                    del waiting[: self.policy.max_batch]
                    self._decide(sock, batch)
                self._swap_version()
                now = time.monotonic()
                if now >= housekeeping:
                    housekeeping = now + 0.25
                    self._peer_events()
                    self.episodes.expire_idle(now)
        finally:
            self._shutdown(sock, waiting)

    def _receive(self, sock: zmq.Socket, timeout_ms: float) -> list | None:
        """The next message, waiting at most `timeout_ms`; None if there is none.

        A blocking receive with ZeroMQ's own timeout: the loop's only wait, and
        the fewest calls into ZeroMQ (each costs system calls) per request.
        """
        wait = max(1, math.ceil(timeout_ms)) if timeout_ms > 0 else 0
        if wait != self._rcvtimeo:
            sock.setsockopt(zmq.RCVTIMEO, wait)
            self._rcvtimeo = wait
        try:
            return _recv(sock)
        except zmq.Again:
            return None

    def _drain(self, sock: zmq.Socket, waiting: list[_Waiting]) -> None:
        """Receive every message already queued (bounded), answering all but decide requests."""
        for _ in range(4 * self.policy.max_batch):
            try:
                frames = _recv(sock, zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(sock, frames, waiting)

    def _envelope(self, sock: zmq.Socket, frames: list) -> list[bytes] | None:
        """The reply envelope of a well-formed message; refuse (answer or drop) anything else.

        A robot's message is its routing id (added by ZeroMQ) and one frame
        from a DEALER, or an empty delimiter and one frame from a REQ. ZeroMQ's
        size limit is per frame, so a message of more frames could be many
        times the limit: it is refused whole, answered (if at all) on its
        routing id alone, and none of its frames is echoed.
        """
        n = len(frames)
        if n == 2:
            return [frames[0].bytes]
        if n == 3 and len(frames[1]) == 0:
            return [frames[0].bytes, b""]
        self.counters.requests += 1
        self.counters.refused_messages += 1
        if n < 2 or len(frames[0]) > 255:
            return None  # not a routable peer message: nothing to answer
        total = sum(len(f) for f in frames)
        limit = self.config.max_message_bytes
        if total > limit:
            code = P.TOO_LARGE
            text = f"message of {n - 1} frames and {total} bytes is over the limit of {limit} bytes"
        else:
            code = P.BAD_MESSAGE
            text = f"a message is one frame, or an empty frame and one frame; got {n - 1} frames"
        _send(sock, [frames[0].bytes], self._error_reply(frames[-1].buffer, code, text))
        return None

    def _handle(self, sock: zmq.Socket, frames: list, waiting: list[_Waiting]) -> None:
        start = time.perf_counter()
        self._handle_message(sock, frames, waiting, start)
        self.counters.busy_s += time.perf_counter() - start

    def _handle_message(
        self, sock: zmq.Socket, frames: list, waiting: list[_Waiting], start: float
    ) -> None:
        envelope = [frames[0].bytes] if len(frames) == 2 else self._envelope(sock, frames)
        if envelope is None:
            return
        self.counters.requests += 1
        payload = frames[-1].buffer
        try:
            request = P.parse_request(payload)
            if isinstance(request, DecideRequest):
                obs = request.observation
                self.spec.check(obs)
                try:
                    self.backend.check(obs)
                except BadObservation as exc:
                    raise P.ProtocolError(P.BAD_OBSERVATION, str(exc)) from None
                peer, fd = envelope[0], frames[-1].get(_SRCFD)
                if self._peers.get(fd) != peer:
                    # A new connection on this fd: a closed one's event (queued before the
                    # fd could be reused) must apply to the robot that was on it, not this one.
                    self._peer_events()
                    self._peers[fd] = peer
                obs.history = self.episodes.history(obs, peer)
                self.activity.seen(obs.robot_id)
                waiting.append(_Waiting(envelope, request, start))
                return
            reply = self._answer(request, envelope)
            if reply is None:
                return  # answered when the writer has made the episode durable
        except P.ProtocolError as exc:
            reply = self._error_reply(payload, exc.code, exc.message)
        except Exception as exc:
            log.exception("could not handle a message")
            reply = self._error_reply(payload, P.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
        _send(sock, envelope, reply)

    def _error_reply(self, payload: memoryview, code: str, message: str) -> bytes:
        rid, eid = P.peek_ids(payload)
        return self._error(rid, eid, code, message)

    def _error(self, rid: int | None, eid: str | None, code: str, message: str) -> bytes:
        """An error reply; its text is cut to `MAX_ERROR_TEXT` (it may quote robot input)."""
        self.counters.errors += 1
        return P.encode(ErrorReply(rid, eid, code, message[: P.MAX_ERROR_TEXT]))

    def _answer(self, request: Request, envelope: list[bytes]) -> bytes | None:
        if isinstance(request, Hello):
            return P.encode(HelloReply(request.request_id, self.metadata()))
        if isinstance(request, EndEpisode):
            return self._end(request, envelope)
        return P.encode(StatsReply(request.request_id, self.stats()))

    def _end(self, request: EndEpisode, envelope: list[bytes]) -> bytes | None:
        """Close the episode; say "recorded" only once its file is on disk.

        With recording on, the reply waits for the writer thread (fsync and
        rename; the loop looks every 2 ms meanwhile, and other robots' decisions
        go on). An `end` repeated while the episode is being written (a client
        retry) waits for the same write.
        """
        rid, eid = request.request_id, request.episode_id
        steps, recorded = self.episodes.end(request)
        if recorded is None:
            self._ends.setdefault(eid, []).append((envelope, rid))
            return None
        return P.encode(EndedReply(rid, eid, steps, recorded))

    def _send_acks(self, sock: zmq.Socket) -> None:
        """Answer the `end`s waiting for episodes the writer is done with."""
        while self._acks:
            eid, recorded = self._acks.popleft()
            steps = self.episodes.written(eid, recorded)
            for envelope, rid in self._ends.pop(eid, ()):
                _send(sock, envelope, P.encode(EndedReply(rid, eid, steps, recorded)))

    def _peer_events(self) -> None:
        """Connections that closed: their robots' open episodes close after a short grace.

        Read at housekeeping and when a new connection first speaks, not on every
        poll: each look at a ZeroMQ socket costs system calls on the hot path.
        """
        if self._monitor is None:
            return
        now = time.monotonic()
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                peer = self._peers.pop(event["value"], None)
                if peer is not None:
                    self.episodes.disconnected(peer, now)

    def _decide(self, sock: zmq.Socket, batch: list[_Waiting]) -> None:
        start = time.perf_counter()
        observations = [w.request.observation for w in batch]
        cpu_start = time.thread_time()
        results = self._call_backend(observations)
        inference_s = time.perf_counter() - start
        self.counters.backend_cpu_s += time.thread_time() - cpu_start
        self.call_cost.update(inference_s)
        model_id, model_version = self.backend.model_id, self.backend.model_version
        c = self.counters
        c.batches += 1
        c.backend_s += inference_s
        c.max_batch_seen = max(c.max_batch_seen, len(batch))
        for waiting, result in zip(batch, results, strict=True):
            req = waiting.request
            obs = req.observation
            timing = {
                "queue_ms": 1e3 * (start - waiting.received),
                "inference_ms": 1e3 * inference_s,
                "batch_size": len(batch),
            }
            if not isinstance(result, P.ProtocolError):
                result.decided_by = result.decided_by or self.backend.name
                version = result.model_version or model_version
                answer = DecisionReply(
                    req.request_id, obs.episode_id, obs.step, result, model_id, version, timing
                )
                try:  # a malformed decision (a backend bug) must not take the loop down
                    reply = P.encode(answer)
                except Exception as exc:
                    log.exception(
                        "backend %s returned a decision that cannot be sent", self.backend.name
                    )
                    result = P.ProtocolError(
                        P.INTERNAL_ERROR, f"backend decision cannot be sent: {exc}"
                    )
            if isinstance(result, P.ProtocolError):
                reply = self._error(req.request_id, obs.episode_id, result.code, result.message)
            else:
                c.decisions += 1
                self.episodes.record(req, answer, waiting.envelope[0])
            _send(sock, waiting.envelope, reply)
        c.busy_s += time.perf_counter() - start

    def _call_backend(self, batch: list[Observation]) -> list[Decision | P.ProtocolError]:
        """Decide a batch. A BackendError in a decision's place fails that robot only;
        a backend that raises fails the whole batch (observations were checked on receipt)."""
        try:
            decisions = self.backend.decide(batch)
            if len(decisions) != len(batch):
                raise BackendError(
                    f"backend returned {len(decisions)} decisions for {len(batch)} observations"
                )
        except BackendError as exc:
            return [P.ProtocolError(P.BACKEND_ERROR, str(exc))] * len(batch)
        except Exception as exc:
            log.exception("backend %s failed", self.backend.name)
            return [P.ProtocolError(P.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")] * len(batch)
        return [_check_decision(o, d) for o, d in zip(batch, decisions, strict=True)]

    def _swap_version(self) -> None:
        """Between batches: serve the newest version the reloader has loaded, if any."""
        loaded = self.reloader.take() if self.reloader is not None else None
        if loaded is None:
            return
        try:
            self.backend.swap(loaded)
        except Exception:
            log.exception("could not swap in a new model version; keeping the current one")
            return
        self.swaps += 1
        log.info("now serving model version %s", self.backend.model_version)

    def _shutdown(self, sock: zmq.Socket, waiting: list[_Waiting]) -> None:
        """Finish queued decisions, close episodes, flush recordings and answer their ends;
        meanwhile, and for `shutdown_grace_s` after, answer new requests `shutting_down`.

        Answers stop after `WRITER_FLUSH_S` of flushing; the writer still
        finishes every episode before the server returns."""
        while waiting:
            batch = waiting[: self.policy.max_batch]
            del waiting[: self.policy.max_batch]
            self._decide(sock, batch)
        if self.reloader is not None:
            self.reloader.stop()
        self.episodes.close_all("shutdown")
        if self.writer is not None:
            self.writer.finish()
        started = time.monotonic()
        flushed_at: float | None = None
        while True:
            now = time.monotonic()
            if flushed_at is None and not (self.writer is not None and self.writer.busy):
                flushed_at = now
            if (flushed_at is not None and now - flushed_at >= self.config.shutdown_grace_s) or (
                flushed_at is None and now - started >= WRITER_FLUSH_S
            ):
                break
            frames = self._receive(sock, 20)
            if frames is not None:
                self._refuse(sock, frames)
                self._refuse_all(sock)
            self._send_acks(sock)
        self._send_acks(sock)
        self._refuse_all(sock)
        self._close_sockets(linger=1000)
        if self.writer is not None and self.writer.busy:
            log.warning(
                "still writing %d episode(s) after %.0f s; waiting for them (their robots get "
                "no reply; killing the server now would lose them)",
                self.writer.pending,
                WRITER_FLUSH_S,
            )
            self.writer.close(timeout=None)

    def _refuse_all(self, sock: zmq.Socket) -> None:
        while True:
            try:
                frames = _recv(sock, zmq.NOBLOCK)
            except zmq.Again:
                return
            self._refuse(sock, frames)

    def _refuse(self, sock: zmq.Socket, frames: list) -> None:
        envelope = self._envelope(sock, frames)
        if envelope is not None:
            self.counters.requests += 1
            reply = self._error_reply(frames[-1].buffer, P.SHUTTING_DOWN, "server is shutting down")
            _send(sock, envelope, reply)


_SRCFD = zmq.SRCFD


def _recv(sock: zmq.Socket, flags: int = 0) -> list:
    """One whole message as frames (pyzmq's recv_multipart asks ZeroMQ more per frame)."""
    frame = sock.recv(flags, copy=False)
    frames = [frame]
    while frame.more:
        frame = sock.recv(copy=False)
        frames.append(frame)
    return frames


def _send(sock: zmq.Socket, envelope: list[bytes], reply: bytes) -> None:
    for part in envelope:
        sock.send(part, zmq.SNDMORE)
    sock.send(reply)


def _check_decision(obs: Observation, decision: Any) -> Decision | P.ProtocolError:
    if isinstance(decision, BackendError):
        return P.ProtocolError(P.BACKEND_ERROR, str(decision))
    if not isinstance(decision, Decision):
        return P.ProtocolError(
            P.BACKEND_ERROR, f"backend returned {type(decision).__name__}, not a decision"
        )
    if decision.skill_index is not None and not 0 <= decision.skill_index < len(obs.options):
        return P.ProtocolError(
            P.BACKEND_ERROR,
            f"backend chose skill {decision.skill_index} of {len(obs.options)} options",
        )
    return decision
