"""Helpers for the runtime tests: real servers (in a thread or a subprocess), free ports."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from agent.backends import load_backend
from agent.backends.base import Backend, EnvInfo
from agent.backends.zero import ZeroBackend
from agent.client import AgentClient
from agent.envspec import EnvDescription, ObservationSpec, describe_env
from agent.server import Server, ServerConfig

ROOT = Path(__file__).resolve().parents[1]
TEST_ENV = EnvInfo(env_id="test/Null-v0", action_shape=(4,))


def running_server(
    backend: Backend | None = None, spec: ObservationSpec | None = None, **config
) -> contextlib.AbstractContextManager[Server]:
    """A real server on a loopback port, its loop in a thread; stopped (and joined) on exit."""
    backend = backend or ZeroBackend(TEST_ENV)
    env = EnvDescription(backend.env, spec or ObservationSpec(), {"env_id": backend.env.env_id})
    return _serving(Server(backend, ServerConfig(bind="tcp://127.0.0.1:0", **config), env))


def running_env_server(
    env_id: str, backend: str, **config
) -> contextlib.AbstractContextManager[Server]:
    """Like `running_server`, for a real gymnasium env and a registered backend."""
    env = describe_env(env_id)
    backend_obj = load_backend(backend, env.info)
    return _serving(Server(backend_obj, ServerConfig(bind="tcp://127.0.0.1:0", **config), env))


@contextlib.contextmanager
def _serving(server: Server) -> Iterator[Server]:
    server.bind()
    thread = threading.Thread(target=server.run, name="test-server", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join(30)
        assert not thread.is_alive(), "server did not stop"


def serve_subprocess(port: int, *args: str) -> subprocess.Popen:
    """`agent serve` as a real process (stdout/stderr to a pipe)."""
    agent = Path(sys.executable).with_name("agent")
    cmd = [str(agent), "serve", "--bind", f"tcp://127.0.0.1:{port}", "--quiet", *args]
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_ready(endpoint: str, attempts: int = 60) -> dict:
    """Handshake with a starting server, retrying (each try times out after 500 ms)."""
    with AgentClient(endpoint, timeout_ms=500, retries=attempts) as client:
        return client.hello()


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> str:
    """Signal `proc`, wait for it (kill if it hangs) and return its output."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=10)
        raise AssertionError(f"process did not exit after signal {sig}: {out}") from None
    return out or ""


def openpi_pack(obj):
    """openpi_client.msgpack_numpy's array encoding, written out independently."""
    if isinstance(obj, np.ndarray):
        return {
            b"__ndarray__": True,
            b"data": obj.tobytes(),
            b"dtype": obj.dtype.str,
            b"shape": obj.shape,
        }
    return obj
