"""What every training script here shares: the job's arguments, replica synchronisation, when to
stop, the learning-rate schedule, the progress bar, and leaving cleanly when a rank is lost.

The student's trainer (`trainer.train`) and Cosmos-Reason's (`trainer.cosmos.train`)
each read top to bottom; this module holds the parts that are the same in
both, so a change to how replicas stay together or agree to stop is made once.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from shadowsync import ShadowSync
from trainer.ranks import Ranks, Watchdog

SYNCS = ("ma", "easgd", "bmuf", "allreduce", "none")


def add_job_args(p: argparse.ArgumentParser, lr: float, warmup_steps: int) -> None:
    """The arguments of a training job: data, output, synchronisation, limits, publishing."""
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
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=warmup_steps)
    p.add_argument("--publish-every-s", type=float, default=60.0, help="validate and publish")
    p.add_argument("--publish-every-steps", type=int, default=None, help="also every N steps")
    p.add_argument("--keep", type=int, default=5, help="published versions to keep")
    p.add_argument("--min-episodes", type=int, default=1, help="wait for this many episodes")
    p.add_argument("--failed-weight", type=float, default=1.0, help="weight of failed episodes")
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="last line: one JSON summary")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def check_job_args(
    p: argparse.ArgumentParser, args: argparse.Namespace, default_steps: int, positive: tuple
) -> None:
    """A job with neither --follow nor a limit stops at `default_steps`; `positive` must be >= 1."""
    if not args.follow and args.max_steps is None and args.max_minutes is None:
        args.max_steps = default_steps
    for name in ("keep", "min_episodes", *positive):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.sync_timeout_s > 0:
        p.error("--sync-timeout-s must be > 0")


def recorded_args(args: argparse.Namespace) -> dict[str, Any]:
    """Every argument as JSON values: logged to metrics.jsonl and kept in each version's manifest."""

    def value(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        return dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v

    return {k: value(v) for k, v in sorted(vars(args).items())}


def learning_rate(args: argparse.Namespace, step: int) -> float:
    """Linear warm-up, then cosine to 5% over --max-steps (constant when there is none)."""
    warm = min(1.0, (step + 1) / max(1, args.warmup_steps))
    if args.max_steps is None:
        return args.lr * warm
    progress = min(1.0, step / max(1, args.max_steps))
    return args.lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def run(train: Callable[[argparse.Namespace, Ranks], int], args: argparse.Namespace) -> int:
    """Start this rank and train; a rank that lost another leaves at once with a clear error."""
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


def set_threads(args: argparse.Namespace, ranks: Ranks) -> None:
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // ranks.size))


class Replicas:
    """How this rank's model stays with the others' (`--sync`), and how the job agrees to stop.

    allreduce: Horovod's DistributedOptimizer averages gradients every step;
    ma/easgd/bmuf: ShadowSync averages the weights in the background; none:
    the same start only. `step(optimizer)` steps the optimizer (inside
    ShadowSync's guard); `exclusive()` keeps the shadow thread off the
    weights while a caller reads them whole (a snapshot, a validation).
    """

    def __init__(
        self,
        ranks: Ranks,
        args: argparse.Namespace,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        self.ranks, self.args = ranks, args
        self.sync: ShadowSync | None = None
        self.optimizer = optimizer
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        hvd = ranks.hvd
        if hvd is not None and args.sync == "allreduce":
            hvd.broadcast_parameters(model.state_dict(), root_rank=0)
            self.optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=trainable)
        elif hvd is not None and args.sync in ("ma", "easgd", "bmuf"):
            self.sync = ShadowSync(
                [p for _, p in trainable],
                args.sync,
                name="trainer.shadow",
                interval=args.sync_interval_s,
                min_iterations=1,  # no round without local progress (BMUF must not replay momentum)
                timeout_s=args.sync_timeout_s,
            ).start(bounded=False)  # start-up is not bounded: ranks load their data first
        elif hvd is not None:
            hvd.broadcast_parameters(model.state_dict(), root_rank=0)  # "none": same start only
        # Without ShadowSync's stop flag, ranks agree to stop by a tiny allreduce: every
        # step with allreduce (a rank that left would hang the others' next gradient
        # allreduce), every 50 steps without synchronisation.
        self.agree_every = 1 if args.sync == "allreduce" else 50
        self.watchdog = (
            Watchdog(ranks, args.sync_timeout_s) if hvd is not None and self.sync is None else None
        )

    @property
    def label(self) -> str:
        return self.args.sync if self.ranks.size > 1 else "none"

    @property
    def rounds(self) -> int:
        return self.sync.stats.rounds if self.sync is not None else 0

    def exclusive(self) -> AbstractContextManager[Any]:
        return self.sync.exclusive() if self.sync is not None else nullcontext()

    def step(self) -> None:
        with self.exclusive():
            self.optimizer.step()
        if self.sync is not None:
            self.sync.tick()

    def stop_reason(self, step: int, first_step: int, started: float, stop: threading.Event) -> str:
        """Why to stop before `step` ("" to go on), the same on every rank."""
        if self.watchdog is not None:
            self.watchdog.beat()
        args, ranks = self.args, self.ranks
        reason = ""
        if stop.is_set():
            reason = "signal"
        elif args.max_steps is not None and step >= args.max_steps:
            reason = "max steps"
        elif args.max_minutes is not None and time.monotonic() - started >= 60 * args.max_minutes:
            reason = "max minutes"
        elif self.sync is not None and not self.sync.running:
            if self.sync.error is not None:  # a rank hung or died: stop with its error
                raise self.sync.error
            reason = "another rank stopped"
        if ranks.hvd is not None and self.sync is None:
            at_limit = args.max_steps is not None and step >= args.max_steps
            if (step - first_step) % self.agree_every == 0 or at_limit:
                if ranks.sum([1.0 if reason else 0.0], "trainer.stop")[0] > 0:
                    reason = reason or "another rank stopped"
            else:
                reason = ""  # acted on at the next agreement
        return reason

    def finish(self) -> dict[str, Any] | None:
        """Stop synchronising (ShadowSync's lockstep last round and final average)."""
        if self.watchdog is not None:
            self.watchdog.stop()
        return self.sync.stop().as_dict() if self.sync is not None else None


def progress_bar(ranks: Ranks, args: argparse.Namespace, step: int) -> tqdm | None:
    """Rank 0's bar: live on a terminal, a line every 30 s in a log; None with --quiet."""
    if ranks.rank != 0 or args.quiet:
        return None
    interactive = sys.stderr.isatty()
    return tqdm(
        initial=step,
        total=args.max_steps,
        unit="step",
        file=sys.stderr,
        dynamic_ncols=interactive,
        mininterval=0.5 if interactive else 30.0,
        ncols=None if interactive else 110,
    )
