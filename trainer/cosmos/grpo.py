"""GRPO's maths as pure functions: group-normalised advantages and the clipped policy loss.

The loss follows TRL's `GRPOTrainer` (`_compute_loss`) and cosmos-rl: the
PPO clipped ratio against the policy that *sampled* the completions, a k3
KL estimate to a frozen reference (the SFT model), averaged over completion
tokens. The old log-probabilities are recorded when the completions are
sampled (TRL assumes they equal the current ones when rollout and update
are aligned; here ShadowSync moves the weights in the background between
the two, so the ratio must be taken against what really sampled).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ZERO_STD = 1e-6


def group_advantages(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, G) rewards of G completions per prompt -> (advantages, zero-variance groups (P,)).

    A = (r - mean(group)) / std(group); a group whose completions all earned
    the same gives no signal: its advantages are 0 and it is flagged.
    """
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=False)
    flat = (std < ZERO_STD).squeeze(1)
    advantages = torch.where(std < ZERO_STD, torch.zeros_like(rewards), (rewards - mean) / std)
    return advantages, flat


@dataclass
class LossStats:
    clipped: float  # share of tokens whose ratio was clipped (no gradient)
    kl: float  # mean k3 KL to the reference per token
    ratio: float  # mean ratio to the sampling policy


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    beta: float = 0.0,
) -> tuple[torch.Tensor, LossStats]:
    """Token-mean clipped surrogate (+ beta * KL) over completion tokens.

    logp, old_logp, ref_logp: (B, T) per-token log-probabilities under the
    current, the sampling and the reference policy; advantages: (B,);
    mask: (B, T) completion tokens.
    """
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)
    advantage = advantages[:, None]
    surrogate = torch.minimum(ratio * advantage, ratio.clamp(1 - clip, 1 + clip) * advantage)
    per_token = -surrogate
    kl = torch.zeros_like(logp)
    if ref_logp is not None and beta:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    tokens = mask.sum().clamp_min(1.0)
    loss = (per_token * mask).sum() / tokens
    with torch.no_grad():
        # tokens whose gradient the clip removed (the ratio past the bound the advantage pushes to)
        clipped = ((ratio > 1 + clip) & (advantage > 0)) | ((ratio < 1 - clip) & (advantage < 0))
        clipped = clipped.float()
        stats = LossStats(
            float((clipped * mask).sum() / tokens),
            float((kl * mask).sum() / tokens),
            float((ratio * mask).sum() / tokens),
        )
    return loss, stats
