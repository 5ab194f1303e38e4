"""Soak: many robots against one `agent serve` process; nothing lost, nothing mixed up, memory flat.

    python benchmarks/soak.py --robots 32 --seconds 600 --json

Starts its own server (zero backend), drives every robot from one thread
(one DEALER socket each, one request in flight per robot), checks every
reply against the request it answers, and samples the server's resident
memory once a second after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zmq

from agent import protocol as P
from agent.launch import free_port
from agent.messages import DecideRequest, DecisionReply, Observation

ROOT = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def start_server(port: int) -> subprocess.Popen:
    agent = Path(sys.executable).with_name("agent")
    return subprocess.Popen(
        [
            str(agent),
            "serve",
            "--env",
            "Pusher-v5",
            "--backend",
            "zero",
            "--bind",
            f"tcp://127.0.0.1:{port}",
            "--quiet",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def soak(
    endpoint: str, server_pid: int, robots: int, seconds: float, warmup_s: float = 1.0
) -> dict:
    ctx = zmq.Context.instance()
    socks, outstanding, steps = [], {}, [0] * robots
    poller = zmq.Poller()
    image = np.zeros((64, 64, 3), np.uint8)
    next_id = 1
    sent = received = mismatched = 0

    def send(i: int) -> None:
        nonlocal next_id, sent
        state = np.full(23, steps[i] % 1000, np.float32)
        obs = Observation(
            f"soak-{i}", f"soak-ep-{i}", steps[i], images={"image": image}, state=state
        )
        socks[i].send(P.encode(DecideRequest(next_id, obs)))
        outstanding[i] = (next_id, steps[i])
        next_id += 1
        sent += 1

    for _ in range(robots):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        socks.append(s)
        poller.register(s, zmq.POLLIN)
    index = {s: i for i, s in enumerate(socks)}
    for i in range(robots):
        send(i)
    start = time.monotonic()
    samples: list[float] = []
    next_sample = start + warmup_s
    stop_at = start + warmup_s + seconds
    while outstanding:
        now = time.monotonic()
        if now >= next_sample:
            samples.append(rss_mb(server_pid))
            next_sample = now + 1.0
        events = dict(poller.poll(5000))
        if not events:
            break  # nothing for 5 s: whatever is still outstanding is lost
        for s in events:
            i = index[s]
            reply = P.parse_reply(s.recv())
            received += 1
            want_id, want_step = outstanding.pop(i)
            if (
                not isinstance(reply, DecisionReply)
                or reply.request_id != want_id
                or reply.step != want_step
            ):
                mismatched += 1
            steps[i] += 1
            if time.monotonic() < stop_at:
                send(i)
    elapsed = time.monotonic() - start
    for s in socks:
        s.close(linger=0)
    return {
        "robots": robots,
        "seconds": round(elapsed, 2),
        "sent": sent,
        "received": received,
        "lost": len(outstanding),
        "mismatched": mismatched,
        "decisions_per_s": received / elapsed if elapsed else 0.0,
        "rss_start_mb": samples[0] if samples else None,
        "rss_end_mb": samples[-1] if samples else None,
        "rss_growth_mb": samples[-1] - samples[0] if len(samples) > 1 else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--robots", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    port = free_port()
    server = start_server(port)
    try:
        endpoint = f"tcp://127.0.0.1:{port}"
        from agent.client import AgentClient

        with AgentClient(endpoint, timeout_ms=500, retries=60) as client:
            client.hello()
        result = soak(endpoint, server.pid, args.robots, args.seconds)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
    ok = result["lost"] == 0 and result["mismatched"] == 0
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['robots']} robots for {result['seconds']} s: {result['received']} replies, "
            f"lost {result['lost']}, mismatched {result['mismatched']}, "
            f"{result['decisions_per_s']:.0f} decisions/s, server RSS "
            f"{result['rss_start_mb']:.1f} -> {result['rss_end_mb']:.1f} MB"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
