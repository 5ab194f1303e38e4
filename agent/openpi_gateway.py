"""A second front door that speaks openpi's WebSocket policy-server protocol.

openpi robot clients (`openpi_client.WebsocketClientPolicy`) connect, read a
msgpack metadata frame, then send msgpack-numpy observation dicts and read
back action dicts; `GET /healthz` answers 200. Each WebSocket connection is
one robot episode, forwarded as an ordinary `AgentClient` over loopback to the
ZeroMQ server, so openpi robots share the same batching scheduler, backends
and recording as everyone else, and the server does not change.

Observation mapping (openpi keys are free-form): `prompt` -> instruction;
every uint8 HxWx3 (or 3xHxW) array -> an image named after its key (without
an `observation/` prefix); the first float array whose key contains `state`
-> state (float32, flattened); optional `options` and `sim` pass through.
Reply: `actions` as a (1, A) chunk when the backend gives a low-level action,
plus `skill_index`, `skill`, `point`, `reasoning`, `model_version` and
`server_timing` (`infer_ms`, `queue_ms`, `prev_total_ms`). Errors are sent as
a text frame (openpi clients raise it) and the connection stays open.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from http import HTTPStatus
from typing import Any

import numpy as np

from agent import codec as C
from agent import protocol as P
from agent.client import AgentClient, AgentTimeout, ServerError

log = logging.getLogger(__name__)


MAX_DEPTH = 8  # openpi observations are flat or one level of "observation/..." maps


def _flatten(obs: dict[str, Any], prefix: str = "", depth: int = 0) -> dict[str, Any]:
    if depth >= MAX_DEPTH:
        raise P.ProtocolError(
            P.BAD_REQUEST, f"observation maps may be nested at most {MAX_DEPTH} deep"
        )
    flat: dict[str, Any] = {}
    for key, value in obs.items():
        name = f"{prefix}{key}" if isinstance(key, str) else f"{prefix}{C.brief(key, 32)}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}/", depth + 1))
        else:
            flat[name] = value
    return flat


def _image_name(key: str) -> str:
    name = key.removeprefix("observation/").replace("/", "_")
    return name or "image"


def openpi_observation(obs: Any) -> dict[str, Any]:
    """The decide-request fields for an openpi observation dict (pure)."""
    if not isinstance(obs, dict):
        raise P.ProtocolError(P.BAD_REQUEST, "an openpi observation must be a map")
    images: dict[str, np.ndarray] = {}
    state = None
    for key, value in _flatten(obs).items():
        if not isinstance(value, np.ndarray):
            continue
        if value.dtype == np.uint8 and value.ndim == 3:
            if value.shape[0] == 3 and value.shape[2] != 3:
                value = np.ascontiguousarray(value.transpose(1, 2, 0))
            images[_image_name(key)] = value
        elif state is None and "state" in key and value.dtype.kind == "f":
            state = np.ascontiguousarray(value, dtype=np.float32).ravel()
    options = obs.get("options") or []
    prompt = obs.get("prompt", "")
    if not isinstance(prompt, str):
        raise P.ProtocolError(
            P.BAD_REQUEST, f"prompt must be a string, got {type(prompt).__name__}"
        )
    return {
        "images": images,
        "state": state,
        "instruction": prompt,
        "options": options if isinstance(options, list) else [],
        "sim": obs.get("sim"),
    }


class OpenpiGateway:
    """WebSocket server on `host:port` forwarding to the ZeroMQ server at `endpoint`."""

    def __init__(
        self,
        endpoint: str,
        host: str = "127.0.0.1",
        port: int = 8000,
        timeout_ms: int = 60_000,
        max_message_bytes: int | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.host, self.port = host, port
        self.timeout_ms = timeout_ms
        self.max_message_bytes = max_message_bytes
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Listen (in a background thread); returns the bound port."""
        from websockets.sync.server import serve

        self._server = serve(
            self._handle,
            self.host,
            self.port,
            compression=None,
            max_size=self.max_message_bytes,
            process_request=self._health,
        )
        self.port = self._server.socket.getsockname()[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="openpi-gateway", daemon=True
        )
        self._thread.start()
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
        if self._thread is not None:
            self._thread.join(10)

    @staticmethod
    def _health(connection: Any, request: Any) -> Any:
        if request.path == "/healthz":
            return connection.respond(HTTPStatus.OK, "OK\n")
        return None

    def _handle(self, connection: Any) -> None:
        """One openpi robot = one episode on the ZeroMQ server."""
        from websockets.exceptions import ConnectionClosed

        robot = f"openpi-{uuid.uuid4().hex[:12]}"
        client = AgentClient(self.endpoint, timeout_ms=self.timeout_ms, robot_id=robot, retries=1)
        episode_id, step, prev_total_ms = uuid.uuid4().hex, 0, None
        try:
            connection.send(C.packb(client.hello()))
            while True:
                frame = connection.recv()
                start = time.monotonic()
                try:
                    if isinstance(frame, str):
                        raise P.ProtocolError(P.BAD_MESSAGE, "observations must be binary msgpack")
                    fields = openpi_observation(C.unpackb(frame))
                    reply = client.decide(episode_id=episode_id, step=step, **fields)
                except (P.ProtocolError, ServerError, AgentTimeout, ValueError) as exc:
                    connection.send(f"Error in inference server: {exc}"[: P.MAX_ERROR_TEXT])
                    continue
                except Exception as exc:  # never close a robot's connection over its input
                    log.exception("openpi front door: could not handle an observation")
                    text = f"Error in inference server: internal error ({type(exc).__name__})"
                    connection.send(text)
                    continue
                step += 1
                connection.send(C.packb(self._action(reply, prev_total_ms)))
                prev_total_ms = 1e3 * (time.monotonic() - start)
        except ConnectionClosed:
            pass
        finally:
            try:
                if step:
                    client.end_episode(episode_id, truncated=True)
            except (AgentTimeout, ServerError) as exc:
                log.warning("could not close openpi episode %s: %s", episode_id, exc)
            client.close()

    @staticmethod
    def _action(reply: Any, prev_total_ms: float | None) -> dict[str, Any]:
        decision = reply.decision
        out: dict[str, Any] = {"model_version": reply.model_version}
        if decision.action is not None:
            out["actions"] = np.asarray(decision.action, np.float32).reshape(1, -1)
        for name in ("skill_index", "skill", "point", "reasoning"):
            if getattr(decision, name) is not None:
                out[name] = getattr(decision, name)
        timing = {
            "infer_ms": reply.timing.get("inference_ms"),
            "queue_ms": reply.timing.get("queue_ms"),
        }
        if prev_total_ms is not None:
            timing["prev_total_ms"] = prev_total_ms
        out["server_timing"] = timing
        return out
