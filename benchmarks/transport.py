"""Transport benchmark: what the runtime itself costs per decision.

    python benchmarks/transport.py --clients 1,8 --seconds 5 --json

The server (zero backend, so nothing but the runtime is measured) runs in this
process; each client is its own process sending one 224x224x3 uint8 image, a
14-d float32 state and an instruction per request, one request in flight.
Reports client-measured p50/p99 latency, decisions/s, and the server's
per-request overhead (receive, validate, batch, encode, reply; backend time
excluded) both as wall time and as CPU time of the server thread (the latter
is immune to other processes competing for the cores).

Side by side in the same run (same payload, same load on the machine), it
measures a faithful re-implementation of openpi's WebSocket policy server
(asyncio `websockets` server, msgpack-numpy, a trivial policy; clients like
`openpi_client.WebsocketClientPolicy`), so the ratio holds even when the
machine is busy. Anchor from the issue (openpi on a quiet 2-core machine):
p50 0.29 ms and 3,300 decisions/s for 1 client, 7,300 decisions/s for 8.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ANCHOR = {"p50_ms_1": 0.29, "decisions_per_s_1": 3300.0, "decisions_per_s_8": 7300.0}
INSTRUCTION = "pick up the red cube and place it on the green pad"


def payload() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng()
    return (
        rng.integers(0, 255, (224, 224, 3), dtype=np.uint8),
        rng.standard_normal(14).astype(np.float32),
    )


def wait_until(start_at: float) -> None:
    while time.time() < start_at:
        time.sleep(0.001)


def agent_client_worker(
    endpoint: str, start_at: float, seconds: float
) -> tuple[list[float], float]:
    """One robot on this runtime: decide in a loop until `start_at + seconds`."""
    from agent.client import AgentClient

    image, state = payload()
    latencies = []
    with AgentClient(endpoint, timeout_ms=10_000) as client:
        client.hello()
        wait_until(start_at)
        began, stop_at, step = time.time(), start_at + seconds, 0
        while time.time() < stop_at:
            reply = client.decide(
                episode_id=client.robot_id.replace(".", "-"),
                step=step,
                images={"image": image},
                state=state,
                instruction=INSTRUCTION,
            )
            latencies.append(reply.latency_ms)
            step += 1
        elapsed = time.time() - began
    return latencies, elapsed


def openpi_client_worker(uri: str, start_at: float, seconds: float) -> tuple[list[float], float]:
    """One robot as openpi_client.WebsocketClientPolicy does it (msgpack-numpy over websockets)."""
    from websockets.sync.client import connect

    from agent import protocol as P  # openpi's msgpack_numpy encoding

    image, state = payload()
    latencies = []
    with connect(uri, compression=None, max_size=None) as ws:
        P.unpackb(ws.recv())  # metadata frame
        wait_until(start_at)
        began, stop_at = time.time(), start_at + seconds
        while time.time() < stop_at:
            sent = time.perf_counter()
            ws.send(
                P.packb(
                    {"observation/image": image, "observation/state": state, "prompt": INSTRUCTION}
                )
            )
            P.unpackb(ws.recv())
            latencies.append(1e3 * (time.perf_counter() - sent))
        elapsed = time.time() - began
    return latencies, elapsed


class OpenpiStyleServer:
    """openpi's WebsocketPolicyServer loop with a trivial policy, in a background thread."""

    def __init__(self) -> None:
        import asyncio

        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Future | None = None
        self.port = 0
        self._thread = threading.Thread(
            target=self._loop.run_until_complete, args=(self._run(),), daemon=True
        )

    async def _handler(self, websocket) -> None:  # type: ignore[no-untyped-def]
        import websockets

        from agent import protocol as P

        await websocket.send(P.packb({"policy": "trivial"}))
        prev_total = None
        while True:
            try:
                start = time.monotonic()
                obs = P.unpackb(await websocket.recv())
                infer = time.monotonic()
                action = {"actions": np.zeros((1, 7), np.float32), "n": len(obs)}
                action["server_timing"] = {"infer_ms": 1e3 * (time.monotonic() - infer)}
                if prev_total is not None:
                    action["server_timing"]["prev_total_ms"] = 1e3 * prev_total
                await websocket.send(P.packb(action))
                prev_total = time.monotonic() - start
            except websockets.ConnectionClosed:
                break

    async def _run(self) -> None:
        from websockets.asyncio.server import serve

        self._stop = self._loop.create_future()
        async with serve(self._handler, "127.0.0.1", 0, compression=None, max_size=None) as server:
            self.port = next(iter(server.sockets)).getsockname()[1]
            self._ready.set()
            await self._stop

    def start(self) -> str:
        self._thread.start()
        self._ready.wait(10)
        return f"ws://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(lambda: self._stop.done() or self._stop.set_result(None))
        self._thread.join(10)


