"""Cosmos-Reason post-training benchmark: before / after SFT / after GRPO, closed loop, on a CPU.

    python benchmarks/cosmos_posttrain.py --json            # the full run (about 75 minutes on 2 cores)
    python benchmarks/cosmos_posttrain.py --quick --json    # a smoke run (tests)
    python benchmarks/cosmos_posttrain.py --json --resume   # reuse the runs an interrupted one finished

1. Record: `agent serve` with the oracle records episodes of every tabletop
   task (seeds 0..N-1) and, for decision accuracy, held-out oracle episodes on
   the evaluation seeds (from 1,000,000), whose success is the oracle's.
2. SFT: `horovodrun -np 2 python -m trainer.cosmos sft` (ShadowSync) on the
   tiny Qwen2.5-VL look-alike built from the episodes' words, for
   --sft-minutes, publishing a version about every minute. Beside it, at the
   same settings: a text-only model (`--no-image`, the blind baseline), an
   answer-only model (`--no-think`, what the rationale costs) and one rank
   alone for --one-rank-minutes (against the 2-rank version published closest
   to the same wall time).
3. GRPO: `python -m trainer.cosmos grpo` under `horovodrun -np 2` from the SFT
   version published closest to --early-minutes (an SFT stopped early) and
   from the last SFT version (no regression expected).
4. Evaluate: held-out decision accuracy per task (greedy, in process) with the
   history line, without it (only the camera can tell the stage) and with the
   image zeroed (the blind baseline on the same model); parse and format
   rates; closed-loop success per task through `agent serve --backend cosmos
   --model CKPT` on the held-out seeds next to the oracle and random menu
   choices on the same seeds; decision latency through the runtime with 8
   robots batched; seconds and samples/s per stage; curves as PNG.

Prints a table per part and, with --json, one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.launch import run, run_robots, serving, trainer_command

TASKS = ("tabletop/PickPlace-v0", "tabletop/Stack-v0", "tabletop/Sort-v0", "tabletop/Push-v0")
EVAL_SEED = 1_000_000
GREEDY = ("--backend-opt", "temperature=0", "--backend-opt", "max_new_tokens=64")


def note(message: str) -> None:
    print(f"[cosmos_posttrain] {message}", file=sys.stderr, flush=True)


def short(env_id: str) -> str:
    return env_id.split("/")[-1].removesuffix("-v0")


def record(out: Path, tasks: tuple[str, ...], episodes: int, seed: int, robots: int) -> dict:
    """Oracle episodes of every task through the runtime into out/<task>/; success per task."""
    success = {}
    for env_id in tasks:
        target = out / env_id.split("/")[-1]
        if target.is_dir() and len(list(target.glob("*.parquet"))) >= episodes:
            from agent.store import iter_episodes  # recorded by an earlier run: as it ended

            success[env_id] = float(np.mean([bool(e.success) for e in iter_episodes(target)]))
            continue
        shutil.rmtree(target, ignore_errors=True)
        with serving(env_id, "--record", str(target)) as (endpoint, _):
            summary = run_robots(endpoint, env_id, episodes, seed=seed, robots=robots)
        success[env_id] = summary["success_rate"]
        note(f"recorded {episodes} oracle episodes of {env_id} from seed {seed}")
    return success


def train(
    algorithm: str, ranks: int, data: Path, out: Path, minutes: float, *extra: str, resume: bool
) -> dict:
    """One trainer run into `out`; its summary is kept beside it (out.json) so that --resume
    reuses a run an interrupted benchmark finished."""
    done = out.with_suffix(".json")
    if resume and done.is_file() and (out / "LATEST").is_file():
        note(f"{algorithm} {out.name}: reusing the finished run ({done})")
        return json.loads(done.read_text())
    done.unlink(missing_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    cmd = trainer_command(
        ranks, algorithm, "--episodes", str(data), "--out", str(out),
        "--max-minutes", str(minutes), "--keep", "1000", "--json", "--quiet", *extra,
        module="trainer.cosmos",
    )  # fmt: skip
    started = time.monotonic()
    summary = run(cmd, timeout_s=60 * minutes + 900, what=f"trainer.cosmos {algorithm}")
    summary["wall_s"] = time.monotonic() - started
    done.write_text(json.dumps(summary))
    note(
        f"{algorithm} ({ranks} rank(s)) {out.name}: {summary['steps']} steps, "
        f"{summary['samples_per_s']:.1f} samples/s, {summary['versions_published']} versions"
    )
    return summary


def timeline(ckpt: Path) -> list[dict]:
    """Every published version: its name, step, seconds since the run's start, held-out result."""
    from agent import versions

    records = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    start = records[0]["time"]
    out = []
    for name in versions.version_names(ckpt):
        manifest = json.loads((ckpt / name / "manifest.json").read_text())
        out.append(
            {
                "version": name,
                "step": manifest["step"],
                "seconds": manifest["created_at"] - start,
                "accuracy": (manifest["metrics"].get("validation") or {}).get("accuracy"),
            }
        )
    return out


