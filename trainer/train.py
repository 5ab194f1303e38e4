"""Train the student on recorded episodes, on one process or under horovodrun, and publish versions.

    horovodrun -np 2 -H localhost:2 python -m trainer --episodes DIR --out CKPT \\
        [--follow] [--sync ma|easgd|bmuf|allreduce|none] [--max-steps S] [--max-minutes M] [--json]

Read top to bottom: arguments; ranks; data (every rank reads every episode
file's text to agree on the featuriser, then keeps its own shard's frames);
the student and its optimizer; synchronisation; the loop (batch, loss,
step, log, validate, publish); the end (agree to stop, final average,
last version). See docs/trainer.md.
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
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
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
    p.add_argument("--fresh", action="store_true", help="do not start from CKPT's LATEST")
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


# --------------------------------------------------------------------------- ranks


@dataclass
class Ranks:
    """This process's place in the job; Horovod only when horovodrun started us.

    With `timeout_s` set (once training runs; setting up can take long on one
    rank, fitting the featuriser), every collective here gives up after that
    long (`SyncTimeout`): a rank that stopped or hung must stop the others with
    an error, never hang them.
    """

    rank: int = 0
    size: int = 1
    hvd: Any = None
    timeout_s: float | None = None

    @classmethod
    def start(cls) -> Ranks:
        if "HOROVOD_RANK" not in os.environ:
            return cls()
        import horovod.torch as hvd

        hvd.init()
        return cls(hvd.rank(), hvd.size(), hvd)

    def sum(self, values: list[float], name: str) -> list[float]:
        """Element-wise sum over ranks (identity on one process)."""
        if self.hvd is None:
            return values
        import torch

        from shadowsync.comm import allreduce_sum

        tensor = torch.tensor(values, dtype=torch.float64)
        return allreduce_sum(tensor, name, 0.001, self.timeout_s).tolist()

    def gather_text(self, text: str, name: str) -> list[str]:
        """Every rank's ASCII `text` of the same length (e.g. a digest), in rank order."""
        if self.hvd is None:
            return [text]
        import torch

        from shadowsync.comm import allgather

        row = torch.from_numpy(np.frombuffer(text.encode(), np.uint8).copy())[None]
        gathered = allgather(row, name, self.timeout_s).numpy()
        return [bytes(r).decode() for r in gathered]

    def broadcast_text(self, text: str, name: str) -> str:
        """Rank 0's `text` on every rank (bytes in a tensor: nothing is pickled)."""
        if self.hvd is None:
            return text
        import torch

        from shadowsync.comm import broadcast

        data = np.frombuffer(text.encode(), np.uint8) if self.rank == 0 else np.zeros(0, np.uint8)
        n = int(broadcast(torch.tensor([data.size]), f"{name}.n", 0, self.timeout_s).item())
        buf = torch.zeros(n, dtype=torch.uint8)
        if self.rank == 0:
            buf[:] = torch.from_numpy(data.copy())
        return bytes(broadcast(buf, f"{name}.data", 0, self.timeout_s).numpy()).decode()

    def failures(self) -> tuple[type[BaseException], ...]:
        """What collectives raise when the job has lost a rank."""
        from shadowsync.comm import SyncTimeout

        if self.hvd is None:
            return (SyncTimeout,)
        from horovod.common.exceptions import HorovodInternalError

        return (SyncTimeout, HorovodInternalError)


