"""The student deciding in torch: a loaded, verified version that turns a batch into decisions.

`TorchStudent` is what the `policy` backend serves and what a local rollout
runs (`envs.rollout.LocalPolicy(TorchStudent.load(CKPT))`); the ONNX runner
(`agent.student.onnx.OnnxRunner`) is its torch-free twin with the same
methods: `check`, `decide`, `warm_up`, `model_version`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from agent.messages import Decision, Observation
from agent.student.checkpoint import load
from agent.student.features import Featuriser, check_warm_up, choose
from agent.student.modeling import Student


class TorchStudent:
    """A student version in memory: featurise, forward (inference mode), choose."""

    def __init__(self, model: Student, model_version: str) -> None:
        self.model = model.eval()
        self.featuriser = Featuriser(model.features)
        self.model_version = model_version

    @classmethod
    def load(cls, checkpoint: str | Path, threads: int | None = None) -> TorchStudent:
        """A verified version (CKPT/vNNNNNN, or CKPT's LATEST); CheckpointError if bad."""
        if threads is not None:
            torch.set_num_threads(threads)
        model, version = load(checkpoint)
        return cls(model, version.name)

    def check(self, obs: Observation) -> None:
        """ValueError for an observation the student cannot take (cheap)."""
        self.featuriser.check(obs)

    def outputs(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """Option scores (B, M) and actions (B, A) or None for featuriser arrays."""
        with torch.inference_mode():
            scores, actions = self.model(**{k: torch.from_numpy(v) for k, v in arrays.items()})
        return scores.numpy(), None if actions is None else actions.numpy()

    def decide(self, observations: Sequence[Observation]) -> list[Decision]:
        scores, actions = self.outputs(self.featuriser(observations))
        return choose(scores, actions, observations)

    def warm_up(self, batch: int = 4) -> None:
        """A blank batch through the model; ValueError unless every real output is finite."""
        scores, actions = self.outputs(self.featuriser.blank(batch))
        check_warm_up(scores, actions, f"version {self.model_version}")
