"""`make demo`: the whole product loop on a CPU laptop, no downloads.

1. Teach: `agent serve` with the scripted oracle records episodes of all four
   tabletop tasks from simulated robots.
2. Learn: `horovodrun -np 2 python -m trainer --follow` (ShadowSync) trains
   the student while episodes keep arriving and publishes versions.
3. Take over: the runtime serves the student (`--backend policy`),
   hot-reloading each new version; the oracle labels every step the student
   takes (DAgger) and acts where the student is unsure (escalation); the
   trainer learns from those labels.
4. Evaluate: the student alone on held-out seeds, next to the oracle on the
   same seeds, through the runtime.
5. Deploy: export to ONNX (parity gate) and run `examples/edge_robot.py` on
   the same seeds: no server, torch not importable.
6. Report: a table, out/demo/learning_curve.png, out/demo/contact_sheet.png,
   and one JSON object as the last line.

`--quick` runs the same stages with small numbers (tests). Ctrl-C or a
failing stage stops every process the demo started and says which stage
failed. Everything stays in out/demo/ (episodes, checkpoints, ONNX, logs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.launch import (  # noqa: E402
    last_json,
    run,
    run_robots,
    serving,
    start,
    stop,
    stop_all,
    trainer_command,
)

TASKS = ("tabletop/PickPlace-v0", "tabletop/Stack-v0", "tabletop/Sort-v0", "tabletop/Push-v0")
EVAL_SEED = 1_000_000
DAGGER_SEED = 500_000


@dataclass
class Settings:
    first_teach: int = 15  # oracle episodes per task before the trainer starts
    teach: int = 60  # oracle episodes per task in all
    dagger: int = 20  # student-acted, oracle-labelled episodes per task
    eval_seeds: int = 30  # held-out seeds per task
    train_minutes: float = 6.5  # the trainer's whole run
    escalate_below: float = 0.8
    robots: int = 1  # per task and stage (four tasks run side by side)


QUICK = Settings(first_teach=5, teach=10, dagger=2, eval_seeds=4, train_minutes=2.5)
QUICK_TASKS = ("tabletop/PickPlace-v0", "tabletop/Stack-v0")  # random choices never solve these


def random_success(tasks: tuple[str, ...], s: Settings) -> dict[str, Any]:
    """Success of random menu choices on the held-out seeds (in process, fast)."""
    import envs
    from envs.rollout import RandomChoice, run_episode

    rates = {}
    for env_id in tasks:
        env = envs.make_skill_env(env_id, images=False)
        runs = [run_episode(env, RandomChoice(k), EVAL_SEED + k) for k in range(s.eval_seeds)]
        rates[short(env_id)] = mean([float(bool(r.success)) for r in runs])
        env.close()
    return {**rates, "mean": mean(list(rates.values()))}


class Stage:
    """Prints a stage's start, its time and a one-line result; names it if it fails."""

    timings: ClassVar[dict[str, float]] = {}

    def __init__(self, number: int, name: str, what: str) -> None:
        self.name, self.what, self.number = name, what, number

    def __enter__(self) -> Stage:
        print(f"\n== {self.number}. {self.name}: {self.what}", flush=True)
        self.started = time.monotonic()
        return self

    def done(self, result: str) -> None:
        seconds = time.monotonic() - self.started
        Stage.timings[self.name] = seconds
        print(f"   {self.name}: {result} ({seconds:.0f} s)", flush=True)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            print(
                f"\n!! stage {self.number} ({self.name}) failed: {exc_type.__name__}: {exc}",
                flush=True,
            )


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def short(env_id: str) -> str:
    return env_id.split("/")[-1].removesuffix("-v0")


