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
import json
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from agent import versions
from agent.files import weights_digest
from agent.store import Episode
from agent.student import checkpoint
from agent.student.config import ModelConfig
from agent.student.features import FeatureConfig, Featuriser, fit_config
from agent.student.modeling import Student, parameter_count
from trainer import resume
from trainer.data import Dataset, samples
from trainer.episodes import Data, follow_episodes, wait_for_episodes
from trainer.loop import (
    Replicas,
    add_job_args,
    check_job_args,
    learning_rate,
    progress_bar,
    recorded_args,
    run,
    set_threads,
)
from trainer.metrics import Metrics
from trainer.publish import Publisher, version_hook
from trainer.ranks import Ranks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.splitlines()[0])
    add_job_args(p, lr=1e-3, warmup_steps=100)
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--no-image", action="store_true", help="a student without the camera")
    p.add_argument("--width", type=int, default=64, help="the student's width")
    p.add_argument("--fresh", action="store_true", help="do not continue from CKPT's LATEST")
    p.add_argument("--export-onnx", action="store_true", help="also export each version to ONNX")
    args = p.parse_args(argv)
    check_job_args(p, args, 2000, ("batch_size", "image_size", "width"))
    return args


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


# --------------------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> int:
    return run(train, parse_args(argv))


def train(args: argparse.Namespace, ranks: Ranks) -> int:
    set_threads(args, ranks)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed + 1000 * ranks.rank)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    started = time.monotonic()
    extra_files = [version_hook("onnx")] if args.export_onnx else []  # fail before training

    # -- data, and where to start: rank 0 decides (resume or fit), every rank agrees
    episodes = wait_for_episodes(args.episodes, args.min_episodes, args.follow, ranks, stop)
    start, state = decide_start(args, episodes, ranks) if ranks.rank == 0 else (None, None)
    start = Start.from_json(ranks.broadcast_text(start.to_json() if start else "", "trainer.start"))
    featuriser = Featuriser(start.features)
    data = Data(Dataset(featuriser), Dataset(featuriser), args.failed_weight)
    data.add_first(episodes, ranks)
    follower = None
    if args.follow:
        follower = threading.Thread(
            target=follow_episodes, args=(args.episodes, ranks, data, stop), daemon=True
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
    replicas = Replicas(ranks, args, model, optimizer)
    optimizer = replicas.optimizer  # with allreduce: Horovod's DistributedOptimizer around it
    ranks.say(
        f"{len(data.seen)} episodes: {data.train.size} samples on rank 0's shard, "
        f"{data.validation.size} held out · student {parameter_count(model) / 1e6:.2f} M "
        f"parameters · {ranks.size} rank(s), sync {replicas.label}"
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
        with replicas.exclusive():
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

    bar = progress_bar(ranks, args, step)
    samples_seen, data_s, train_s = 0, 0.0, 0.0
    window: dict[str, Any] = {"loss": [], "acc": [], "t": time.perf_counter(), "n": 0}
    while True:
        reason = replicas.stop_reason(step, first_step, started, stop)
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
        replicas.step()
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
                "sync_rounds": replicas.rounds,
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
    if bar is not None:
        bar.close()
    stop.set()
    stats = replicas.finish()
    if follower is not None:
        follower.join(10)
    counts = ranks.sum([samples_seen, train_s, data_s], "trainer.totals")
    digests = ranks.gather_text(weights_digest(model.state_dict()), "trainer.digest")
    trained = step > first_step
    if ranks.rank == 0 and trained and (publisher.last_step != step or replicas.sync is not None):
        publish(final=True)
    summary = {
        "stopped": reason,
        "steps": step,
        "first_step": first_step,
        "ranks": ranks.size,
        "sync": replicas.label,
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
