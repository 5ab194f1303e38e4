"""Run under horovodrun by benchmarks/shadowsync_ctr.py: train a DLRM-like CTR model.

Every rank trains the same algorithms in sequence on its own shard of a
synthetic click stream drawn from a known ground-truth model, and writes
OUT/rank<r>.json with examples, seconds, sync stats and normalised entropy
(on held-out data) over time. Kept beside the launcher because only it uses it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import horovod.torch as hvd
import torch
from torch import nn

from shadowsync import ForegroundSync, Hogwild, ShadowSync
from shadowsync.flat import copy_flat_, flatten

DENSE = 13  # Criteo-style dense features


@dataclass(frozen=True)
class CTRConfig:
    sparse_features: int = 8
    rows: int = 4000
    dim: int = 16
    base_logit: float = -1.2


@dataclass
class Clicks:
    ids: torch.Tensor  # (N, F) int64
    dense: torch.Tensor  # (N, 13) float32
    labels: torch.Tensor  # (N,) float32

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, size: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return [
            (self.ids[i : i + size], self.dense[i : i + size], self.labels[i : i + size])
            for i in range(0, len(self), size)
        ]


class GroundTruth:
    """The click model the stream is drawn from: per-id biases, pairwise id interactions."""

    def __init__(self, cfg: CTRConfig, seed: int = 7) -> None:
        g = torch.Generator().manual_seed(seed)
        self.cfg = cfg
        self.bias = 0.6 * torch.randn(cfg.sparse_features, cfg.rows, generator=g)
        self.factors = 0.5 * torch.randn(cfg.sparse_features, cfg.rows, 4, generator=g)
        self.dense_w = 0.4 * torch.randn(DENSE, generator=g)
        popularity = 1.0 / torch.arange(1, cfg.rows + 1, dtype=torch.float64) ** 1.05  # Zipf
        self.popularity = popularity / popularity.sum()

    def sample(self, n: int, seed: int) -> Clicks:
        g = torch.Generator().manual_seed(seed)
        f = self.cfg.sparse_features
        ids = torch.multinomial(self.popularity, n * f, replacement=True, generator=g).view(n, f)
        ids = (ids + 37 * torch.arange(f)) % self.cfg.rows  # each feature its own popular ids
        dense = torch.randn(n, DENSE, generator=g)
        cols = torch.arange(f)
        vecs = self.factors[cols, ids]  # (n, F, 4)
        pair = (vecs.sum(1).pow(2).sum(-1) - vecs.pow(2).sum((1, 2))) / 2  # sum_{f<g} <u_f, u_g>
        logit = self.cfg.base_logit + self.bias[cols, ids].sum(1) + 0.3 * pair
        logit = logit + dense @ self.dense_w
        labels = torch.bernoulli(torch.sigmoid(logit), generator=g)
        return Clicks(ids, dense, labels.float())


class DLRM(nn.Module):
    """Sparse embeddings + bottom MLP, pairwise dot interactions, top MLP (DLRM-like)."""

    def __init__(self, cfg: CTRConfig) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(
            nn.Embedding(cfg.rows, cfg.dim, sparse=True) for _ in range(cfg.sparse_features)
        )
        for emb in self.embeddings:
            nn.init.normal_(emb.weight, std=0.05)
        self.bottom = nn.Sequential(nn.Linear(DENSE, 32), nn.ReLU(), nn.Linear(32, cfg.dim))
        vectors = cfg.sparse_features + 1
        self.pairs = torch.triu_indices(vectors, vectors, offset=1)
        self.top = nn.Sequential(
            nn.Linear(self.pairs.shape[1] + cfg.dim, 64), nn.ReLU(), nn.Linear(64, 1)
        )

    def forward(self, ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        bottom = self.bottom(dense)
        vecs = torch.stack([bottom, *(e(ids[:, i]) for i, e in enumerate(self.embeddings))], 1)
        dots = torch.bmm(vecs, vecs.transpose(1, 2))[:, self.pairs[0], self.pairs[1]]
        return self.top(torch.cat([bottom, dots], 1)).squeeze(1)


def normalised_entropy(model: nn.Module, data: Clicks, base_rate: float) -> float:
    """NE = log loss / entropy of the base click rate (lower is better; 1 = predicts the rate)."""
    with torch.no_grad():
        losses = [
            nn.functional.binary_cross_entropy_with_logits(model(i, d), y, reduction="sum")
            for i, d, y in data.batches(8192)
        ]
    log_loss = float(sum(losses)) / len(data)
    p = base_rate
    return log_loss / -(p * math.log(p) + (1 - p) * math.log(1 - p))


class Curve:
    """Snapshots of the replica over time on rank 0, evaluated after training (off the clock)."""

    def __init__(self, model: nn.Module, every_s: float, enabled: bool) -> None:
        self.model, self.every_s, self.enabled = model, every_s, enabled
        self.points: list[tuple[float, torch.Tensor]] = []
        self.t0 = self.next = 0.0

    def begin(self) -> None:
        self.t0 = time.perf_counter()
        self.next = self.t0 + self.every_s

    def maybe_snapshot(self) -> None:
        now = time.perf_counter()
        if self.enabled and now >= self.next:
            self.points.append((now - self.t0, flatten(list(self.model.parameters()))))
            self.next = now + self.every_s

    def evaluate(self, held_out: Clicks, base_rate: float) -> list[tuple[float, float]]:
        params = list(self.model.parameters())
        final = flatten(params)
        out = []
        for t, flat in self.points:
            copy_flat_(params, flat)
            out.append((round(t, 3), normalised_entropy(self.model, held_out, base_rate)))
        copy_flat_(params, final)
        return out


def until(batches: list, deadline: float, stop: threading.Event):
    """The batches, cut short at the time budget or when the ranks agreed to stop."""
    for batch in batches:
        if stop.is_set() or time.perf_counter() > deadline:
            return
        yield batch


def train_one(algo: str, args, cfg: CTRConfig, train: Clicks, held_out: Clicks) -> dict:
    torch.manual_seed(0)  # same initial model on every rank
    model = DLRM(cfg)
    n = hvd.size()
    curve = Curve(model, args.curve_every, enabled=hvd.rank() == 0)
    batches = train.batches(args.batch)
    stop = threading.Event()

    def loss_fn(batch) -> torch.Tensor:
        ids, dense, labels = batch
        return nn.functional.binary_cross_entropy_with_logits(model(ids, dense), labels)

    def size(batch) -> int:
        return len(batch[2])

    hvd.allreduce(torch.zeros(1), name=f"bench.{algo}.start")  # start together
    curve.begin()
    deadline = curve.t0 + (args.budget_s or math.inf)

    def shards(workers: int) -> list:
        return [until(batches[w::workers], deadline, stop) for w in range(workers)]

    stats = None
    if algo == "none":
        done = Hogwild(model, lr=args.lr, on_step=lambda _: curve.maybe_snapshot()).run(
            loss_fn, shards(args.workers), size
        )
        seconds, examples = time.perf_counter() - curve.t0, done.examples
    elif algo.startswith("s-"):
        sync = ShadowSync(model, algo[2:], name=f"bench.{algo}", interval=args.interval)
        with sync:

            def tick(k: int) -> None:
                sync.tick(k)
                curve.maybe_snapshot()

            done = Hogwild(model, lr=args.lr, on_step=tick).run(loss_fn, shards(args.workers), size)
            seconds, examples = time.perf_counter() - curve.t0, done.examples
        stats = sync.stats.as_dict()
    elif algo.startswith("fr-"):
        with ForegroundSync(model, algo[3:], every=args.every, name=f"bench.{algo}") as fg:

            def step(_: int) -> None:
                if fg.step(stop=time.perf_counter() > deadline):
                    stop.set()
                curve.maybe_snapshot()

            # The budget is enforced through the rounds' stop flag, not locally.
            done = Hogwild(model, lr=args.lr, on_step=step).run(
                loss_fn, [until(batches, math.inf, stop)], size
            )
            seconds, examples = time.perf_counter() - curve.t0, done.examples
        stats = {**fg.stats.as_dict(), "sync_gap": float(args.every)}
    elif algo == "sync-sgd":
        # Classic baseline: gradients allreduced every step; linear lr scaling for n trainers.
        opt = hvd.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=args.lr * n),
            named_parameters=model.named_parameters(),
            sparse_as_dense=True,  # one fused allreduce; faster here than sparse allgathers
        )
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        examples = steps = 0
        for batch in batches:
            if steps % 10 == 0 and args.budget_s:  # agree on the last step
                over = torch.tensor([float(time.perf_counter() > deadline)])
                if hvd.allreduce(over, name="bench.sync-sgd.over", op=hvd.Sum).item() > 0:
                    break
            opt.zero_grad()
            loss_fn(batch).backward()
            opt.step()
            steps += 1
            examples += size(batch)
            curve.maybe_snapshot()
        seconds = time.perf_counter() - curve.t0
        stats = {"rounds": steps, "sync_gap": 1.0}
    else:
        raise SystemExit(f"unknown algorithm {algo!r}")
    base_rate = float(train.labels.mean())
    return {
        "algo": algo,
        "examples": examples,
        "seconds": seconds,
        "ne": normalised_entropy(model, held_out, base_rate) if hvd.rank() == 0 else None,
        "curve": curve.evaluate(held_out, base_rate),
        "stats": stats,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    # The launcher passes every run setting (its --help documents them and their defaults).
    for flag, kind in [
        ("--algos", str),
        ("--examples", int),
        ("--held-out", int),
        ("--lr", float),
        ("--workers", int),
        ("--every", int),
        ("--interval", float),
        ("--budget-s", float),
        ("--out", Path),
    ]:
        p.add_argument(flag, type=kind, required=True)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--curve-every", type=float, default=0.5, help="seconds between NE snapshots")
    args = p.parse_args()

    hvd.init()
    torch.set_num_threads(int(os.environ.get("CTR_THREADS", "1")))
    cfg = CTRConfig()
    truth = GroundTruth(cfg)
    train = truth.sample(args.examples, seed=1000 + hvd.rank())
    held_out = truth.sample(args.held_out, seed=1)
    runs = [train_one(a, args, cfg, train, held_out) for a in args.algos.split(",")]
    record = {"rank": hvd.rank(), "size": hvd.size(), "runs": runs}
    tmp = args.out / f".rank{hvd.rank()}.json.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, args.out / f"rank{hvd.rank()}.json")
    hvd.shutdown()


if __name__ == "__main__":
    main()
