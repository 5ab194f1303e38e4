"""Hot reload under load: 32 robots, 50 version swaps, corrupt versions in between.

    python benchmarks/hot_reload.py --json
    python benchmarks/hot_reload.py --robots 4 --versions 5 --seconds 2 --json   # smoke

`agent serve --backend policy --model CKPT` serves 32 robots (one process,
one DEALER socket and one request in flight each, recorded PickPlace
observations: 224x224 image, state, instruction, menu). First a phase with
no new versions, then a phase in which a publisher puts 50 versions into
CKPT (`agent.student.checkpoint.publish`) and, in the middle, three corrupt ones
(a weights file that does not match its hash, tensors of the wrong shapes
with a matching hash, a truncated weights file with a matching hash).
Reports lost, failed and mismatched replies (goal: none), p50/p99 latency
with and without swaps (goal: p99 during swaps within 2x), the versions the
replies carried, and whether a corrupt version ever answered (goal: never).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.launch import free_port, last_json, serve_command, start, stop, wait_ready

ENV_ID = "tabletop/PickPlace-v0"


def drive(endpoint: str, robots: int, seconds: float, observations: Path) -> None:
    """The robots (their own process): keep one request per robot in flight, print JSON."""
    import zmq

    from agent import protocol as P
    from agent.messages import DecideRequest, DecisionReply, ErrorReply, Observation

    frames = np.load(observations, allow_pickle=False)
    menu = json.loads(str(frames["options"]))
    instruction = str(frames["instruction"])
    ctx = zmq.Context.instance()
    socks, poller = [], zmq.Poller()
    for _ in range(robots):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        poller.register(sock, zmq.POLLIN)
        socks.append(sock)
    index = {s: i for i, s in enumerate(socks)}
    steps, sent_at, pending = [0] * robots, [0.0] * robots, [0] * robots
    log: list[tuple[float, float, str]] = []  # (sent, latency ms, version)
    failed = mismatched = 0
    next_id = 1

    def send(i: int) -> None:
        nonlocal next_id
        t = steps[i] % len(frames["image"])
        obs = Observation(
            f"robot-{i}", f"ep-{i}-{steps[i] // 40}", steps[i] % 40, instruction,
            {"image": frames["image"][t]}, frames["state"][t], menu,
        )  # fmt: skip
        socks[i].send(P.encode(DecideRequest(next_id, obs)))
        pending[i], sent_at[i] = next_id, time.perf_counter()
        next_id += 1

    for i in range(robots):
        send(i)
    stop_at = time.perf_counter() + seconds
    in_flight = robots
    while in_flight:
        events = dict(poller.poll(10_000))
        if not events:
            break  # nothing for 10 s: what is still in flight is lost
        for sock in events:
            i = index[sock]
            reply = P.parse_reply(sock.recv())
            now = time.perf_counter()
            if isinstance(reply, ErrorReply):
                failed += 1
            elif not isinstance(reply, DecisionReply) or reply.request_id != pending[i]:
                mismatched += 1
            else:
                log.append((sent_at[i], 1e3 * (now - sent_at[i]), reply.model_version))
            steps[i] += 1
            if now < stop_at:
                send(i)
            else:
                in_flight -= 1
    print(
        json.dumps(
            {
                "replies": log,
                "failed": failed,
                "mismatched": mismatched,
                "lost": in_flight,
                "sent": next_id - 1,
            }
        ),
        flush=True,
    )


def observations_file(out: Path) -> Path:
    """A few recorded PickPlace observations (oracle, real server) as an .npz for the robots."""
    from agent.launch import run_robots, serving
    from agent.store import iter_episodes

    episodes = out / "episodes"
    with serving(ENV_ID, "--record", str(episodes)) as (endpoint, _):
        run_robots(endpoint, ENV_ID, 2, seed=0, robots=1)
    episode = next(iter_episodes(episodes))
    path = out / "observations.npz"
    np.savez(
        path,
        image=episode.images(),
        state=episode.states(),
        options=np.array(json.dumps(episode.column("options")[0])),
        instruction=np.array(episode.column("instruction")[0]),
    )
    return episodes


def corrupt(root: Path, model, kind: str) -> str:
    """A corrupt version, put into place the way `publish` would put a good one."""
    from safetensors.torch import load_file, save_file

    from agent import versions
    from agent.files import sha256
    from agent.student import checkpoint as ckpt

    staging = Path(tempfile.mkdtemp(dir=root.parent))
    for name in versions.version_names(root)[-1:]:
        shutil.copytree(root / name, staging / name)
    version = ckpt.publish(staging, model, step=0, watermark={}, metrics={"corrupt": kind})
    weights = version / ckpt.WEIGHTS
    if kind == "bad_hash":
        blob = bytearray(weights.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        weights.write_bytes(bytes(blob))
    else:
        if kind == "wrong_shapes":
            tensors = load_file(str(weights))
            name = next(k for k in sorted(tensors) if tensors[k].dim() == 2)
            tensors[name] = tensors[name][:, :-1].contiguous()
            save_file(tensors, str(weights))
        else:  # truncated
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        manifest = json.loads((version / versions.MANIFEST).read_text())
        manifest["files"][ckpt.WEIGHTS] = sha256(weights)
        (version / versions.MANIFEST).write_text(json.dumps(manifest))
    target = root / version.name
    os.replace(version, target)
    pointer = root / versions.TMP / "LATEST.corrupt"
    pointer.parent.mkdir(exist_ok=True)
    pointer.write_text(version.name + "\n")
    os.replace(pointer, root / versions.LATEST)
    shutil.rmtree(staging, ignore_errors=True)
    return version.name


def publisher(
    root: Path, model, versions: int, every_s: float, corrupt_at: int, done: dict
) -> None:
    import torch

    from agent.student import checkpoint as ckpt

    good, bad = [], []
    for i in range(versions):
        if i == corrupt_at:
            for kind in ("bad_hash", "wrong_shapes", "truncated"):
                bad.append(corrupt(root, model, kind))
                time.sleep(every_s)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 1e-3)
        good.append(ckpt.publish(root, model, step=i, watermark={}, metrics={}, keep=8).name)
        time.sleep(every_s)
    done.update(good=good, bad=bad)


def phase(endpoint: str, robots: int, seconds: float, obs: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--drive", endpoint, "--robots", str(robots), "--seconds", str(seconds), "--observations", str(obs)],
        capture_output=True, text=True, timeout=seconds + 120,
    )  # fmt: skip
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return last_json(proc.stdout)


def summary(result: dict) -> dict:
    lat = np.array([r[1] for r in result["replies"]])
    return {
        "replies": len(lat),
        "failed": result["failed"],
        "mismatched": result["mismatched"],
        "lost": result["lost"],
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "versions": sorted({r[2] for r in result["replies"]}),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--robots", type=int, default=32)
    parser.add_argument("--versions", type=int, default=50)
    parser.add_argument("--every-s", type=float, default=0.25, help="between publications")
    parser.add_argument(
        "--seconds", type=float, default=None, help="each phase (default: fits the swaps)"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--drive", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--observations", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.drive:
        drive(args.drive, args.robots, args.seconds, args.observations)
        return 0
    import torch

    from agent.store import iter_episodes
    from agent.student import checkpoint as ckpt
    from agent.student.features import fit_config
    from agent.student.modeling import Student

    torch.set_num_threads(1)
    seconds = args.seconds or (args.versions + 3) * args.every_s + 3
    with tempfile.TemporaryDirectory(prefix="hot-reload-") as work:
        work_path = Path(work)
        episodes = observations_file(work_path)
        obs = [s.observation for e in iter_episodes(episodes) for s in e.steps()]
        model = Student(fit_config(obs))
        root = work_path / "ckpt"
        ckpt.publish(root, model, step=0, watermark={}, metrics={})
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        log = (work_path / "serve.log").open("w")
        server = start(
            serve_command(
                ENV_ID,
                endpoint,
                "--backend",
                "policy",
                "--model",
                str(root),
                "--reload-every-s",
                "0.05",
            ),
            log=log,
        )
        try:
            wait_ready(endpoint, server)
            quiet = summary(phase(endpoint, args.robots, seconds, work_path / "observations.npz"))
            done: dict = {}
            thread = threading.Thread(
                target=publisher,
                args=(root, model, args.versions, args.every_s, args.versions // 2, done),
            )
            thread.start()
            swapping = summary(
                phase(endpoint, args.robots, seconds, work_path / "observations.npz")
            )
            thread.join()
            from agent.client import AgentClient

            with AgentClient(endpoint, timeout_ms=5000) as client:
                stats = client.stats()
        finally:
            stop(server)
            log.close()
    served_bad = sorted(set(swapping["versions"]) & set(done.get("bad", [])))
    result = {
        "robots": args.robots,
        "versions_published": len(done.get("good", [])),
        "corrupt_published": done.get("bad", []),
        "corrupt_served": served_bad,
        "without_swaps": {k: v for k, v in quiet.items() if k != "versions"},
        "with_swaps": {k: v for k, v in swapping.items() if k != "versions"},
        "versions_seen_in_replies": len(swapping["versions"]),
        "version_swaps": stats.get("version_swaps"),
        "versions_refused": stats.get("versions_refused"),
        "p99_ratio": (swapping["p99_ms"] / quiet["p99_ms"]) if quiet["p99_ms"] else None,
        "load_average": os.getloadavg(),
    }
    result["goals_met"] = bool(
        swapping["failed"] == swapping["lost"] == swapping["mismatched"] == 0
        and not served_bad
        and result["p99_ratio"] is not None
        and result["p99_ratio"] <= 2.0
    )
    print(
        f"without swaps: p50 {quiet['p50_ms']:.2f} ms, p99 {quiet['p99_ms']:.2f} ms · with "
        f"{result['version_swaps']} swaps: p50 {swapping['p50_ms']:.2f} ms, p99 {swapping['p99_ms']:.2f} ms "
        f"({result['p99_ratio']:.2f}x) · lost {swapping['lost']}, failed {swapping['failed']}, "
        f"mismatched {swapping['mismatched']} · corrupt versions refused {result['versions_refused']}, "
        f"served {served_bad or 'none'}"
    )
    if args.json:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
