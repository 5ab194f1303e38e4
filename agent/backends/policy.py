"""The trained student as a backend, with hot reload of every version the trainer publishes.

`--model CKPT` serves the newest version under CKPT and keeps following
`CKPT/LATEST`; `--model CKPT/v000007` serves that version only. A new version
is verified before it is served (manifest hashes, exact parameter names and
shapes, finite scores on a warm-up batch); loading, swapping and per-episode
versions are `VersionedBackend`'s.

torch is imported by this backend only (the `learn` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent import versions
from agent.backends.versioned import VersionedBackend


class PolicyBackend(VersionedBackend):
    name = "policy"
    extra = "learn"
    model_help = "CKPT (a trainer's --out directory, or one CKPT/vNNNNNN)"
    served = "the student"

    def setup(self, model: str) -> None:
        import torch

        torch.set_num_threads(self.options.threads)
        path = Path(model)
        self.follow = not versions.is_version(path)  # a CKPT root, not one version
        self.root = path if self.follow else path.parent

    @property
    def model_id(self) -> str:
        return str(self.model)

    def newest(self) -> str | None:
        return versions.latest_name(self.root) if self.follow else Path(str(self.model)).name

    def load(self, key: str) -> Any:
        from agent.student.inference import TorchStudent

        student = TorchStudent.load(self.root / key)
        student.warm_up(self.options.warmup_batch)
        return student
