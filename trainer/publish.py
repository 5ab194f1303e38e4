"""Rank 0's publishing: validate a snapshot, publish it as a student version if it does not lose
held-out accuracy, keep the resume state beside it.

Files other packages add to a version (`--export-onnx`: `policy.onnx`) come
through a hook they register as an entry point in the group
`embodied_agent.version_files` (the exporter registers `onnx`), so the
trainer never imports them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agent.student import checkpoint
from agent.student.features import Featuriser
from agent.student.modeling import Student
from trainer import resume
from trainer.data import Dataset
from trainer.metrics import Metrics
from trainer.ranks import Ranks

HOOKS = "embodied_agent.version_files"
VersionFiles = Callable[[Path, str, Student], None]


def version_hook(name: str) -> VersionFiles:
    """The function registered as `name` in the `embodied_agent.version_files` entry points."""
    found = list(entry_points(group=HOOKS, name=name))
    if not found:
        raise SystemExit(
            f"trainer: nothing registers {name!r} in the {HOOKS} entry points; install the "
            "package that provides it (for --export-onnx: pip install 'embodied-agent[export]')"
        )
    return found[0].load()


def validation_accuracy(
    model: Student, validation: Dataset, featuriser: Featuriser, limit: int = 4096
) -> float | None:
    """Share of held-out steps whose top-scored option is the teacher's (None: no held-out data)."""
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


class Publisher:
    """Rank 0: validates snapshots and publishes those that do not lose held-out accuracy."""

    def __init__(
        self,
        out: Path,
        ranks: Ranks,
        metrics: Metrics,
        featuriser: Featuriser,
        *,
        args: dict[str, Any],
        every_s: float,
        every_steps: int | None,
        keep: int,
        extra_files: list[VersionFiles],
        start_step: int = 0,
    ) -> None:
        self.out, self.ranks, self.metrics, self.featuriser = out, ranks, metrics, featuriser
        self.args, self.every_s, self.every_steps, self.keep = args, every_s, every_steps, keep
        self.extra_files = extra_files
        self.last_time = time.monotonic()
        self.last_step = start_step
        self.published = 0
        self.latest: str | None = None
        self.best_accuracy: float | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None

    def due(self, step: int) -> bool:
        by_steps = self.every_steps is not None and step - self.last_step >= self.every_steps
        return by_steps or time.monotonic() - self.last_time >= self.every_s

    def consider(
        self,
        weights: dict[str, torch.Tensor],
        optimizer: resume.ResumeState,
        model_config: Any,
        step: int,
        validation: Dataset,
        watermark: dict[str, Any],
        final: bool,
    ) -> None:
        """Publish `weights` (with the optimizer state taken with them) unless they do worse."""
        self.last_time, self.last_step = time.monotonic(), step
        candidate = self._student(weights, model_config)
        accuracy = validation_accuracy(candidate, validation, self.featuriser)
        previous = None
        if self.best_weights is not None:
            before = self._student(self.best_weights, model_config)
            previous = validation_accuracy(before, validation, self.featuriser)
        dropped = accuracy is not None and previous is not None and accuracy < previous
        self.metrics.log({"step": step, "validation_accuracy": accuracy, "published": not dropped})
        if dropped:
            self.ranks.say(
                f"step {step}: held-out accuracy {accuracy:.3f} < {previous:.3f}; not published"
            )
            return
        path = checkpoint.publish(
            self.out,
            candidate,
            step=step,
            args=self.args,
            watermark=watermark,
            metrics={"validation_accuracy": accuracy, "final": final},
            keep=self.keep,
            extra_files=self._extra_files,
        )
        optimizer.version = path.name
        resume.save(self.out, optimizer)
        self.published += 1
        self.latest = path.name
        self.best_accuracy, self.best_weights = accuracy, weights
        acc = "n/a" if accuracy is None else f"{accuracy:.3f}"
        self.ranks.say(f"published {path} (step {step}, held-out accuracy {acc})")

    def _student(self, weights: dict[str, torch.Tensor], model_config: Any) -> Student:
        model = Student(self.featuriser.config, model_config)
        model.load_state_dict(weights)
        return model

    def _extra_files(self, directory: Path, name: str, model: Student) -> None:
        self.metrics.plot(directory / "learning_curves.png")
        for add in self.extra_files:
            add(directory, name, model)
