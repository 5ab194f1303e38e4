"""Reproduce ShadowSync's claims on a DLRM-like click-through-rate model.

    python benchmarks/shadowsync_ctr.py --quick --json      # CI-sized, < 3 min on 2 cores
    python benchmarks/shadowsync_ctr.py                     # full table + plots
    python benchmarks/shadowsync_ctr.py --netem             # trainers behind a 100 Mbit/s link

Launches its own `horovodrun` jobs (one per trainer count; every algorithm
runs in sequence inside it, repeated with rotated order) and reports, per
algorithm and trainer count: examples/s (EPS, best of the repeats: a shared
machine only ever slows a run down), normalised entropy on held-out data
(NE, mean of the repeats), and the sync gap. Plots EPS vs trainers and NE vs
time to PNG. `--netem` runs the trainers inside a fresh Linux network
namespace whose loopback is capped with a tbf qdisc, and removes it afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("shadowsync_ctr_worker.py")
ALGOS = ["none", "s-ma", "s-easgd", "s-bmuf", "fr-ma", "fr-easgd", "fr-bmuf", "sync-sgd"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- the emulated network ----------------------------------------------------


@contextlib.contextmanager
def network_namespace(rate: str) -> Iterator[list[str]]:
    """A namespace whose loopback is capped at `rate`; yields the command prefix to run in it."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"--netem needs {' and '.join(missing)} (apt-get install iproute2)")
    if os.geteuid() != 0:
        raise SystemExit("--netem needs root to create a network namespace")
    name = f"shadowsync{os.getpid()}"
    run = ["ip", "netns", "exec", name]
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        # tbf needs a real MTU on lo (the kernel here has no netem qdisc).
        subprocess.run(
            [*run, "ip", "link", "set", "lo", "mtu", "1500", "up"], check=True, timeout=30
        )
        subprocess.run(
            [
                *run,
                "tc",
                "qdisc",
                "add",
                "dev",
                "lo",
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "64kb",
                "latency",
                "50ms",
            ],
            check=True,
            timeout=30,
        )
        yield run
    finally:
        subprocess.run(["ip", "netns", "del", name], timeout=30, check=False)


# ---- launching and collecting ------------------------------------------------


def plan(algos: list[str], repeats: int) -> list[str]:
    """Every algorithm `repeats` times, rotated so no algorithm always runs first."""
    return [algos[(i + r) % len(algos)] for r in range(repeats) for i in range(len(algos))]


def launch(trainers: int, sequence: list[str], args, prefix: list[str]) -> list[dict]:
    """One horovodrun job; returns each rank's record."""
    out = Path(tempfile.mkdtemp(prefix="shadowsync_ctr_"))
    launcher = Path(sys.executable).with_name("horovodrun")
    cmd = [
        *prefix,
        str(launcher),
        "-np",
        str(trainers),
        "-H",
        f"localhost:{trainers}",
        "--gloo",
        sys.executable,
        str(WORKER),
        "--algos",
        ",".join(sequence),
        "--examples",
        str(args.examples),
        "--held-out",
        str(args.held_out),
        "--budget-s",
        str(args.budget_s),
        "--interval",
        str(args.interval),
        "--every",
        str(args.every),
        "--workers",
        str(args.workers),
        "--lr",
        str(args.lr),
        "--out",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired as exc:
        msg = f"horovodrun with {trainers} trainers timed out after {args.timeout}s"
        raise SystemExit(msg) from exc
    finally:  # also on Ctrl-C or SIGTERM: no trainers left running (in a deleted namespace)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"horovodrun with {trainers} trainers failed:\n{output[-4000:]}")
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(trainers)]
    shutil.rmtree(out, ignore_errors=True)
    return records


def rows_for(trainers: int, records: list[dict], netem: bool) -> tuple[list[dict], dict]:
    """Aggregate ranks and repeats into one row per algorithm; also rank 0's NE curves."""
    runs: dict[str, list[dict]] = {}
    curves: dict[str, list] = {}
    for i, rank0 in enumerate(records[0]["runs"]):
        ranks = [rec["runs"][i] for rec in records]
        gaps = [r["stats"]["sync_gap"] for r in ranks if r["stats"] and r["stats"]["sync_gap"]]
        runs.setdefault(rank0["algo"], []).append(
            {
                "eps": sum(r["examples"] for r in ranks) / max(r["seconds"] for r in ranks),
                "ne": rank0["ne"],
                "sync_gap": statistics.fmean(gaps) if gaps else None,
                "comm_s": statistics.fmean(r["stats"].get("comm_seconds", 0.0) for r in ranks)
                if rank0["stats"]
                else 0.0,
                "seconds": max(r["seconds"] for r in ranks),
            }
        )
        curves.setdefault(rank0["algo"], rank0["curve"])
    rows = []
    for algo, reps in runs.items():
        gaps = [r["sync_gap"] for r in reps if r["sync_gap"] is not None]
        rows.append(
            {
                "algo": algo,
                "trainers": trainers,
                "eps": round(max(r["eps"] for r in reps), 1),
                "ne": round(statistics.fmean(r["ne"] for r in reps), 5),
                "sync_gap": round(statistics.fmean(gaps), 2) if gaps else None,
                "comm_s": round(statistics.fmean(r["comm_s"] for r in reps), 3),
                "seconds": round(statistics.fmean(r["seconds"] for r in reps), 3),
                "repeats": len(reps),
                "netem": netem,
            }
        )
    by_algo = {r["algo"]: r for r in rows}
    for row in rows:
        if "none" in by_algo:
            row["eps_vs_none"] = round(row["eps"] / by_algo["none"]["eps"], 3)
        if "sync-sgd" in by_algo:
            row["ne_vs_sync_sgd"] = round(row["ne"] / by_algo["sync-sgd"]["ne"] - 1, 4)
    return rows, curves


