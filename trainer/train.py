"""Train the student on recorded episodes, on one process or under horovodrun, and publish versions.

    horovodrun -np 2 -H localhost:2 python -m trainer --episodes DIR --out CKPT \\
        [--follow] [--sync ma|easgd|bmuf|allreduce|none] [--max-steps S] [--max-minutes M] [--json]

Read top to bottom: arguments; data (every rank reads every episode file's
text to agree on the featuriser, then keeps its own shard's frames); resume
or start; the student and its optimizer; synchronisation; the loop (batch,
loss, step, log, validate, publish); the end (agree to stop, final average,
last version). Collectives live in `trainer.ranks`, publishing in
`trainer.publish`, resume state in `trainer.resume`. See docs/trainer.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from agent import versions
from agent.store import Episode, follow, iter_episodes
from agent.student import checkpoint
from agent.student.config import ModelConfig
from agent.student.features import FeatureConfig, Featuriser, fit_config
from agent.student.modeling import Student, parameter_count
from shadowsync import ShadowSync
from trainer import resume
from trainer.data import Dataset, is_validation, samples, shard_of
from trainer.metrics import Metrics
from trainer.publish import Publisher, version_hook
from trainer.ranks import Ranks, Watchdog

SYNCS = ("ma", "easgd", "bmuf", "allreduce", "none")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=Path, required=True, help="episode directory (recursive)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory (CKPT)")
    p.add_argument("--follow", action="store_true", help="keep training as new episodes land")
    p.add_argument("--sync", choices=SYNCS, default="ma", help="how replicas stay together")
    p.add_argument(
        "--sync-interval-s",
        type=float,
        default=0.25,
        help="least time between ShadowSync rounds (rounds also wait for a training step)",
    )
    p.add_argument(
        "--sync-timeout-s",
        type=float,
        default=120.0,
        help="stop with an error when other ranks do not join a collective for this long",
    )
    p.add_argument(
        "--max-steps", type=int, default=None, help="stop at this step (counted from the start)"
    )
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this long")
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--publish-every-s", type=float, default=60.0, help="validate and publish")
    p.add_argument("--publish-every-steps", type=int, default=None, help="also every N steps")
    p.add_argument("--keep", type=int, default=5, help="published versions to keep")
    p.add_argument("--min-episodes", type=int, default=1, help="wait for this many episodes")
    p.add_argument("--failed-weight", type=float, default=1.0, help="weight of failed episodes")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--no-image", action="store_true", help="a student without the camera")
    p.add_argument("--width", type=int, default=64, help="the student's width")
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="do not continue from CKPT's LATEST")
    p.add_argument("--export-onnx", action="store_true", help="also export each version to ONNX")
    p.add_argument("--json", action="store_true", help="last line: one JSON summary")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if not args.follow and args.max_steps is None and args.max_minutes is None:
        args.max_steps = 2000
    for name in ("batch_size", "keep", "min_episodes", "image_size", "width"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.sync_timeout_s > 0:
        p.error("--sync-timeout-s must be > 0")
    return args


def recorded_args(args: argparse.Namespace) -> dict[str, Any]:
    """Every argument as JSON values: logged to metrics.jsonl and kept in each version's manifest."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in sorted(vars(args).items())}


# --------------------------------------------------------------------------- data


@dataclass
class Data:
    train: Dataset  # this rank's shard
    validation: Dataset  # held out (rank 0 only holds it)
    failed_weight: float
    seen: set[str] = field(default_factory=set)
    watermark: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, episode: Episode, ranks: Ranks) -> bool:
        """Add an episode where it belongs; False if it is another rank's training data."""
        mine = True
        if is_validation(episode):
            if ranks.rank == 0:
                self.validation.add_episode(episode, self.failed_weight)
        elif shard_of(episode, ranks.size) == ranks.rank:
            self.train.add_episode(episode, self.failed_weight)
        else:
            mine = False
        with self.lock:
            self.seen.add(episode.path.name)
            ended = episode.meta.get("ended_at") or 0.0
            self.watermark = {
                "episodes": len(self.seen),
                "latest_ended_at": max(ended, self.watermark.get("latest_ended_at", 0.0)),
            }
        return mine


