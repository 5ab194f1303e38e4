"""The synchronisation algorithms as pure maths, separate from threads and Horovod.

Every algorithm has the same two-step shape, used alike by the shadow thread
and by the foreground counterparts:

1. ``outgoing(w)``: what this trainer contributes to one SUM-allreduce, given a
   snapshot ``w`` of its replica;
2. ``incoming(w, total, n, last)``: the delta to *add* to the live replica once
   the sum over ``n`` trainers arrives; ``last`` marks the lockstep stop round,
   after which no worker trains against the result.

Returning a delta against the snapshot (instead of new weights) keeps the
progress that Hogwild workers made while the allreduce was in flight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ALGORITHMS = ("ma", "easgd", "bmuf")


# ---- pure functions (tested against hand-computed values) -------------------


def ma_delta(sent: torch.Tensor, total: torch.Tensor, n: int) -> torch.Tensor:
    """Model averaging: move the replica by (mean_j w_j - w_sent)."""
    return total / n - sent


def easgd_elastic(w: torch.Tensor, center: torch.Tensor, alpha: float) -> torch.Tensor:
    """Elastic difference d = alpha (w - c): pulled off the replica, pushed onto the centre."""
    return alpha * (w - center)


def easgd_center(center: torch.Tensor, elastic_sum: torch.Tensor) -> torch.Tensor:
    """Centre update c <- c + sum_i d_i (same on every trainer after the allreduce)."""
    return center + elastic_sum


def bmuf_update(
    global_w: torch.Tensor,
    momentum: torch.Tensor,
    mean_w: torch.Tensor,
    block_momentum: float,
    block_lr: float,
    nesterov: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block update: returns (new global weights, new block momentum, new replica target).

    G = mean_w - w_g; Delta = eta Delta + zeta G; w_g += Delta; target = w_g (+ eta Delta).
    """
    grad = mean_w - global_w
    momentum = block_momentum * momentum + block_lr * grad
    global_w = global_w + momentum
    target = global_w + block_momentum * momentum if nesterov else global_w
    return global_w, momentum, target


# ---- stateful rules: one object per synchronised model ----------------------


class Rule:
    """Per-model state of one algorithm; both methods are called from a single thread."""

    name = ""

    def start(self, w: torch.Tensor, n: int) -> None:
        """Initialise state from the (already identical) replicas of `n` trainers."""

    def outgoing(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def incoming(
        self, w: torch.Tensor, total: torch.Tensor, n: int, last: bool = False
    ) -> torch.Tensor:
        raise NotImplementedError


class ModelAveraging(Rule):
    """S-MA / FR-MA: every round, each replica moves to the mean of all replicas."""

    name = "ma"

    def outgoing(self, w: torch.Tensor) -> torch.Tensor:
        return w

    def incoming(
        self, w: torch.Tensor, total: torch.Tensor, n: int, last: bool = False
    ) -> torch.Tensor:
        return ma_delta(w, total, n)


@dataclass
class ElasticAveraging(Rule):
    """S-EASGD / FR-EASGD: replicas are tied elastically to a replicated centre variable.

    `alpha` defaults to 0.9 / n (the EASGD paper's beta = n alpha = 0.9); it
    must stay below 2 / (n + 1), or replicas and centre oscillate apart.
    """

    alpha: float | None = None
    center: torch.Tensor | None = field(default=None, repr=False)
    name = "easgd"

    def __post_init__(self) -> None:
        if self.alpha is not None and not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"easgd alpha must be in (0, 1], got {self.alpha}")

    def start(self, w: torch.Tensor, n: int) -> None:
        if self.alpha is None:
            self.alpha = 0.9 / n
        if self.alpha * (n + 1) >= 2.0:
            # Without gradients the mean replica and the centre evolve by a 2x2 map with
            # eigenvalues 1 and 1 - (n + 1) alpha: at or past 2 / (n + 1) they oscillate apart.
            raise ValueError(
                f"easgd alpha {self.alpha} with {n} trainers diverges; need alpha < {2 / (n + 1):.4g}"
            )
        self.center = w.clone()

    def outgoing(self, w: torch.Tensor) -> torch.Tensor:
        return easgd_elastic(w, self._center(), self._alpha())

    def incoming(
        self, w: torch.Tensor, total: torch.Tensor, n: int, last: bool = False
    ) -> torch.Tensor:
        elastic = easgd_elastic(w, self._center(), self._alpha())
        self.center = easgd_center(self._center(), total)
        return -elastic

    def _center(self) -> torch.Tensor:
        if self.center is None:
            raise RuntimeError("ElasticAveraging.start() was not called")
        return self.center

    def _alpha(self) -> float:
        if self.alpha is None:
            raise RuntimeError("ElasticAveraging.start() was not called")
        return self.alpha