def run_clients(kind: str, address: str, clients: int, seconds: float) -> list[dict]:
    start_at = time.time() + 3.0 + 0.3 * clients
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", kind, address, str(start_at), str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(clients)
    ]
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=seconds + 60)
            if proc.returncode != 0:
                raise RuntimeError(f"{kind} client failed with exit code {proc.returncode}")
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return results


def summary(results: list[dict], clients: int) -> dict:
    """Decisions/s is the sum of each client's own rate (a client that started late still counts)."""
    lat = np.concatenate([r["latencies_ms"] for r in results])
    rate = sum(len(r["latencies_ms"]) / r["seconds"] for r in results if r["seconds"] > 0)
    return {
        "clients": clients,
        "decisions": int(lat.size),
        "decisions_per_s": rate,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


def run_agent(clients: int, seconds: float, max_batch: int) -> dict:
    from agent.backends.base import EnvInfo
    from agent.backends.zero import ZeroBackend
    from agent.server import Server, ServerConfig

    server = Server(
        ZeroBackend(EnvInfo("bench/Transport-v0", action_shape=(7,))),
        ServerConfig(bind="tcp://127.0.0.1:0", max_batch=max_batch),
    )
    endpoint = server.bind()
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        results = run_clients("agent", endpoint, clients, seconds)
        stats = server.stats()
    finally:
        server.stop()
        thread.join(30)
    return {
        **summary(results, clients),
        "mean_batch": stats["mean_batch"],
        "runtime_overhead_us": stats["runtime_overhead_us"],
        "runtime_cpu_us": stats["runtime_cpu_us"],
        "errors": stats["errors"],
    }


def run_openpi_style(clients: int, seconds: float) -> dict:
    server = OpenpiStyleServer()
    uri = server.start()
    try:
        return summary(run_clients("openpi", uri, clients, seconds), clients)
    finally:
        server.stop()


def goals(agent: dict[int, dict]) -> dict[str, bool]:
    met = {}
    if 1 in agent:
        met["p50_1_client_le_0.29ms"] = agent[1]["p50_ms"] <= ANCHOR["p50_ms_1"]
        met["decisions_per_s_1_client_ge_3300"] = (
            agent[1]["decisions_per_s"] >= ANCHOR["decisions_per_s_1"]
        )
    if 8 in agent:
        met["decisions_per_s_8_clients_ge_10950"] = (
            agent[8]["decisions_per_s"] >= 1.5 * ANCHOR["decisions_per_s_8"]
        )
    return met


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        worker = agent_client_worker if argv[1] == "agent" else openpi_client_worker
        latencies, elapsed = worker(argv[2], float(argv[3]), float(argv[4]))
        print(json.dumps({"latencies_ms": [round(v, 4) for v in latencies], "seconds": elapsed}))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", default="1,8", help="comma-separated client counts")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--no-openpi", action="store_true", help="skip the side-by-side reference")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    with open("/proc/loadavg") as f:
        load_before = float(f.read().split()[0])
    agent, openpi = {}, {}
    for n in (int(c) for c in args.clients.split(",")):
        agent[n] = run_agent(n, args.seconds, args.max_batch)
        if not args.no_openpi:
            openpi[n] = run_openpi_style(n, args.seconds)
    out = sys.stderr if args.json else sys.stdout
    for n, r in agent.items():
        print(
            f"{n:3d} clients  runtime: {r['decisions_per_s']:7.0f} decisions/s, p50 "
            f"{r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms, mean batch {r['mean_batch']:.2f}, "
            f"overhead {r['runtime_overhead_us']:.0f} us/request (CPU {r['runtime_cpu_us']:.0f} us)",
            file=out,
        )
        if n in openpi:
            o = openpi[n]
            print(
                f"{n:3d} clients  openpi-style websocket: {o['decisions_per_s']:7.0f} decisions/s, "
                f"p50 {o['p50_ms']:.3f} ms, p99 {o['p99_ms']:.3f} ms",
                file=out,
            )
    ratios = {
        str(n): {
            "decisions_per_s": agent[n]["decisions_per_s"] / openpi[n]["decisions_per_s"],
            "p50": agent[n]["p50_ms"] / openpi[n]["p50_ms"],
        }
        for n in openpi
    }
    result = {
        "payload": "224x224x3 uint8 image + 14 float32 + instruction",
        "load_average_before": load_before,
        "runtime": list(agent.values()),
        "openpi_style_same_run": list(openpi.values()),
        "runtime_vs_openpi_style": ratios,
        "anchor_openpi_quiet_machine": ANCHOR,
        "goals_vs_anchor": goals(agent),
    }
    print(json.dumps(result) if args.json else json.dumps({"ratios": ratios, **goals(agent)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