# ---- reporting -----------------------------------------------------------------


def plot(rows: list[dict], curves: dict[str, list], out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for algo in ALGOS:
        pts = sorted((r["trainers"], r["eps"]) for r in rows if r["algo"] == algo)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=algo)
    ax.set(xlabel="trainers", ylabel="examples / s", title=f"EPS vs trainers{title}")
    ax.legend(fontsize=7)
    eps_png = save_png(fig, out / "eps_vs_trainers.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    for algo, curve in curves.items():
        if curve:
            ax.plot(*zip(*curve, strict=True), label=algo)
    ax.set(xlabel="seconds", ylabel="NE (held-out, lower is better)", title=f"NE vs time{title}")
    ax.legend(fontsize=7)
    ne_png = save_png(fig, out / "ne_vs_time.png")
    return [eps_png, ne_png]


def save_png(fig, path: Path) -> Path:
    """Write the figure atomically (a reader never sees half a PNG) and close it."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def table(rows: list[dict]) -> str:
    head = (
        f"{'algo':<9} {'trainers':>8} {'EPS':>9} {'vs none':>8} {'NE':>8} {'vs sync':>8} {'gap':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        gap = "-" if r["sync_gap"] is None else f"{r['sync_gap']:.1f}"
        vs_none = f"{r['eps_vs_none']:.2f}" if "eps_vs_none" in r else "-"
        vs_sync = f"{r['ne_vs_sync_sgd']:+.2%}" if "ne_vs_sync_sgd" in r else "-"
        lines.append(
            f"{r['algo']:<9} {r['trainers']:>8} {r['eps']:>9.0f} {vs_none:>8} "
            f"{r['ne']:>8.4f} {vs_sync:>8} {gap:>7}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI-sized run (< 3 min on 2 cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object per row")
    p.add_argument("--netem", action="store_true", help="cap the trainers' network (tbf)")
    p.add_argument("--rate", default="100mbit", help="--netem bandwidth cap")
    p.add_argument("--algos", default=",".join(ALGOS), help="comma-separated subset to run")
    p.add_argument("--trainers", help="comma-separated trainer counts (default 1,2,4; quick 1,2)")
    p.add_argument("--examples", type=int, help="examples per trainer")
    p.add_argument("--held-out", type=int, help="held-out examples for NE")
    p.add_argument("--repeats", type=int, help="runs of every algorithm per trainer count")
    p.add_argument("--budget-s", type=float, help="time cap per run (default: none; netem 10)")
    p.add_argument(
        "--interval", type=float, default=0.1, help="S-* least seconds per round (0: back to back)"
    )
    p.add_argument("--every", type=int, default=20, help="FR-* sync period in iterations")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="Hogwild threads per trainer for none and S-* (FR-* and sync-sgd step on one thread)",
    )
    p.add_argument("--lr", type=float, default=1.0, help="SGD learning rate per trainer")
    p.add_argument("--timeout", type=float, default=900, help="seconds per horovodrun job")
    p.add_argument("--out", type=Path, default=ROOT / "out" / "shadowsync_ctr")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "trainers": "1,2" if quick else "1,2,4",
        "examples": 100_000 if quick else 300_000,
        "held_out": 20_000 if quick else 50_000,
        "repeats": 1 if quick else 2,
        "budget_s": (4.0 if quick else 10.0) if args.netem else 0.0,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.trainer_counts = sorted({int(t) for t in str(args.trainers).split(",")})
    args.algo_list = [a for a in ALGOS if a in args.algos.split(",")]
    unknown = set(args.algos.split(",")) - set(ALGOS)
    if unknown or not args.algo_list:
        p.error(f"unknown algorithms {sorted(unknown)}; choose from {', '.join(ALGOS)}")
    if min(args.trainer_counts) < 1 or args.examples < 1 or args.repeats < 1:
        p.error("trainers, examples and repeats must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the trainers are killed and the namespace removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    rows: list[dict] = []
    curves: dict[str, list] = {}
    with contextlib.ExitStack() as stack:
        prefix = stack.enter_context(network_namespace(args.rate)) if args.netem else []
        for trainers in args.trainer_counts:
            # One trainer has nothing to synchronise: only the no-sync baseline runs.
            algos = args.algo_list if trainers > 1 else ["none"]
            log(
                f"[shadowsync_ctr] {trainers} trainer(s): {len(algos)} algorithm(s) "
                f"x {args.repeats}{' (netem ' + args.rate + ')' if args.netem else ''}"
            )
            records = launch(trainers, plan(algos, args.repeats), args, prefix)
            new_rows, new_curves = rows_for(trainers, records, args.netem)
            rows += new_rows
            if trainers == max(args.trainer_counts) or not curves:
                curves = new_curves
    rows.sort(key=lambda r: (r["trainers"], ALGOS.index(r["algo"])))
    title = f" ({args.rate} netem)" if args.netem else ""
    pngs = plot(rows, curves, args.out, title)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(table(rows))
    log(f"[shadowsync_ctr] plots: {', '.join(str(p) for p in pngs)}")


if __name__ == "__main__":
    main()
