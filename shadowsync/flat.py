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
    _check_size(params, delta)
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.data.add_(delta[offset : offset + n].view_as(p).to(p.dtype))
            offset += n


def copy_flat_(params: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Overwrite the parameters with a flat vector (initial broadcast, final consensus)."""
    _check_size(params, flat)
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.data.copy_(flat[offset : offset + n].view_as(p))
            offset += n


def _check_size(params: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    total = sum(p.numel() for p in params)
    if flat.dim() != 1 or flat.numel() != total:
        raise ValueError(f"flat vector has shape {tuple(flat.shape)}, parameters need ({total},)")
