"""Transport benchmark: what the runtime itself costs per decision.

    python benchmarks/transport.py --clients 1,8 --seconds 5 --json

The server (zero backend, so nothing but the runtime is measured) runs in this
process; each client is its own process sending one 224x224x3 uint8 image, a
14-d float32 state and an instruction per request, one request in flight.
Reports client-measured p50/p99 latency, decisions/s, and the server's
per-request overhead (receive, validate, batch, encode, reply; backend time
excluded) both as wall time and as CPU time of the server thread (the latter
is immune to other processes competing for the cores). Anchor (openpi's WebSocket policy server, trivial policy, same
2-core machine class): p50 0.29 ms and 3,300 decisions/s for 1 client,
7,300 decisions/s for 8 clients.
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


def client_worker(endpoint: str, start_at: float, seconds: float) -> None:
    """One robot: decide in a loop from `start_at` for `seconds`; print latencies as JSON."""
    from agent.client import AgentClient

    rng = np.random.default_rng()
    image = rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)
    state = rng.standard_normal(14).astype(np.float32)
    latencies = []
    with AgentClient(endpoint, timeout_ms=10_000) as client:
        client.hello()
        while time.time() < start_at:
            time.sleep(0.001)
        stop_at, step = start_at + seconds, 0
        while time.time() < stop_at:
            reply = client.decide(episode_id=client.robot_id.replace(".", "-"), step=step,
                                  images={"image": image}, state=state,
                                  instruction=INSTRUCTION)  # fmt: skip
            latencies.append(reply.latency_ms)
            step += 1
    print(json.dumps({"latencies_ms": [round(v, 4) for v in latencies]}))


def run(clients: int, seconds: float, max_batch: int) -> dict:
    from agent.backends.base import EnvInfo
    from agent.backends.zero import ZeroBackend
    from agent.server import Server, ServerConfig

    server = Server(ZeroBackend(EnvInfo("bench/Transport-v0", action_shape=(7,))),
                    ServerConfig(bind="tcp://127.0.0.1:0", max_batch=max_batch))  # fmt: skip
    endpoint = server.bind()
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    start_at = time.time() + 2.0 + 0.2 * clients
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", endpoint, str(start_at),
                               str(seconds)], stdout=subprocess.PIPE, text=True)
             for _ in range(clients)]  # fmt: skip
    latencies: list[float] = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=seconds + 60)
            if proc.returncode != 0:
                raise RuntimeError(f"client failed with exit code {proc.returncode}")
            latencies += json.loads(out.strip().splitlines()[-1])["latencies_ms"]
        stats = server.stats()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        server.stop()
        thread.join(30)
    lat = np.asarray(latencies)
    return {
        "clients": clients, "seconds": seconds, "decisions": int(lat.size),
        "decisions_per_s": lat.size / seconds, "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)), "mean_batch": stats["mean_batch"],
        "runtime_overhead_us": stats["runtime_overhead_us"],
        "runtime_cpu_us": stats["runtime_cpu_us"], "errors": stats["errors"],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        client_worker(argv[1], float(argv[2]), float(argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", default="1,8", help="comma-separated client counts")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    runs = [run(int(n), args.seconds, args.max_batch) for n in args.clients.split(",")]
    for r in runs:
        print(f"{r['clients']:3d} clients: {r['decisions_per_s']:8.0f} decisions/s, "
              f"p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms, mean batch "
              f"{r['mean_batch']:.2f}, runtime overhead {r['runtime_overhead_us']:.0f} us/request "
              f"(CPU {r['runtime_cpu_us']:.0f} us)",
              file=sys.stderr if args.json else sys.stdout)  # fmt: skip
    by_clients = {r["clients"]: r for r in runs}
    goals = {}
    if 1 in by_clients:
        goals["p50_1_client_le_anchor"] = by_clients[1]["p50_ms"] <= ANCHOR["p50_ms_1"]
        goals["throughput_1_client_ge_anchor"] = (
            by_clients[1]["decisions_per_s"] >= ANCHOR["decisions_per_s_1"])  # fmt: skip
    if 8 in by_clients:
        goals["throughput_8_clients_ge_1.5x_anchor"] = (
            by_clients[8]["decisions_per_s"] >= 1.5 * ANCHOR["decisions_per_s_8"])  # fmt: skip
    result = {"payload": "224x224x3 uint8 image + 14 float32 + instruction", "runs": runs,
              "anchor_openpi": ANCHOR, "goals_met": goals}  # fmt: skip
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(goals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
