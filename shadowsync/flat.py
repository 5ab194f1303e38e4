"""One flat vector per model: a single collective per round instead of one per tensor.

Writes go through `.data` on purpose: workers may be between forward and
backward when the shadow thread adds its delta, and a Hogwild race must not
trip autograd's version check.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def flatten(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """A float32 copy of all parameters, concatenated (reads live Hogwild weights lock-free)."""
    with torch.no_grad():
        return torch.cat([p.detach().reshape(-1).to(torch.float32) for p in params])


def add_flat_(params: Sequence[torch.Tensor], delta: torch.Tensor) -> None:
    """Add a flat delta into the parameters in place, keeping concurrent worker progress."""
    with torch.no_grad():
        for p, chunk in _chunks(params, delta):
            p.data.add_(chunk.to(p.dtype))


def copy_flat_(params: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Overwrite the parameters with a flat vector (initial broadcast, final consensus)."""
    with torch.no_grad():
        for p, chunk in _chunks(params, flat):
            p.data.copy_(chunk)


def _chunks(
    params: Sequence[torch.Tensor], flat: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each parameter with its slice of `flat`, shaped like it (checked before any write)."""
    sizes = [p.numel() for p in params]
    if flat.dim() != 1 or flat.numel() != sum(sizes):
        raise ValueError(
            f"flat vector has shape {tuple(flat.shape)}, parameters need ({sum(sizes)},)"
        )
    return [(p, c.view_as(p)) for p, c in zip(params, flat.split(sizes), strict=True)]