def closest(ckpt: Path, seconds: float) -> Path:
    """The version published closest to `seconds` after the run started."""
    versions_ = timeline(ckpt)
    return ckpt / min(versions_, key=lambda v: abs(v["seconds"] - seconds))["version"]


# --------------------------------------------------------------------------- evaluation


def held_out(data: Path, style: str, camera: str | None):
    from agent.store import iter_episodes
    from trainer.cosmos.data import Examples

    examples = Examples(style, camera)  # type: ignore[arg-type]
    examples.add_all(iter_episodes(data))
    return examples.items


def accuracy(model_path: Path | None, examples: list, blind_of: Any = None) -> dict[str, Any]:
    """Held-out decision accuracy (with history, without, image zeroed) of a version, or of a
    random tiny look-alike when model_path is None ("before")."""
    import dataclasses

    from agent.cosmos import checkpoint
    from trainer.cosmos.evaluate import evaluate

    if model_path is None:
        cosmos = blind_of
    else:
        cosmos, _ = checkpoint.load(model_path)
    plain = evaluate(cosmos, examples)
    no_history = evaluate(cosmos, [e.without_history() for e in examples])
    row: dict[str, Any] = {"with_history": plain.as_dict(), "camera_only": no_history.as_dict()}
    if examples and examples[0].image is not None:
        zeroed = [dataclasses.replace(e, image=np.zeros_like(e.image)) for e in examples]
        row["image_zeroed"] = evaluate(cosmos, zeroed).as_dict()
        row["camera_only_image_zeroed"] = evaluate(
            cosmos, [e.without_history() for e in zeroed]
        ).as_dict()
    return row


def closed_loop(model: Path, tasks: tuple[str, ...], seeds: int, robots: int) -> dict:
    per_task = {}
    for env_id in tasks:
        args = ("--backend", "cosmos", "--model", str(model), *GREEDY)
        with serving(env_id, *args) as (endpoint, _):
            s = run_robots(endpoint, env_id, seeds, seed=EVAL_SEED, robots=robots)
        per_task[env_id] = {
            "success": s["success_rate"],
            "p50_ms": s["p50_ms"],
            "decisions": s["decisions"],
            "failed_seeds": s["failed_seeds"][:20],
        }
        note(f"{model.parent.name}/{model.name} on {short(env_id)}: {s['success_rate']:.2f}")
    return per_task


def random_success(tasks: tuple[str, ...], seeds: int) -> dict[str, float]:
    import envs
    from envs.rollout import RandomChoice, run_episode

    rates = {}
    for env_id in tasks:
        env = envs.make_skill_env(env_id, images=False)
        runs = [run_episode(env, RandomChoice(k), EVAL_SEED + k) for k in range(seeds)]
        rates[env_id] = float(np.mean([bool(r.success) for r in runs]))
        env.close()
    return rates


def latency(model: Path, robots: int, episodes: int) -> dict:
    env_id = TASKS[0]
    with serving(env_id, "--backend", "cosmos", "--model", str(model), *GREEDY) as (endpoint, _):
        s = run_robots(endpoint, env_id, episodes, seed=EVAL_SEED, robots=robots)
    return {
        "robots": robots,
        "p50_ms": s["p50_ms"],
        "p99_ms": s["p99_ms"],
        "decisions_per_s": s["decisions_per_s"],
    }