class Watchdog:
    """Ends this rank with an error when the training loop makes no step for `timeout_s`.

    For loops whose collectives block inside Horovod (`--sync allreduce`'s
    gradient allreduce), where no wait can be given a deadline.
    """

    def __init__(self, ranks: Ranks, timeout_s: float) -> None:
        self.ranks, self.timeout_s = ranks, timeout_s
        self._beat = time.monotonic()
        self._done = threading.Event()
        threading.Thread(target=self._watch, name="trainer-watchdog", daemon=True).start()

    def beat(self) -> None:
        self._beat = time.monotonic()

    def stop(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self.timeout_s / 4)):
            if time.monotonic() - self._beat > self.timeout_s:
                print(
                    f"[trainer] rank {self.ranks.rank}: no training step for "
                    f"{self.timeout_s:g} s (another rank stopped or hung); exiting",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(1)


def say(ranks: Ranks, message: str) -> None:
    if ranks.rank == 0:
        print(f"[trainer] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- data


@dataclass
class Data:
    train: Any  # trainer.data.Dataset of this rank's shard
    validation: Any  # trainer.data.Dataset (rank 0 only holds it)
    seen: set[str] = field(default_factory=set)
    watermark: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, episode: Any, ranks: Ranks, failed_weight: float) -> bool:
        """Add an episode where it belongs; False if it is another rank's training data."""
        from trainer.data import is_validation, shard_of

        mine = True
        if is_validation(episode):
            if ranks.rank == 0:
                self.validation.add_episode(episode, failed_weight)
        elif shard_of(episode, ranks.size) == ranks.rank:
            self.train.add_episode(episode, failed_weight)
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


def wait_for_episodes(args: argparse.Namespace, ranks: Ranks, stop: threading.Event) -> list[Any]:
    """The episodes there are now (waiting for --min-episodes with --follow)."""
    from agent.store import iter_episodes

    def report(path: Path, exc: Exception) -> None:
        say(ranks, f"skipping {path}: {exc}")

    deadline_note = time.monotonic()
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
        if time.monotonic() >= deadline_note:
            say(
                ranks,
                f"waiting for {args.min_episodes} episodes in {args.episodes} ({len(episodes)} so far)",
            )
            deadline_note = time.monotonic() + 30
        time.sleep(1.0)


# --------------------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from agent.extras import MissingExtra, require

    try:
        require("learn", "python -m trainer")
    except MissingExtra as exc:
        print(f"trainer: {exc}", file=sys.stderr)
        return 2
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
    import torch

    from trainer import checkpoint as ckpt
    from trainer.data import Dataset
    from trainer.features import FeatureConfig, Featuriser, fit_config
    from trainer.metrics import Metrics
    from trainer.model import ModelConfig, Student, parameter_count

    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // ranks.size))
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed + 1000 * ranks.rank)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    started = time.monotonic()

    # -- resume, or fit the featuriser on the data (rank 0 decides, everyone agrees)
    resume = None
    if not args.fresh and ranks.rank == 0 and ckpt.latest_name(args.out) is not None:
        try:
            resume = ckpt.read_version(args.out)
        except ckpt.CheckpointError as exc:
            raise SystemExit(
                f"trainer: {args.out} holds a checkpoint this trainer cannot continue "
                f"({exc}); pass --fresh with another --out, or move it away"
            ) from None
    episodes = wait_for_episodes(args, ranks, stop)
    if ranks.rank == 0:
        if resume is not None:
            features = resume.features
            say(ranks, f"continuing from {resume.path}")
        else:
            from trainer.data import samples

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
        model_config = resume.model if resume is not None else ModelConfig(width=args.width)
        shared = json.dumps(
            {
                "features": json.loads(features.to_json()),
                "model": json.loads(model_config.to_json()),
            }
        )
    else:
        shared = ""
    shared_cfg = json.loads(ranks.broadcast_text(shared, "trainer.config"))
    features = FeatureConfig.from_json(json.dumps(shared_cfg["features"]))
    model_config = ModelConfig.from_json(json.dumps(shared_cfg["model"]))
    featuriser = Featuriser(features)
    data = Data(Dataset(featuriser), Dataset(featuriser))
    others = [e for e in episodes if not data.add(e, ranks, args.failed_weight)]
    if data.train.size == 0 and others:  # a tiny dataset left this rank's shard empty
        print(
            f"[trainer] rank {ranks.rank}: empty shard, training on all training episodes",
            file=sys.stderr,
        )
        data.train.add_all(others, args.failed_weight)
    for reason in data.train.skipped + data.validation.skipped:
        say(ranks, f"skipped episode {reason}")
    if data.train.size == 0:
        raise SystemExit(f"trainer: rank {ranks.rank} has no training samples (too few episodes?)")
    follower = None
    if args.follow:
        follower = threading.Thread(target=_follow, args=(args, ranks, data, stop), daemon=True)
        follower.start()

    # -- the student, its optimizer, and how replicas stay together
    if resume is not None:
        model, _ = ckpt.load(resume.path)
        model.train()
    else:
        model = Student(features, model_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sync = None
    if ranks.hvd is not None and args.sync == "allreduce":
        ranks.hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        optimizer = ranks.hvd.DistributedOptimizer(
            optimizer, named_parameters=model.named_parameters()
        )
    elif ranks.hvd is not None and args.sync in ("ma", "easgd", "bmuf"):
        from shadowsync import ShadowSync

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
    say(
        ranks,
        f"{len(data.seen)} episodes: {data.train.size} samples on rank 0's shard, "
        f"{data.validation.size} held out · student {parameter_count(model) / 1e6:.2f} M "
        f"parameters · {ranks.size} rank(s), sync {args.sync if ranks.size > 1 else 'n/a'}",
    )

    # -- the loop (from here on no rank waits for another longer than --sync-timeout-s)
    ranks.timeout_s = args.sync_timeout_s
    metrics = Metrics(args.out, enabled=ranks.rank == 0)
    if ranks.rank == 0:
        ckpt.remove_stale_tmp(args.out)
    publisher = Publisher(args, ranks, metrics, featuriser)
    bar = None
    if ranks.rank == 0 and not args.quiet:
        from tqdm import tqdm

        # a live bar on a terminal; a line every 30 s in a log
        interactive = sys.stderr.isatty()
        bar = tqdm(
            total=args.max_steps,
            unit="step",
            file=sys.stderr,
            dynamic_ncols=interactive,
            mininterval=0.5 if interactive else 30.0,
            ncols=None if interactive else 110,
        )
    step, samples_seen, data_s, train_s = 0, 0, 0.0, 0.0
    window = {"loss": [], "acc": [], "t": time.perf_counter(), "n": 0}
    # Without ShadowSync's stop flag, ranks agree to stop by a tiny allreduce: every
    # step with allreduce (a rank that left would hang the others' next gradient
    # allreduce), every 50 steps without synchronisation.
    agree_every = 1 if args.sync == "allreduce" else 50
    watchdog = Watchdog(ranks, args.sync_timeout_s) if ranks.hvd and sync is None else None
    reason = ""
    while True:
        if watchdog is not None:
            watchdog.beat()
        reason = _stop_reason(args, step, started, stop, sync)
        if ranks.hvd is not None and sync is None:
            at_limit = args.max_steps is not None and step >= args.max_steps
            if step % agree_every == 0 or at_limit:
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
            group["lr"] = _lr(args, step)
        model.train()
        loss, correct = _loss(model, batch, featuriser)
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
        if step % 25 == 0 or reason:
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
            with sync.exclusive() if sync is not None else contextlib.nullcontext():
                snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
            publisher.consider(snapshot, model_config, step, data, final=False)

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
    digests = ranks.gather_text(ckpt.weights_digest(model.state_dict()), "trainer.digest")
    if ranks.rank == 0 and (publisher.last_step != step or sync is not None):
        snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
        publisher.consider(snapshot, model_config, step, data, final=True)
    summary = {
        "stopped": reason,
        "steps": step,
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
        "latest": publisher.latest,
        "validation_accuracy": publisher.best_accuracy,
        "sync_stats": stats,
        "parameters": parameter_count(model),
        "replica_digests": digests,  # after the final average: one per rank, equal with ShadowSync
    }
    metrics.close()
    if ranks.rank == 0:
        say(
            ranks,
            f"stopped ({reason}) after {step} steps · {summary['samples_per_s']:.0f} samples/s · "
            f"held-out accuracy {publisher.best_accuracy if publisher.best_accuracy is not None else float('nan'):.3f} · "
            f"{publisher.published} version(s) published, latest {publisher.latest}",
        )
        if args.json:
            print(json.dumps(summary), flush=True)
    if ranks.hvd is not None:
        ranks.hvd.shutdown()
    return 0


def _stop_reason(
    args: argparse.Namespace, step: int, started: float, stop: threading.Event, sync: Any
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


def _lr(args: argparse.Namespace, step: int) -> float:
    """Linear warm-up, then cosine to 5% over --max-steps (constant when there is none)."""
    warm = min(1.0, (step + 1) / max(1, args.warmup_steps))
    if args.max_steps is None:
        return args.lr * warm
    progress = min(1.0, step / max(1, args.max_steps))
    return args.lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def _loss(model: Any, batch: dict[str, Any], featuriser: Any) -> tuple[Any, float]:
    """Weighted cross-entropy over the menu (+ MSE for low-level actions); train accuracy."""
    import torch
    import torch.nn.functional as F

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


class Publisher:
    """Rank 0: validates snapshots and publishes those that do not lose held-out accuracy."""

    def __init__(
        self, args: argparse.Namespace, ranks: Ranks, metrics: Any, featuriser: Any
    ) -> None:
        self.args, self.ranks, self.metrics, self.featuriser = args, ranks, metrics, featuriser
        self.last_time = time.monotonic()
        self.last_step = 0
        self.published = 0
        self.latest: str | None = None
        self.best_accuracy: float | None = None
        self.best_weights: dict[str, Any] | None = None

    def due(self, step: int) -> bool:
        a = self.args
        by_steps = (
            a.publish_every_steps is not None and step - self.last_step >= a.publish_every_steps
        )
        return by_steps or time.monotonic() - self.last_time >= a.publish_every_s

    def consider(
        self, weights: dict[str, Any], model_config: Any, step: int, data: Data, final: bool
    ) -> None:
        from trainer import checkpoint as ckpt
        from trainer.model import Student

        self.last_time, self.last_step = time.monotonic(), step
        candidate = Student(self.featuriser.config, model_config)
        candidate.load_state_dict(weights)
        accuracy = validation_accuracy(candidate, data.validation, self.featuriser)
        previous = None
        if self.best_weights is not None:
            before = Student(self.featuriser.config, model_config)
            before.load_state_dict(self.best_weights)
            previous = validation_accuracy(before, data.validation, self.featuriser)
        dropped = accuracy is not None and previous is not None and accuracy < previous
        self.metrics.log({"step": step, "validation_accuracy": accuracy, "published": not dropped})
        if dropped:
            say(
                self.ranks,
                f"step {step}: held-out accuracy {accuracy:.3f} < {previous:.3f}; not published",
            )
            return
        path = ckpt.publish(
            self.args.out,
            candidate,
            step=step,
            watermark=dict(data.watermark),
            metrics={"validation_accuracy": accuracy, "final": final},
            keep=self.args.keep,
            extra_files=self._extra_files,
        )
        self.published += 1
        self.latest = path.name
        self.best_accuracy, self.best_weights = accuracy, weights
        acc = "n/a" if accuracy is None else f"{accuracy:.3f}"
        say(self.ranks, f"published {path} (step {step}, held-out accuracy {acc})")

    def _extra_files(self, directory: Path, model: Any) -> None:
        self.metrics.plot(directory / "learning_curves.png")
        if self.args.export_onnx:
            from export.onnx_export import export_version_dir

            export_version_dir(model, directory)


def validation_accuracy(
    model: Any, validation: Any, featuriser: Any, limit: int = 4096
) -> float | None:
    """Share of held-out steps whose top-scored option is the teacher's (None: no held-out data)."""
    import torch

    if validation.size == 0:
        return None
    arrays = validation.all(limit)
    keep = arrays["has_skill"]
    if not keep.any():
        return None
    model.eval()
    hits = 0
    with torch.no_grad():
        for start in range(0, len(keep), 256):
            part = {
                name: torch.from_numpy(arrays[name][start : start + 256])
                for name in featuriser.input_names
            }
            scores, _ = model(**part)
            pick = scores.argmax(-1).numpy()
            target = arrays["target"][start : start + 256]
            ok = target[np.arange(len(pick)), pick] > 0
            hits += int(ok[keep[start : start + 256]].sum())
    return hits / int(keep.sum())


def _follow(args: argparse.Namespace, ranks: Ranks, data: Data, stop: threading.Event) -> None:
    """Add each new episode as it lands (every rank reads the file names; keeps its shard)."""
    from agent.store import follow

    def report(path: Path, exc: Exception) -> None:
        say(ranks, f"skipping {path}: {exc}")

    for episode in follow(args.episodes, poll_s=1.0, stop=stop, on_error=report):
        if episode.path.name in data.seen:
            continue
        data.add(episode, ranks, args.failed_weight)


if __name__ == "__main__":
    sys.exit(main())