def wait_for_episodes(
    args: argparse.Namespace, ranks: Ranks, stop: threading.Event
) -> list[Episode]:
    """The episodes there are now (waiting for --min-episodes with --follow)."""

    def report(path: Path, exc: Exception) -> None:
        ranks.say(f"skipping {path}: {exc}")

    note_at = time.monotonic()
    while True:
        episodes = (
            list(iter_episodes(args.episodes, on_error=report)) if args.episodes.is_dir() else []
        )
        # every rank lists the same directory; they decide on the mean, so together
        average = ranks.sum([len(episodes)], "trainer.count")[0] / ranks.size
        if average >= args.min_episodes:
            return episodes
        if not args.follow:
            if not args.episodes.is_dir():
                raise SystemExit(f"trainer: {args.episodes} does not exist (record episodes first)")
            raise SystemExit(
                f"trainer: {args.episodes} holds {len(episodes)} readable episodes; "
                f"need at least {args.min_episodes}"
            )
        if ranks.sum([1.0 if stop.is_set() else 0.0], "trainer.wait.stop")[0] > 0:
            raise SystemExit(0)  # stopped before there was anything to learn from
        if time.monotonic() >= note_at:
            ranks.say(
                f"waiting for {args.min_episodes} episodes in {args.episodes} ({len(episodes)} so far)"
            )
            note_at = time.monotonic() + 30
        time.sleep(1.0)


def follow_episodes(
    args: argparse.Namespace, ranks: Ranks, data: Data, stop: threading.Event
) -> None:
    """Add each new episode as it lands (every rank reads the file names; keeps its shard)."""

    def report(path: Path, exc: Exception) -> None:
        ranks.say(f"skipping {path}: {exc}")

    for episode in follow(args.episodes, poll_s=1.0, stop=stop, on_error=report):
        if episode.path.name not in data.seen:
            data.add(episode, ranks)


# --------------------------------------------------------------------------- what to start from