def plot(curves: dict[str, Path], path: Path) -> None:
    """Held-out accuracy over wall time of each run, and GRPO's mean reward over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trainer.metrics import save_figure

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for label, ckpt in curves.items():
        records = [json.loads(x) for x in (ckpt / "metrics.jsonl").read_text().splitlines()]
        start = records[0]["time"]
        val = [r for r in records if r.get("validation_accuracy") is not None]
        left.plot(
            [(r["time"] - start) / 60 for r in val],
            [r["validation_accuracy"] for r in val],
            "o-",
            label=label,
        )
        rewards = [r for r in records if "reward" in r]
        if rewards:
            right.plot([r["step"] for r in rewards], [r["reward"] for r in rewards], label=label)
    left.set(xlabel="minutes", ylabel="held-out decision accuracy", ylim=(0, 1.02))
    left.legend(fontsize=7, loc="lower right")
    right.set(xlabel="GRPO step", ylabel="mean reward (accuracy + format, max 2)", ylim=(0, 2.05))
    right.legend(fontsize=7, loc="lower right")
    save_figure(fig, path)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=200, help="oracle training episodes per task")
    p.add_argument("--eval-seeds", type=int, default=20, help="held-out seeds per task")
    p.add_argument("--sft-minutes", type=float, default=10)
    p.add_argument(
        "--early-minutes", type=float, default=2.0, help="the early SFT GRPO starts from"
    )
    p.add_argument("--grpo-minutes", type=float, default=10)
    p.add_argument("--grpo-converged-minutes", type=float, default=4)
    p.add_argument(
        "--baseline-minutes",
        type=float,
        default=None,
        help="text-only and answer-only runs (default: --sft-minutes)",
    )
    p.add_argument("--one-rank-minutes", type=float, default=5)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--robots", type=int, default=2)
    p.add_argument("--trainer-opt", action="append", default=[], help="extra trainer argument")
    p.add_argument("--out", type=Path, default=Path("runs/cosmos_posttrain"))
    p.add_argument("--quick", action="store_true", help="a smoke run: one task, tiny sizes")
    p.add_argument(
        "--resume", action="store_true", help="reuse the runs an interrupted benchmark finished"
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    tasks = tuple(args.tasks.split(","))
    extra = list(args.trainer_opt)
    sft_extra, grpo_extra = (
        ["--drop-history", "0.25"],
        ["--batch-size", "8", "--lr", "2e-4", "--shuffle", "0"],
    )
    if args.quick:
        tasks = (TASKS[0],)
        args.episodes, args.eval_seeds, args.robots = 6, 2, 2
        args.sft_minutes, args.early_minutes, args.grpo_minutes = 0.5, 0.25, 0.25
        args.grpo_converged_minutes = args.baseline_minutes = args.one_rank_minutes = 0
        extra += ["--validation-limit", "16", "--max-new-tokens", "48"]
        sft_extra += ["--tiny-size", "64x2x32", "--batch-size", "8", "--lr", "3e-3"]
    baseline = args.sft_minutes if args.baseline_minutes is None else args.baseline_minutes
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    publish = ["--publish-every-s", "10" if args.quick else "60", "--sync-interval-s", "1"]
    result: dict[str, Any] = {"benchmark": "cosmos_posttrain", "tasks": list(tasks)}
    started = time.monotonic()

    # 1. data
    t0 = time.monotonic()
    record(out / "episodes", tasks, args.episodes, 0, args.robots)
    oracle = record(out / "held_out", tasks, args.eval_seeds, EVAL_SEED, args.robots)
    result["record_s"] = time.monotonic() - t0
    result["oracle_success"] = oracle
    result["random_success"] = random_success(tasks, args.eval_seeds)

    # 2. SFT, and the baselines beside it
    sft = out / "sft"
    fit = functools.partial(train, resume=args.resume)
    sft_args = [*publish, *extra, *sft_extra]
    runs: dict[str, Any] = {
        "sft": fit("sft", 2, out / "episodes", sft, args.sft_minutes, *sft_args)
    }
    if baseline:
        runs["text_only"] = fit("sft", 2, out / "episodes", out / "text_only", baseline,
                                  "--no-image", *sft_args)  # fmt: skip
        runs["answer_only"] = fit("sft", 2, out / "episodes", out / "answer_only", baseline,
                                    "--no-think", *sft_args)  # fmt: skip
    if args.one_rank_minutes:
        runs["one_rank"] = fit("sft", 1, out / "episodes", out / "one_rank",
                                 args.one_rank_minutes, *sft_args)  # fmt: skip
    early = closest(sft, 60 * args.early_minutes)

    # 3. GRPO from an early SFT version and from the last one
    grpo_args = [*publish, *extra, *grpo_extra]
    runs["grpo_early"] = fit("grpo", 2, out / "episodes", out / "grpo_early", args.grpo_minutes,
                               "--init", str(early), *grpo_args)  # fmt: skip
    if args.grpo_converged_minutes:
        runs["grpo_converged"] = fit(
            "grpo", 2, out / "episodes", out / "grpo_converged", args.grpo_converged_minutes,
            "--init", str(sft), *grpo_args,
        )  # fmt: skip
    result["runs"] = runs
    result["timelines"] = {name: timeline(out / name) for name in runs}
    result["early_version"] = f"{early.parent.name}/{early.name}"

    # 4. evaluation
    from agent.cosmos.inference import CosmosModel
    from agent.cosmos.reasoning import PromptSpec
    from agent.cosmos.tiny import TinySize, build_tiny_vlm
    from agent.store import iter_episodes
    from trainer.cosmos.train import texts_of

    examples = held_out(out / "held_out", "reason1", "image")
    models = {
        "sft_early": early,
        "sft": sft,
        "grpo_early": out / "grpo_early",
        **({"grpo_converged": out / "grpo_converged"} if "grpo_converged" in runs else {}),
        **({"answer_only": out / "answer_only"} if "answer_only" in runs else {}),
    }
    if "one_rank" in runs:
        models["one_rank"] = out / "one_rank"
        models["two_ranks_same_time"] = closest(sft, runs["one_rank"]["seconds"])
    model, processor = build_tiny_vlm(
        "qwen2_5_vl", texts_of(list(iter_episodes(out / "episodes"))), TinySize()
    )
    before = CosmosModel(model, processor, PromptSpec("reason1"))
    result["accuracy"] = {"before": accuracy(None, examples, blind_of=before)}
    for name, path in models.items():
        result["accuracy"][name] = accuracy(path, examples)
        note(
            f"held-out accuracy of {name}: {result['accuracy'][name]['with_history']['accuracy']:.3f}"
        )
    if "text_only" in runs:
        result["accuracy"]["text_only"] = accuracy(
            out / "text_only", held_out(out / "held_out", "reason1", None)
        )
    loop_models = {"sft": sft, "grpo_early": out / "grpo_early", "sft_early": early}
    if "text_only" in runs:
        loop_models["text_only"] = out / "text_only"
    result["closed_loop"] = {
        name: closed_loop(path, tasks, args.eval_seeds, args.robots)
        for name, path in loop_models.items()
    }
    result["latency_8_robots"] = latency(sft, 8, 8 if args.quick else 16)
    plot({name: out / name for name in runs}, out / "curves.png")
    result["curves"] = str(out / "curves.png")
    result["seconds"] = time.monotonic() - started

    # tables
    names = list(result["accuracy"])
    print(f"\nheld-out decision accuracy ({len(examples)} decisions of the held-out seeds)")
    print(
        f"{'model':22s} {'parse':>6s} {'format':>6s} {'all':>6s} "
        + " ".join(f"{short(t):>9s}" for t in tasks)
        + f" {'no hist':>8s} {'zeroed':>7s} {'tokens':>7s}"
    )
    for name in names:
        row = result["accuracy"][name]
        plain = row["with_history"]
        zeroed = row.get("camera_only_image_zeroed", {}).get("accuracy")
        print(
            f"{name:22s} {plain['parse_rate']:6.2f} {plain['format_rate']:6.2f} {plain['accuracy']:6.3f} "
            + " ".join(f"{plain['per_task'].get(t, float('nan')):9.3f}" for t in tasks)
            + f" {row['camera_only']['accuracy']:8.3f} {zeroed if zeroed is not None else float('nan'):7.3f}"
            + f" {plain['completion_tokens']:7.1f}"
        )
    print("\nclosed-loop success on the held-out seeds, through agent serve --backend cosmos")
    print(f"{'model':14s} " + " ".join(f"{short(t):>9s}" for t in tasks))
    print(
        f"{'oracle':14s} "
        + " ".join(f"{(oracle[t] if oracle[t] is not None else float('nan')):9.2f}" for t in tasks)
    )
    print(f"{'random':14s} " + " ".join(f"{result['random_success'][t]:9.2f}" for t in tasks))
    for name, per_task in result["closed_loop"].items():
        print(f"{name:14s} " + " ".join(f"{per_task[t]['success']:9.2f}" for t in tasks))
    print("\nruns")
    for name, r in runs.items():
        print(
            f"{name:16s} {r['ranks']} rank(s) {r['steps']:6d} steps {r['samples_per_s']:7.1f} samples/s {r['seconds']:6.0f} s"
        )
    print(f"latency, 8 robots batched: p50 {result['latency_8_robots']['p50_ms']:.1f} ms")
    if args.json:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
