"""Batching benchmark: cross-robot batching with a backend whose cost is mostly per call.

    python benchmarks/batching.py --robots 16 --seconds 3 --rounds 3 --json

A small torch MLP policy (one intra-op thread) serves 16 robots with
`--max-batch 1` and with `--max-batch 16`, alternating for a few rounds in one
run so both see the same machine load; the median speedup is reported. The
robots live in one separate process (one DEALER socket each, one request in
flight each, 64x64 image + 14-d state). Reports decisions/s of both, their
ratio (goal >= 4x), mean batch sizes, latency, and the model's measured cost
per call at batch 1 and 16.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.backends.base import Backend, EnvInfo
from agent.messages import Decision, Observation

IMAGE_SHAPE = (64, 64, 3)
STATE_DIM = 14
DEPTH = 32
WIDTH = 64
ENV = EnvInfo("bench/Batching-v0", action_shape=(4,))


class TinyTorchPolicy(Backend):
    """A deep, narrow MLP over a pooled camera image and the state.

    Like most small policies on a CPU (or any policy on a GPU), a call costs
    about the same for 1 or 16 observations: per-call overhead dominates.
    """

    name = "tiny-torch"

    def __init__(self, env: EnvInfo, model: str | None = None, **options) -> None:
        super().__init__(env, model)
        import torch
        from torch import nn

        torch.set_num_threads(1)
        torch.manual_seed(0)
        self.torch = torch
        layers: list[nn.Module] = [nn.Linear(3 * 8 * 8 + STATE_DIM, WIDTH), nn.ReLU()]
        for _ in range(DEPTH):
            layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
        self.pool = nn.AdaptiveAvgPool2d(8)  # 64x64 camera -> 8x8 summary
        self.mlp = nn.Sequential(*layers, nn.Linear(WIDTH, 4), nn.Tanh()).eval()

    def decide(self, batch: Sequence[Observation]) -> list[Decision]:
        torch = self.torch
        images = np.stack([obs.images["image"] for obs in batch])
        states = np.stack([obs.state for obs in batch])
        with torch.inference_mode():
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
            features = torch.cat([self.pool(x).flatten(1), torch.from_numpy(states)], dim=1)
            actions = self.mlp(features).numpy()
        return [Decision(action=a) for a in actions]

    def warmup(self) -> None:
        obs = Observation(
            "w",
            "w",
            0,
            images={"image": np.zeros(IMAGE_SHAPE, np.uint8)},
            state=np.zeros(STATE_DIM, np.float32),
        )
        for n in (1, 16):
            self.decide([obs] * n)


def call_cost_ms(backend: TinyTorchPolicy, batch_size: int, repeats: int = 50) -> float:
    obs = Observation(
        "c",
        "c",
        0,
        images={"image": np.zeros(IMAGE_SHAPE, np.uint8)},
        state=np.zeros(STATE_DIM, np.float32),
    )
    start = time.perf_counter()
    for _ in range(repeats):
        backend.decide([obs] * batch_size)
    return 1e3 * (time.perf_counter() - start) / repeats


def drive(endpoint: str, robots: int, seconds: float, warmup_s: float) -> None:
    """The robots (one process): keep one request per robot in flight; print JSON results."""
    import zmq

    from agent import protocol as P
    from agent.messages import DecideRequest, DecisionReply, Observation

    ctx = zmq.Context.instance()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, IMAGE_SHAPE, dtype=np.uint8)
    state = rng.standard_normal(STATE_DIM).astype(np.float32)
    socks = []
    poller = zmq.Poller()
    for _ in range(robots):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        poller.register(sock, zmq.POLLIN)
        socks.append(sock)
    index = {s: i for i, s in enumerate(socks)}
    sent_at, steps, latencies = [0.0] * robots, [0] * robots, []
    mismatched = 0

    def send(i: int) -> None:
        obs = Observation(f"robot-{i}", f"ep-{i}", steps[i], images={"image": image}, state=state)
        socks[i].send(P.encode(DecideRequest(steps[i] + 1, obs)))
        sent_at[i] = time.perf_counter()

    for i in range(robots):
        send(i)
    measure_from = time.perf_counter() + warmup_s
    stop_at = measure_from + seconds
    counted = 0
    in_flight = robots
    while in_flight:
        events = dict(poller.poll(10_000))
        if not events:
            raise SystemExit("no reply for 10 s")
        for sock in events:
            i = index[sock]
            reply = P.parse_reply(sock.recv())
            now = time.perf_counter()
            if not isinstance(reply, DecisionReply) or reply.step != steps[i]:
                mismatched += 1
            if measure_from <= now < stop_at:
                counted += 1
                latencies.append(1e3 * (now - sent_at[i]))
            steps[i] += 1
            if now < stop_at:
                send(i)
            else:
                in_flight -= 1
    lat = np.asarray(latencies)
    print(
        json.dumps(
            {
                "decisions": counted,
                "decisions_per_s": counted / seconds,
                "p50_ms": float(np.percentile(lat, 50)),
                "p99_ms": float(np.percentile(lat, 99)),
                "mismatched": mismatched,
            }
        )
    )


def run(max_batch: int, robots: int, seconds: float, timeout_ms: float) -> dict:
    from agent.serve import tune_allocator
    from agent.server import Server, ServerConfig

    tune_allocator()  # as `agent serve` does
    backend = TinyTorchPolicy(ENV)
    backend.warmup()
    server = Server(
        backend,
        ServerConfig(bind="tcp://127.0.0.1:0", max_batch=max_batch, batch_timeout_ms=timeout_ms),
    )
    endpoint = server.bind()
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--drive", endpoint, str(robots), str(seconds)],
            capture_output=True,
            text=True,
            timeout=seconds + 120,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"robots failed: {proc.stderr}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        stats = server.stats()
    finally:
        server.stop()
        thread.join(30)
    return {
        "max_batch": max_batch,
        **result,
        "mean_batch": stats["mean_batch"],
        "backend_ms_per_batch": stats["backend_ms_per_batch"],
        "runtime_cpu_us": stats["runtime_cpu_us"],
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--drive":
        drive(argv[1], int(argv[2]), float(argv[3]), warmup_s=1.0)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--robots", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0, help="per configuration and round")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds (median reported)"
    )
    parser.add_argument("--batch-timeout-ms", type=float, default=2.0)
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = parser.parse_args(argv)
    out = sys.stderr if args.json else sys.stdout

    probe = TinyTorchPolicy(ENV)
    probe.warmup()
    cost = {
        "batch_1_ms": call_cost_ms(probe, 1),
        f"batch_{args.robots}_ms": call_cost_ms(probe, args.robots),
    }
    rounds = []
    for k in range(args.rounds):  # alternate, so both see the same machine load
        single = run(1, args.robots, args.seconds, args.batch_timeout_ms)
        batched = run(args.robots, args.robots, args.seconds, args.batch_timeout_ms)
        speedup = batched["decisions_per_s"] / single["decisions_per_s"]
        rounds.append(
            {"max_batch_1": single, f"max_batch_{args.robots}": batched, "speedup": speedup}
        )
        for r in (single, batched):
            print(
                f"round {k + 1} max batch {r['max_batch']:2d}: {r['decisions_per_s']:7.0f} decisions/s, "
                f"mean batch {r['mean_batch']:5.2f}, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, "
                f"backend {r['backend_ms_per_batch']:.2f} ms/call, runtime CPU "
                f"{r['runtime_cpu_us']:.0f} us/request",
                file=out,
            )
    median = float(np.median([r["speedup"] for r in rounds]))
    with open("/proc/loadavg") as f:
        load = float(f.read().split()[0])
    each = ", ".join(f"{r['speedup']:.1f}x" for r in rounds)
    print(
        f"speedup {median:.1f}x median of {args.rounds} rounds ({each}; goal >= 4x); model call "
        f"{cost['batch_1_ms']:.2f} ms at batch 1, {cost[f'batch_{args.robots}_ms']:.2f} ms at batch "
        f"{args.robots}; load average {load}",
        file=out,
    )
    if args.json:
        print(
            json.dumps(
                {
                    "robots": args.robots,
                    "model_call_cost": cost,
                    "rounds": rounds,
                    "speedup_median": median,
                    "goal_met": median >= 4.0,
                    "load_average_after": load,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
