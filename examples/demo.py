"""`make demo`: the project's main job on the embedded default, end to end.

1. `agent serve --env tabletop/PickPlace-v0 --record DIR` with the scripted
   oracle (no model download) on a free loopback port;
2. `examples/robot_loop.py` drives 4 simulated robots through 20 episodes;
3. the server shuts down gracefully and the recorded episodes are read back.

Every process gets a timeout; the demo exits non-zero if any stage fails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(endpoint: str, server: subprocess.Popen, timeout_s: float) -> dict:
    """Handshake with the server until it answers (it loads MuJoCo first)."""
    from agent.client import AgentClient, AgentTimeout

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"agent serve exited early with code {server.returncode}")
        with AgentClient(endpoint, timeout_ms=1000, retries=0) as client:
            try:
                return client.hello()
            except AgentTimeout:
                continue
    raise RuntimeError(f"agent serve did not answer within {timeout_s} s")


def stop(server: subprocess.Popen, timeout_s: float = 60) -> int:
    server.send_signal(signal.SIGINT)
    try:
        return server.wait(timeout_s)
    except subprocess.TimeoutExpired:
        server.kill()
        return server.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", default="tabletop/PickPlace-v0")
    parser.add_argument("--robots", type=int, default=4)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="keep recordings here")
    args = parser.parse_args()
    os.environ.setdefault("MUJOCO_GL", "egl")

    out = args.out or Path(tempfile.mkdtemp(prefix="agent-demo-"))
    episodes_dir = out / "episodes"
    endpoint = f"tcp://127.0.0.1:{free_port()}"

    print(f"== 1. serve: {args.env} with the oracle backend on {endpoint} ==", flush=True)
    server = subprocess.Popen(
        [
            str(BIN / "agent"),
            "serve",
            "--env",
            args.env,
            "--bind",
            endpoint,
            "--record",
            str(episodes_dir),
            "--quiet",
        ],
        cwd=ROOT,
    )
    try:
        meta = wait_until_serving(endpoint, server, timeout_s=120)
        print(
            f"   handshake: protocol {meta.get('protocol')}, backend {meta.get('backend')}",
            flush=True,
        )

        print(f"== 2. robots: {args.robots} robots, {args.episodes} episodes ==", flush=True)
        loop = subprocess.run(
            [
                sys.executable,
                str(ROOT / "examples" / "robot_loop.py"),
                "--endpoint",
                endpoint,
                "--env",
                args.env,
                "--robots",
                str(args.robots),
                "--episodes",
                str(args.episodes),
                "--json",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            timeout=1800,
        )
        print(loop.stdout, end="", flush=True)
        if loop.returncode != 0:
            print("robot loop failed", file=sys.stderr)
            return 1
        summary = json.loads(loop.stdout.strip().splitlines()[-1])
    finally:
        code = stop(server)
    if code != 0:
        print(f"agent serve exited with code {code}", file=sys.stderr)
        return 1

    print(f"== 3. recordings: {episodes_dir} ==", flush=True)
    from agent.store import iter_episodes

    recorded = list(iter_episodes(episodes_dir))
    steps = sum(len(e) for e in recorded)
    successes = sum(bool(e.success) for e in recorded)
    print(f"   {len(recorded)} episodes, {steps} decisions, {successes} successful", flush=True)

    print("== results ==")
    print(json.dumps({**summary, "recorded_episodes": len(recorded), "recorded_steps": steps}))
    return 0 if len(recorded) == summary["episodes"] else 1


if __name__ == "__main__":
    sys.exit(main())