@dataclass
class BlockMomentum(Rule):
    """S-BMUF / FR-BMUF: the averaged block update is filtered by block momentum.

    Defaults: block lr 1 and no Nesterov as in fairseq's BMUF; block momentum
    1 - 1/n as the BMUF paper advises (fairseq's 0.875 is that value for its
    usual n = 8; with 2 trainers 0.875 overshoots and diverges). The first
    `warmup_rounds` rounds are plain model averaging with no momentum, like
    fairseq's BMUF warm-up: early blocks move the weights far, and momentum
    extrapolating those moves overshoots (seen as loss rising at 2 trainers).
    """

    block_momentum: float | None = None
    block_lr: float = 1.0
    nesterov: bool = False
    warmup_rounds: int = 2
    global_w: torch.Tensor | None = field(default=None, repr=False)
    momentum: torch.Tensor | None = field(default=None, repr=False)
    rounds: int = field(default=0, repr=False)
    name = "bmuf"

    def __post_init__(self) -> None:
        if self.block_momentum is not None and not 0.0 <= self.block_momentum < 1.0:
            raise ValueError(f"bmuf block_momentum must be in [0, 1), got {self.block_momentum}")
        if self.block_lr <= 0.0:
            raise ValueError(f"bmuf block_lr must be > 0, got {self.block_lr}")
        if self.warmup_rounds < 0:
            raise ValueError(f"bmuf warmup_rounds must be >= 0, got {self.warmup_rounds}")

    def start(self, w: torch.Tensor, n: int) -> None:
        self.global_w = w.clone()
        self.momentum = torch.zeros_like(w)
        if self.block_momentum is None:
            self.block_momentum = 1.0 - 1.0 / n

    def outgoing(self, w: torch.Tensor) -> torch.Tensor:
        return w

    def incoming(
        self, w: torch.Tensor, total: torch.Tensor, n: int, last: bool = False
    ) -> torch.Tensor:
        """The block update; the `last` round drops the momentum term.

        Momentum extrapolates along the previous block for the next block's
        training to correct; after the last round no block follows, and with
        few, long blocks that uncorrected jump can undo much of the training.
        """
        if self.global_w is None or self.momentum is None or self.block_momentum is None:
            raise RuntimeError("BlockMomentum.start() was not called")
        self.rounds += 1
        if self.rounds <= self.warmup_rounds:
            self.global_w = total / n
            self.momentum.zero_()
            return ma_delta(w, total, n)
        self.global_w, self.momentum, target = bmuf_update(
            self.global_w,
            self.momentum,
            total / n,
            0.0 if last else self.block_momentum,
            self.block_lr,
            self.nesterov,
        )
        return target - w


def make_rule(algorithm: str, **options: float | bool) -> Rule:
    """Build a rule by name ("ma", "easgd", "bmuf") with algorithm-specific options."""
    if algorithm == "ma":
        if options:
            raise TypeError(f"ma takes no options, got {sorted(options)}")
        return ModelAveraging()
    if algorithm == "easgd":
        return ElasticAveraging(**options)  # type: ignore[arg-type]
    if algorithm == "bmuf":
        return BlockMomentum(**options)  # type: ignore[arg-type]
    raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
