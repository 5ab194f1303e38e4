"""Start, wait for and stop the product's processes from Python (the demo, benchmarks, tests).

Every child runs in its own process group, so stopping it (or a Ctrl-C of
the caller) takes down whatever it started too (horovodrun's ranks, robot
subprocesses); every wait has a timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

BIN = Path(sys.executable).parent
_started: list[subprocess.Popen] = []  # every child `start` made, for `stop_all`


def free_port() -> int:
    """A TCP port that was free on loopback a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: Sequence[str], *, log: IO[str] | None = None, **popen: Any) -> subprocess.Popen:
    """`cmd` in a new process group; stdout and stderr to `log` (inherited if None)."""
    options: dict[str, Any] = {"start_new_session": True}
    if log is not None:
        options.update(stdout=log, stderr=subprocess.STDOUT)
    proc = subprocess.Popen(list(cmd), **{**options, **popen})
    _started.append(proc)
    return proc


def stop(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout_s: float = 60) -> int:
    """Signal `proc`'s process group, wait, SIGKILL the group if it hangs; its exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout_s)
    with contextlib.suppress(ProcessLookupError):  # leftovers of the group
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait(10)


def stop_all(timeout_s: float = 10) -> None:
    """Stop every process group `start` made that is still running (a Ctrl-C, a failed stage)."""
    running = [p for p in _started if p.poll() is None]
    for proc in running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.1, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def serve_command(env_id: str, endpoint: str, *args: str) -> list[str]:
    return [str(BIN / "agent"), "serve", "--env", env_id, "--bind", endpoint, "--quiet", *args]


def wait_ready(endpoint: str, proc: subprocess.Popen | None = None, timeout_s: float = 120) -> dict:
    """Handshake with a starting server until it answers; its metadata."""
    from agent.client import AgentClient, AgentTimeout

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"agent serve exited early with code {proc.returncode}")
        with AgentClient(endpoint, timeout_ms=1000, retries=0) as client:
            try:
                return client.hello()
            except AgentTimeout:
                continue
    raise RuntimeError(f"agent serve at {endpoint} did not answer within {timeout_s} s")


@contextlib.contextmanager
def serving(
    env_id: str, *args: str, log: IO[str] | None = None, timeout_s: float = 120
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`agent serve --env env_id *args` on a free loopback port until the block ends."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = start(serve_command(env_id, endpoint, *args), log=log)
    try:
        wait_ready(endpoint, proc, timeout_s)
        yield endpoint, proc
    finally:
        code = stop(proc)
        if code not in (0, -signal.SIGKILL) and sys.exc_info()[0] is None:
            raise RuntimeError(f"agent serve for {env_id} exited with code {code}")


ROOT = Path(__file__).resolve().parents[1]


def last_json(text: str) -> dict:
    """The JSON object on the last line that holds one (what --json commands print).

    horovodrun's `[0]<stdout>:` prefix is skipped.
    """
    for line in reversed(text.strip().splitlines()):
        line = re.sub(r"^\[\d+\]<stdout>:", "", line).strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON line in the output: {text[-500:]!r}")


def run(cmd: Sequence[str], *, timeout_s: float, what: str) -> dict:
    """Run `cmd` (own process group, killed whole on timeout or Ctrl-C); its JSON summary."""
    proc = start(cmd, log=None, stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop(proc, signal.SIGTERM, 10)
        raise RuntimeError(f"{what} did not finish within {timeout_s:.0f} s") from None
    except BaseException:
        stop(proc, signal.SIGTERM, 10)
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed with code {proc.returncode}: {out[-1500:]}")
    return last_json(out)


def run_robots(
    endpoint: str, env_id: str, episodes: int, seed: int, robots: int = 2, timeout_s: float = 1800
) -> dict:
    """`examples/robot_loop.py` against `endpoint` on seeds seed..seed+episodes-1; its summary.

    Its progress bar is off: callers drive several at once and show their own.
    """
    script = ROOT / "examples" / "robot_loop.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script} is missing (robot loops run from a source checkout)")
    cmd = [sys.executable, str(script), "--endpoint", endpoint, "--env", env_id]
    cmd += [
        "--robots",
        str(robots),
        "--episodes",
        str(episodes),
        "--seed",
        str(seed),
        "--json",
        "--no-progress",
    ]
    return run(cmd, timeout_s=timeout_s, what=f"the robot loop on {env_id}")


def trainer_command(ranks: int, *args: str, module: str = "trainer") -> list[str]:
    """`python -m trainer *args` (or another trainer `module`, e.g. trainer.cosmos), under
    `horovodrun -np ranks` when ranks > 1."""
    cmd = [sys.executable, "-m", module, *args]
    if ranks > 1:
        cmd = [
            str(BIN / "horovodrun"),
            "-np",
            str(ranks),
            "-H",
            f"localhost:{ranks}",
            "--gloo",
            *cmd,
        ]
    return cmd
