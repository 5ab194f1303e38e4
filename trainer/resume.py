"""Resume state: the optimizer and the step of the newest published version, so a run continues.

`CKPT/resume.safetensors` (private to the trainer: never served, never
exported) holds rank 0's optimizer tensors at the moment of the snapshot a
version was published from, and in its safetensors metadata (JSON strings)
the version's name, the step and the optimizer's parameter groups. It is
written atomically after each publication; nothing is pickled. A trainer
started on a `CKPT` whose `LATEST` matches the file continues from that
version's weights, optimizer state and step; one that does not match (older
versions, a deleted file) is a warm start: the weights, a fresh optimizer,
step 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from agent.files import write_atomically
from agent.versions import TMP

RESUME = "resume.safetensors"


@dataclass
class ResumeState:
    """What continues a run: the optimizer's tensors and groups, and the step."""

    version: str
    step: int
    tensors: dict[str, torch.Tensor]  # "<param index>.<state key>" -> tensor
    groups: list[dict[str, Any]]

    def layout(self) -> dict[str, Any]:
        """Everything but the tensor values (JSON): what other ranks need to take rank 0's."""
        shapes = {
            k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in self.tensors.items()
        }
        return {"version": self.version, "step": self.step, "groups": self.groups, "shapes": shapes}

    @classmethod
    def zeros(cls, layout: dict[str, Any]) -> ResumeState:
        """A state of the layout's shapes, to receive rank 0's values."""
        tensors = {
            k: torch.zeros(shape, dtype=getattr(torch, dtype))
            for k, (shape, dtype) in layout["shapes"].items()
        }
        return cls(layout["version"], int(layout["step"]), tensors, layout["groups"])


def snapshot(optimizer: torch.optim.Optimizer, version: str, step: int) -> ResumeState:
    """A copy of the optimizer's state now (take it where the weights snapshot is taken)."""
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{key}": value.detach().clone().cpu()
        for index, entries in state["state"].items()
        for key, value in entries.items()
        if isinstance(value, torch.Tensor)
    }
    return ResumeState(version, step, tensors, _plain(state["param_groups"]))


def apply(optimizer: torch.optim.Optimizer, state: ResumeState) -> None:
    """Load `state` into `optimizer` (same parameters, same order)."""
    entries: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in state.tensors.items():
        index, key = name.split(".", 1)
        entries.setdefault(int(index), {})[key] = tensor
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in state.groups]
    optimizer.load_state_dict({"state": entries, "param_groups": groups})


def save(out: Path, state: ResumeState) -> None:
    meta = {"version": state.version, "step": str(state.step), "groups": json.dumps(state.groups)}
    write_atomically(
        out / RESUME,
        lambda tmp: save_file(state.tensors, str(tmp), metadata=meta),
        tmp_dir=out / TMP,
    )


def load(out: Path, version: str) -> ResumeState | None:
    """The resume state written with `version`, or None (missing, another version's, unreadable)."""
    path = out / RESUME
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("version") != version:
            return None
        return ResumeState(
            version, int(meta["step"]), load_file(str(path)), json.loads(meta["groups"])
        )
    except (OSError, SafetensorError, KeyError, ValueError):
        return None


def _plain(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Optimizer groups as JSON values (tuples become lists; anything else becomes its string)."""
    return json.loads(json.dumps(groups, default=str))