@dataclass
class Start:
    """Where this run begins; rank 0 decides, every rank receives it as JSON."""

    features: FeatureConfig
    model: ModelConfig
    version: str | None = None  # the published version whose weights it starts from
    resume: dict[str, Any] | None = None  # `ResumeState.layout()` when the optimizer continues too

    def to_json(self) -> str:
        return json.dumps(
            {
                "features": json.loads(self.features.to_json()),
                "model": json.loads(self.model.to_json()),
                "version": self.version,
                "resume": self.resume,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Start:
        raw = json.loads(text)
        return cls(
            FeatureConfig.from_json(json.dumps(raw["features"])),
            ModelConfig.from_json(json.dumps(raw["model"])),
            raw["version"],
            raw["resume"],
        )


def decide_start(
    args: argparse.Namespace, episodes: list[Episode], ranks: Ranks
) -> tuple[Start, resume.ResumeState | None]:
    """Rank 0: continue from CKPT's LATEST (unless --fresh), else fit the featuriser on the data."""
    if not args.fresh and versions.latest_name(args.out) is not None:
        try:
            version = checkpoint.read(args.out)
        except checkpoint.CheckpointError as exc:
            raise SystemExit(
                f"trainer: {args.out} holds a checkpoint this trainer cannot continue "
                f"({exc}); pass --fresh with another --out, or move it away"
            ) from None
        state = resume.load(args.out, version.name)
        if state is None:
            ranks.say(
                f"warm start from {version.path}: its weights, a fresh optimizer, step 0 "
                f"(no {resume.RESUME} for {version.name})"
            )
        else:
            ranks.say(f"continuing from {version.path} at step {state.step}")
        layout = None if state is None else state.layout()
        return Start(version.features, version.model, version.name, layout), state
    labelled = [s for e in episodes for s in samples(e)]
    if not labelled:
        raise SystemExit(f"trainer: no labelled steps in {args.episodes} (no teacher?)")
    actions = [s.action for s in labelled if s.action is not None]
    features = fit_config(
        (s.observation for s in labelled),
        camera=None if args.no_image else "image",
        action_dim=int(actions[0].shape[0]) if actions else 0,
        image_size=args.image_size,
    )
    return Start(features, ModelConfig(width=args.width)), None


# --------------------------------------------------------------------------- the maths


def learning_rate(args: argparse.Namespace, step: int) -> float:
    """Linear warm-up, then cosine to 5% over --max-steps (constant when there is none)."""
    warm = min(1.0, (step + 1) / max(1, args.warmup_steps))
    if args.max_steps is None:
        return args.lr * warm
    progress = min(1.0, step / max(1, args.max_steps))
    return args.lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def loss_and_accuracy(
    model: Student, batch: dict[str, torch.Tensor], featuriser: Featuriser
) -> tuple[torch.Tensor, float]:
    """Weighted cross-entropy over the menu (+ MSE for low-level actions); train accuracy."""
    scores, action = model(**{name: batch[name] for name in featuriser.input_names})
    weight = batch["weight"]
    has_skill = batch["has_skill"]
    loss = torch.zeros((), dtype=torch.float32)
    correct = float("nan")
    if bool(has_skill.any()):
        logp = scores.log_softmax(-1)
        nll = -(logp * batch["target"]).sum(-1)
        w = weight * has_skill
        loss = loss + (nll * w).sum() / w.sum().clamp_min(1e-9)
        hit = batch["target"].gather(1, scores.argmax(-1, keepdim=True)).squeeze(1) > 0
        correct = float(hit[has_skill].float().mean())
    if action is not None and bool(batch["has_action"].any()):
        w = weight * batch["has_action"]
        err = F.mse_loss(action, batch["action"], reduction="none").mean(-1)
        loss = loss + (err * w).sum() / w.sum().clamp_min(1e-9)
    return loss, correct


def stop_reason(
    args: argparse.Namespace,
    step: int,
    started: float,
    stop: threading.Event,
    sync: ShadowSync | None,
) -> str:
    if stop.is_set():
        return "signal"
    if args.max_steps is not None and step >= args.max_steps:
        return "max steps"
    if args.max_minutes is not None and time.monotonic() - started >= 60 * args.max_minutes:
        return "max minutes"
    if sync is not None and not sync.running:
        if sync.error is not None:  # a rank hung or died: stop with its error, not a result
            raise sync.error
        return "another rank stopped"
    return ""


# --------------------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ranks = Ranks.start()
    try:
        return train(args, ranks)
    except Exception as exc:  # never hang the job: a rank that lost another leaves with this
        lost = next((e for e in (exc, exc.__cause__) if isinstance(e, ranks.failures())), None)
        if lost is None:
            raise
        print(
            f"[trainer] rank {ranks.rank}: stopped, the job lost a rank: "
            f"{type(lost).__name__}: {lost}",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(1)  # Horovod's exit handler would wait on the collective that never completes


def train(args: argparse.Namespace, ranks: Ranks) -> int:
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // ranks.size))
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed + 1000 * ranks.rank)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    started = time.monotonic()
    extra_files = [version_hook("onnx")] if args.export_onnx else []  # fail before training

    # -- data, and where to start: rank 0 decides (resume or fit), every rank agrees
    episodes = wait_for_episodes(args, ranks, stop)
    start, state = decide_start(args, episodes, ranks) if ranks.rank == 0 else (None, None)
    start = Start.from_json(ranks.broadcast_text(start.to_json() if start else "", "trainer.start"))
    featuriser = Featuriser(start.features)
    data = Data(Dataset(featuriser), Dataset(featuriser), args.failed_weight)
    others = [e for e in episodes if not data.add(e, ranks)]
    if data.train.size == 0 and others:  # a tiny dataset left this rank's shard empty
        print(
            f"[trainer] rank {ranks.rank}: empty shard, training on all training episodes",
            file=sys.stderr,
        )
        data.train.add_all(others, args.failed_weight)
    for reason in data.train.skipped + data.validation.skipped:
        ranks.say(f"skipped episode {reason}")
    if data.train.size == 0:
        raise SystemExit(f"trainer: rank {ranks.rank} has no training samples (too few episodes?)")
    follower = None
    if args.follow:
        follower = threading.Thread(
            target=follow_episodes, args=(args, ranks, data, stop), daemon=True
        )
        follower.start()

    # -- the student and its optimizer (rank 0's resumed state on every rank)
    if start.version is not None and ranks.rank == 0:
        model, _ = checkpoint.load(args.out / start.version)
        model.train()
    else:
        model = Student(start.features, start.model)  # other ranks receive rank 0's weights below
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    step = 0
    if start.resume is not None:
        state = state if ranks.rank == 0 else resume.ResumeState.zeros(start.resume)
        ranks.broadcast_tensors(state.tensors, "trainer.resume")
        resume.apply(optimizer, state)
        step = state.step
    first_step = step

    # -- how replicas stay together
    sync = None
    if ranks.hvd is not None and args.sync == "allreduce":
        ranks.hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        optimizer = ranks.hvd.DistributedOptimizer(
            optimizer, named_parameters=model.named_parameters()
        )
    elif ranks.hvd is not None and args.sync in ("ma", "easgd", "bmuf"):
        sync = ShadowSync(
            model,
            args.sync,
            name="trainer.shadow",
            interval=args.sync_interval_s,
            min_iterations=1,  # no round without local progress (BMUF must not replay momentum)
            timeout_s=args.sync_timeout_s,
        ).start(bounded=False)  # start-up is not bounded: ranks load their data first
    elif ranks.hvd is not None:
        ranks.hvd.broadcast_parameters(model.state_dict(), root_rank=0)  # "none": same start only
    ranks.say(
        f"{len(data.seen)} episodes: {data.train.size} samples on rank 0's shard, "
        f"{data.validation.size} held out · student {parameter_count(model) / 1e6:.2f} M "
        f"parameters · {ranks.size} rank(s), sync {args.sync if ranks.size > 1 else 'n/a'}"
    )

    # -- the loop (from here on no rank waits for another longer than --sync-timeout-s)
    ranks.timeout_s = args.sync_timeout_s
    metrics = Metrics(args.out, enabled=ranks.rank == 0)
    metrics.log({"step": step, "args": recorded_args(args), "start": start.version or "fitted"})
    if ranks.rank == 0:
        versions.remove_stale_tmp(args.out)
    publisher = Publisher(
        args.out,
        ranks,
        metrics,
        featuriser,
        args=recorded_args(args),
        every_s=args.publish_every_s,
        every_steps=args.publish_every_steps,
        keep=args.keep,
        extra_files=extra_files,
        start_step=step,
    )

    def publish(final: bool) -> None:
        with sync.exclusive() if sync is not None else contextlib.nullcontext():
            weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            optimizer_state = resume.snapshot(optimizer, "", step)
        publisher.consider(
            weights,
            optimizer_state,
            start.model,
            step,
            data.validation,
            dict(data.watermark),
            final,
        )

    bar = None
    if ranks.rank == 0 and not args.quiet:
        interactive = sys.stderr.isatty()  # a live bar on a terminal; a line every 30 s in a log
        bar = tqdm(
            initial=step,
            total=args.max_steps,
            unit="step",
            file=sys.stderr,
            dynamic_ncols=interactive,
            mininterval=0.5 if interactive else 30.0,
            ncols=None if interactive else 110,
        )
    samples_seen, data_s, train_s = 0, 0.0, 0.0
    window: dict[str, Any] = {"loss": [], "acc": [], "t": time.perf_counter(), "n": 0}
    # Without ShadowSync's stop flag, ranks agree to stop by a tiny allreduce: every
    # step with allreduce (a rank that left would hang the others' next gradient
    # allreduce), every 50 steps without synchronisation.
    agree_every = 1 if args.sync == "allreduce" else 50
    watchdog = Watchdog(ranks, args.sync_timeout_s) if ranks.hvd and sync is None else None
    while True:
        if watchdog is not None:
            watchdog.beat()
        reason = stop_reason(args, step, started, stop, sync)
        if ranks.hvd is not None and sync is None:
            at_limit = args.max_steps is not None and step >= args.max_steps
            if (step - first_step) % agree_every == 0 or at_limit:
                if ranks.sum([1.0 if reason else 0.0], "trainer.stop")[0] > 0:
                    reason = reason or "another rank stopped"
            else:
                reason = ""  # acted on at the next agreement
        if reason:
            break
        t0 = time.perf_counter()
        batch = {k: torch.from_numpy(v) for k, v in data.train.batch(args.batch_size, rng).items()}
        t1 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args, step)
        model.train()
        loss, correct = loss_and_accuracy(model, batch, featuriser)
        model.zero_grad(set_to_none=True)
        loss.backward()
        if sync is not None:
            with sync.exclusive():
                optimizer.step()
            sync.tick()
        else:
            optimizer.step()
        t2 = time.perf_counter()
        step += 1
        samples_seen += args.batch_size
        data_s += t1 - t0
        train_s += t2 - t0
        window["loss"].append(loss.item())
        window["acc"].append(correct)
        window["n"] += args.batch_size
        if step % 25 == 0:
            now = time.perf_counter()
            logged = {
                "step": step,
                "loss": float(np.mean(window["loss"])),
                "train_accuracy": float(np.nanmean(window["acc"])),
                "samples_per_s": window["n"] / max(now - window["t"], 1e-9) * ranks.size,
                "data_fraction": data_s / max(train_s, 1e-9),
                "sync_rounds": sync.stats.rounds if sync is not None else 0,
                "train_samples": data.train.size,
            }
            metrics.log(logged)
            window = {"loss": [], "acc": [], "t": now, "n": 0}
            if bar is not None:
                bar.set_postfix(
                    loss=f"{logged['loss']:.3f}",
                    acc=f"{logged['train_accuracy']:.3f}",
                    sps=f"{logged['samples_per_s']:.0f}",
                    rounds=logged["sync_rounds"],
                    refresh=False,
                )
        if bar is not None:
            bar.update(1)
        if ranks.rank == 0 and publisher.due(step):
            publish(final=False)

    # -- the end: every rank leaves the loop, replicas are averaged, rank 0 publishes last
    if watchdog is not None:
        watchdog.stop()
    if bar is not None:
        bar.close()
    stop.set()
    stats = sync.stop().as_dict() if sync is not None else None
    if follower is not None:
        follower.join(10)
    counts = ranks.sum([samples_seen, train_s, data_s], "trainer.totals")
    digests = ranks.gather_text(checkpoint.weights_digest(model.state_dict()), "trainer.digest")
    trained = step > first_step
    if ranks.rank == 0 and trained and (publisher.last_step != step or sync is not None):
        publish(final=True)
    summary = {
        "stopped": reason,
        "steps": step,
        "first_step": first_step,
        "ranks": ranks.size,
        "sync": args.sync if ranks.size > 1 else "none",
        "samples": int(counts[0]),
        "samples_per_s": counts[0] / max(counts[1] / ranks.size, 1e-9),
        "data_fraction": counts[2] / max(counts[1], 1e-9),
        "seconds": time.monotonic() - started,
        "episodes": len(data.seen),
        "train_samples_rank0": data.train.size,
        "validation_samples": data.validation.size,
        "versions_published": publisher.published,
        "latest": publisher.latest or start.version,
        "validation_accuracy": publisher.best_accuracy,
        "sync_stats": stats,
        "parameters": parameter_count(model),
        "replica_digests": digests,  # after the final average: one per rank, equal with ShadowSync
    }
    metrics.close()
    if ranks.rank == 0:
        accuracy = publisher.best_accuracy
        ranks.say(
            f"stopped ({reason}) after {step} steps ({step - first_step} in this run) · "
            f"{summary['samples_per_s']:.0f} samples/s · held-out accuracy "
            f"{accuracy if accuracy is not None else float('nan'):.3f} · "
            f"{publisher.published} version(s) published, latest {summary['latest']}"
        )
        if args.json:
            print(json.dumps(summary), flush=True)
    if ranks.hvd is not None:
        ranks.hvd.shutdown()
    return 0