def per_task(fn, tasks: tuple[str, ...]) -> dict[str, Any]:
    """`fn(env_id)` for every task side by side (each is servers and robot processes).

    If one fails (or Ctrl-C), every process the demo started is stopped, so the
    others end at once instead of finishing their episodes.
    """
    pool = ThreadPoolExecutor(len(tasks))
    futures = [pool.submit(fn, env_id) for env_id in tasks]
    try:
        return {env_id: f.result() for env_id, f in zip(tasks, futures, strict=True)}
    except BaseException:
        stop_all()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class Servers:
    """A stage's servers, one per task: each logs to out/demo/logs/, one bar counts their episodes.

    The bar polls every server's `stats` (closed episodes) over the wire once a
    second; with a checkpoint it also shows the newest published version.
    """

    def __init__(self, logs: Path, total: int, ckpt: Path | None = None) -> None:
        self.logs, self.total, self.ckpt = logs, total, ckpt
        self.endpoints: dict[str, str] = {}
        self.episodes: dict[str, int] = {}
        self.lock = threading.Lock()
        self.finished = threading.Event()

    def __enter__(self) -> Servers:
        from tqdm import tqdm

        self.bar = tqdm(
            total=self.total, unit="episode", leave=False, file=sys.stdout, disable=None
        )
        self.thread = threading.Thread(target=self._watch, name="demo-progress", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.finished.set()
        self.thread.join(5)
        self.bar.close()

    @contextlib.contextmanager
    def serve(self, label: str, env_id: str, *args: str) -> Iterator[str]:
        key = f"{label}-{short(env_id)}"
        path = self.logs / f"{key}.log"
        try:
            with path.open("w") as log, serving(env_id, *args, log=log) as (endpoint, _):
                with self.lock:
                    self.endpoints[key] = endpoint
                try:
                    yield endpoint
                finally:
                    self._count(key, endpoint)
                    with self.lock:
                        del self.endpoints[key]
        except RuntimeError as exc:
            raise RuntimeError(f"{exc} (server log: {path})") from exc

    def _count(self, key: str, endpoint: str) -> None:
        from agent.client import AgentClient

        with contextlib.suppress(Exception), AgentClient(endpoint, timeout_ms=500) as client:
            closed = client.stats().get("closed_episodes", 0)
            with self.lock:
                self.episodes[key] = max(self.episodes.get(key, 0), int(closed))

    def _watch(self) -> None:
        from agent.versions import latest_name

        while not self.finished.wait(1.0):
            with self.lock:
                serving_now = list(self.endpoints.items())
            for key, endpoint in serving_now:
                self._count(key, endpoint)
            with self.lock:
                self.bar.n = min(self.total, sum(self.episodes.values()))
            if self.ckpt is not None:
                self.bar.set_postfix_str(f"newest version {latest_name(self.ckpt)}", refresh=False)
            self.bar.refresh()


def teach(
    servers: Servers, label: str, episodes: Path, tasks: tuple[str, ...], count: int, seed: int,
    robots: int,
) -> dict:  # fmt: skip
    def one(env_id: str) -> dict:
        record = str(episodes / f"oracle-{short(env_id)}")
        with servers.serve(label, env_id, "--record", record) as endpoint:
            return run_robots(endpoint, env_id, count, seed=seed, robots=robots)

    return per_task(one, tasks)


def take_over(
    servers: Servers, ckpt: Path, episodes: Path, tasks: tuple[str, ...], s: Settings
) -> dict:
    def one(env_id: str) -> dict:
        args = [
            "--backend", "policy", "--model", str(ckpt), "--teacher", "oracle",
            "--escalate-below", str(s.escalate_below), "--reload-every-s", "1",
            "--record", str(episodes / f"dagger-{short(env_id)}"),
        ]  # fmt: skip
        with servers.serve("take-over", env_id, *args) as endpoint:
            return run_robots(endpoint, env_id, s.dagger, seed=DAGGER_SEED, robots=s.robots)

    return per_task(one, tasks)


def evaluate(
    servers: Servers, label: str, backend: list[str], tasks: tuple[str, ...], s: Settings
) -> dict:
    def one(env_id: str) -> dict:
        with servers.serve(label, env_id, *backend) as endpoint:
            return run_robots(endpoint, env_id, s.eval_seeds, seed=EVAL_SEED, robots=s.robots)

    return per_task(one, tasks)


def edge(model: Path, tasks: tuple[str, ...], s: Settings) -> dict:
    """examples/edge_robot.py per task, in a Python where importing torch fails."""

    def one(env_id: str) -> dict:
        code = (
            "import runpy, sys\n"
            "sys.modules['torch'] = None\n"
            f"sys.argv = ['edge_robot.py', '--model', {str(model)!r}, '--env', {env_id!r},"
            f" '--episodes', '{s.eval_seeds}', '--seed', '{EVAL_SEED}', '--json']\n"
            f"runpy.run_path({str(ROOT / 'examples' / 'edge_robot.py')!r}, run_name='__main__')\n"
        )
        return run([sys.executable, "-c", code], timeout_s=1800, what=f"the edge robot on {env_id}")

    return per_task(one, tasks)


def wait_for(trainer: subprocess.Popen, ends: float, ckpt: Path) -> str:
    """The trainer's stdout once it ends, with a bar over what is left of its time budget."""
    from tqdm import tqdm

    from agent.versions import latest_name

    total = max(1, round(ends - time.monotonic()))
    with tqdm(total=total, unit="s", leave=False, file=sys.stdout, disable=None) as bar:
        while trainer.poll() is None and time.monotonic() < ends + 300:
            bar.n = min(total, total - round(ends - time.monotonic()))
            bar.set_postfix_str(f"training, newest version {latest_name(ckpt)}")
            time.sleep(1)
    return trainer.communicate(timeout=300)[0]


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def success_map(results: dict[str, dict]) -> dict[str, Any]:
    rates = {short(t): r["success_rate"] for t, r in results.items()}
    return {**rates, "mean": mean(list(rates.values()))}


def learning_curve(ckpt: Path, oracle: dict, student: dict, edge_success: dict, path: Path) -> None:
    """Held-out accuracy against steps and episodes seen; success per task of each policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trainer.metrics import plot_accuracy, save_figure

    records = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    plot_accuracy(left, records)
    twin = left.twinx()
    twin.plot(
        [r["step"] for r in train],
        [r["train_samples"] for r in train],
        color="tab:green",
        alpha=0.5,
    )
    twin.set_ylabel("training samples on rank 0 (episodes keep arriving)", color="tab:green")
    names = [k for k in oracle if k != "mean"]
    xs = range(len(names))
    for i, (label, values) in enumerate(
        (("oracle", oracle), ("student (runtime)", student), ("edge (ONNX)", edge_success))
    ):
        right.bar(
            [x + 0.27 * (i - 1) for x in xs], [values[n] for n in names], width=0.27, label=label
        )
    right.set_xticks(list(xs), names)
    right.set(ylabel="success on held-out seeds", ylim=(0, 1.05), title="closed loop, same seeds")
    right.legend(loc="lower right")
    save_figure(fig, path)


def contact_sheet(ckpt: Path, tasks: tuple[str, ...], path: Path) -> None:
    """One student episode per task, frame by frame with the skill it chose."""
    import envs
    from agent.student.inference import TorchStudent
    from envs.contact_sheet import render_sheet, write_png
    from envs.rollout import LocalPolicy, run_episode

    policy = LocalPolicy(TorchStudent.load(ckpt), "policy")
    logs = []
    for env_id in tasks:
        env = envs.make_skill_env(env_id)
        logs.append((env_id, run_episode(env, policy, EVAL_SEED, keep_frames=True)))
        env.close()
    write_png(render_sheet(logs, tile=128, max_cols=12), path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "demo")
    parser.add_argument("--quick", action="store_true", help="the same stages, small numbers")
    parser.add_argument("--tasks", default=",".join(TASKS))
    args = parser.parse_args(argv)
    s = QUICK if args.quick else Settings()
    tasks = (
        QUICK_TASKS
        if args.quick and args.tasks == ",".join(TASKS)
        else tuple(args.tasks.split(","))
    )
    out = args.out
    shutil.rmtree(out, ignore_errors=True)
    episodes, ckpt, logs = out / "episodes", out / "ckpt", out / "logs"
    logs.mkdir(parents=True)
    started = time.monotonic()
    trainer = None
    trainer_log = (logs / "trainer.log").open("w")
    signal.signal(signal.SIGTERM, _interrupt)  # like Ctrl-C: stop everything, say where
    try:
        with Stage(
            1, "teach", f"the oracle records {s.teach} episodes of each of {len(tasks)} tasks"
        ) as st:
            with Servers(logs, s.first_teach * len(tasks)) as servers:
                first = teach(servers, "teach", episodes, tasks, s.first_teach, 0, s.robots)
            print(
                f"   {s.first_teach} per task recorded; the trainer starts, the oracle keeps teaching"
                f" (server and trainer logs: {logs})",
                flush=True,
            )
            cmd = trainer_command(
                2, "--episodes", str(episodes), "--out", str(ckpt), "--follow", "--sync", "ma",
                "--max-minutes", str(s.train_minutes), "--publish-every-s", "20",
                "--min-episodes", str(s.first_teach * len(tasks)), "--json", "--quiet",
            )  # fmt: skip
            trainer = start(cmd, log=None, stdout=subprocess.PIPE, stderr=trainer_log, text=True)
            trainer_ends = time.monotonic() + 60 * s.train_minutes
            more = s.teach - s.first_teach
            with Servers(logs, more * len(tasks), ckpt) as servers:
                rest = teach(servers, "teach-more", episodes, tasks, more, s.first_teach, s.robots)
            recorded = sum(r["episodes"] for r in first.values()) + sum(
                r["episodes"] for r in rest.values()
            )
            oracle_teach = mean([r["success_rate"] for r in rest.values()])
            st.done(
                f"{recorded} oracle episodes recorded (success {oracle_teach:.2f}) into {episodes}"
            )

        with Stage(
            2, "learn", "horovodrun -np 2 python -m trainer --follow --sync ma (ShadowSync)"
        ) as st:
            from agent.versions import latest_name

            deadline = time.monotonic() + 60 * s.train_minutes + 120
            while latest_name(ckpt) is None:
                if trainer.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the trainer published nothing (log: {logs / 'trainer.log'})"
                    )
                time.sleep(1)
            st.done(
                f"first version {latest_name(ckpt)} published; training goes on in the background"
            )

        with Stage(
            3,
            "take over",
            "the runtime serves the student; the oracle labels and steps in when unsure",
        ) as st:
            with Servers(logs, s.dagger * len(tasks), ckpt) as servers:
                dagger = take_over(servers, ckpt, episodes, tasks, s)
            versions = sorted({v for r in dagger.values() for v in r["model_versions"]})
            decisions = sum(r["decisions"] for r in dagger.values())
            escalated = sum(r["escalation_rate"] * r["decisions"] for r in dagger.values())
            print(
                f"   served versions {versions}; the trainer goes on to its time budget", flush=True
            )
            summary = last_json(wait_for(trainer, trainer_ends, ckpt))
            if trainer.returncode != 0:
                raise RuntimeError(f"the trainer failed (log: {logs / 'trainer.log'})")
            trainer = None
            st.done(
                f"{sum(r['episodes'] for r in dagger.values())} student episodes labelled by the oracle, "
                f"{escalated / max(1, decisions):.1%} of decisions escalated; trainer: {summary['steps']} steps, "
                f"{summary['samples_per_s']:.0f} samples/s, {summary['versions_published']} versions, "
                f"{summary['sync_stats']['rounds']} ShadowSync rounds"
            )

        with Stage(
            4,
            "evaluate",
            f"student alone vs oracle on the same {s.eval_seeds} held-out seeds per task",
        ) as st:
            with Servers(logs, 2 * s.eval_seeds * len(tasks)) as servers:
                policy = ["--backend", "policy", "--model", str(ckpt)]
                student = evaluate(servers, "evaluate-student", policy, tasks, s)
                oracle = evaluate(servers, "evaluate-oracle", ["--backend", "oracle"], tasks, s)
            chance = random_success(tasks, s)
            st.done(
                f"student {success_map(student)['mean']:.3f}, oracle {success_map(oracle)['mean']:.3f}, "
                f"random menu choices {chance['mean']:.3f} mean success"
            )

        with Stage(
            5, "deploy", "export to ONNX (parity gate), then the edge robot: no server, no torch"
        ) as st:
            model = out / "policy.onnx"
            report = run(
                [sys.executable, "-m", "export", "--checkpoint", str(ckpt), "--out", str(model),
                 "--episodes", str(episodes), "--json"],
                timeout_s=600, what="the export",
            )  # fmt: skip
            edge_runs = edge(model, tasks, s)
            st.done(
                f"{model} (max score difference {report['parity']['max_abs_diff']:.1e}); "
                f"edge success {success_map(edge_runs)['mean']:.3f}"
            )

        with Stage(6, "report", "table, learning curve, contact sheet") as st:
            result = report_all(
                out, ckpt, tasks, oracle, student, edge_runs, dagger, summary, recorded, started
            )
            result["random_success"] = chance
            st.done(f"{out / 'learning_curve.png'}, {out / 'contact_sheet.png'}")
    except (Exception, KeyboardInterrupt) as exc:
        stop_all()
        if isinstance(exc, KeyboardInterrupt):
            print("\n!! interrupted; every process the demo started is stopped", flush=True)
        else:
            print(f"!! {type(exc).__name__}: {exc}", flush=True)
        return 1
    finally:
        if trainer is not None:
            stop(trainer, signal.SIGTERM, timeout_s=30)
        trainer_log.close()
    print_commands(out)
    print(json.dumps(result), flush=True)
    return 0


def report_all(
    out, ckpt, tasks, oracle, student, edge_runs, dagger, summary, recorded, started
) -> dict:
    from agent.versions import latest_name

    o, st, e = success_map(oracle), success_map(student), success_map(edge_runs)
    esc = {short(t): r["escalation_rate"] for t, r in dagger.items()}
    torch_ms = mean([r["p50_ms"] for r in student.values()])
    edge_ms = mean([r["p50_ms"] for r in edge_runs.values()])
    print(
        f"\n{'task':<10} {'oracle':>7} {'student':>8} {'edge':>6} {'decisions':>10} {'escalated':>10}"
    )
    for t in tasks:
        n = short(t)
        print(
            f"{n:<10} {o[n]:>7.2f} {st[n]:>8.2f} {e[n]:>6.2f} {student[t]['decisions']:>10} {esc[n]:>10.1%}"
        )
    print(f"{'mean':<10} {o['mean']:>7.2f} {st['mean']:>8.2f} {e['mean']:>6.2f}")
    served = sorted({v for r in dagger.values() for v in r["model_versions"]})
    print(
        f"versions published {summary['versions_published']} (latest {latest_name(ckpt)}), "
        f"{len(served)} served while the student took over, "
        f"ShadowSync rounds {summary['sync_stats']['rounds']}, "
        f"student decision p50 through the runtime {torch_ms:.2f} ms, on the edge (ONNX, in process) {edge_ms:.2f} ms"
    )
    print("stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in Stage.timings.items()))
    learning_curve(ckpt, o, st, e, out / "learning_curve.png")
    contact_sheet(ckpt, tasks, out / "contact_sheet.png")
    decisions = sum(r["decisions"] for r in dagger.values())
    return {
        "oracle_success": o,
        "student_success": st,
        "edge_success": e,
        "student_vs_oracle": st["mean"] / o["mean"] if o["mean"] else None,
        "episodes_recorded": recorded + sum(r["episodes"] for r in dagger.values()),
        "versions_published": summary["versions_published"],
        "versions_served": served,
        "escalation_rate": sum(r["escalation_rate"] * r["decisions"] for r in dagger.values())
        / max(1, decisions),
        "shadowsync_rounds": summary["sync_stats"]["rounds"],
        "student_p50_ms": {"runtime_torch": torch_ms, "edge_onnx": edge_ms},
        "stage_seconds": dict(Stage.timings),
        "seconds": time.monotonic() - started,
    }


def print_commands(out: Path) -> None:
    print(
        f"\nEverything is in {out}. Next:\n"
        f"  .venv/bin/agent serve --env tabletop/Sort-v0 --backend policy --model {out / 'ckpt'}\n"
        f"  .venv/bin/python examples/robot_loop.py --env tabletop/Sort-v0 --episodes 10 --json\n"
        f"  .venv/bin/python -m export --checkpoint {out / 'ckpt'} --out {out / 'policy.onnx'} "
        f"--episodes {out / 'episodes'} --int8 --calibrate {out / 'episodes'}\n"
        f"  .venv/bin/python examples/edge_robot.py --model {out / 'policy.onnx'} --env tabletop/Stack-v0 --episodes 10\n"
        f"  .venv/bin/tensorboard --logdir {out / 'ckpt' / 'tensorboard'}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
