"""The one onnxruntime runner: an exported student on a robot or in the runtime, without torch.

numpy + onnxruntime + the torch-free featuriser only. The `.onnx` file
carries everything (`export.onnx_export` puts the featuriser's config, the
model version and the source checkpoint's hash in its metadata), so a robot
needs that one file. Used by `agent serve --backend onnx` and by
`examples/edge_robot.py` (through `EdgePolicy` and the one rollout loop).

Execution providers: `CPUExecutionProvider` everywhere; `CUDAExecutionProvider`
and `TensorrtExecutionProvider` where onnxruntime-gpu offers them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.messages import Decision, Observation
from trainer.features import FeatureConfig, Featuriser, choose

# the ONNX metadata keys `python -m export` writes
META_FEATURES = "embodied_agent.features"
META_MODEL = "embodied_agent.model"
META_VERSION = "embodied_agent.version"
META_SOURCE = "embodied_agent.source_sha256"
META_OUTPUTS = "embodied_agent.outputs"


class EdgeError(RuntimeError):
    """An ONNX file that cannot be run as a student (not ours, bad metadata, bad outputs)."""


class OnnxPolicyRunner:
    """An exported student as an onnxruntime session: observations in, decisions out."""

    def __init__(
        self, path: str | Path, providers: Sequence[str] | None = None, threads: int = 1
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        available = ort.get_available_providers()
        wanted = list(providers or ["CPUExecutionProvider"])
        missing = [p for p in wanted if p not in available]
        if missing:
            raise EdgeError(
                f"execution providers {missing} are not available here; have {available}"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=wanted)
        except Exception as exc:  # onnxruntime raises its own types for bad files
            raise EdgeError(f"{self.path}: onnxruntime cannot load it ({exc})") from exc
        meta = self.session.get_modelmeta().custom_metadata_map
        if META_FEATURES not in meta:
            raise EdgeError(
                f"{self.path} has no {META_FEATURES} metadata (not exported by `python -m export`)"
            )
        try:
            self.featuriser = Featuriser(FeatureConfig.from_json(meta[META_FEATURES]))
        except (TypeError, ValueError) as exc:
            raise EdgeError(f"{self.path}: bad featuriser metadata ({exc})") from exc
        self.version = meta.get(META_VERSION, "?")
        self.source_sha256 = meta.get(META_SOURCE, "")
        self.outputs = [o.name for o in self.session.get_outputs()]
        if self.outputs[0] != "scores":
            raise EdgeError(f"{self.path}: first output is {self.outputs[0]!r}, not 'scores'")
        self.providers = self.session.get_providers()

    def run(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        out = self.session.run(None, arrays)
        return out[0], (out[1] if len(out) > 1 else None)

    def decide(self, observations: Sequence[Observation]) -> list[Decision]:
        scores, actions = self.run(self.featuriser(observations))
        return choose(scores, actions, observations)

    def warm_up(self, batch: int = 4) -> None:
        """A blank batch through the graph; EdgeError unless the outputs are finite."""
        scores, actions = self.run(self.featuriser.blank(batch))
        if not np.isfinite(scores[:, :2]).all() or (
            actions is not None and not np.isfinite(actions).all()
        ):
            raise EdgeError(f"{self.path} gives non-finite outputs on a warm-up batch")

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "version": self.version,
            "source_sha256": self.source_sha256,
            "providers": self.providers,
            "inputs": list(self.featuriser.input_names),
            "features": json.loads(self.featuriser.config.to_json()),
        }


class EdgePolicy:
    """The ONNX student as a rollout-loop `Policy` on the robot itself: no server, no torch."""

    def __init__(
        self, path: str | Path, providers: Sequence[str] | None = None, threads: int = 1
    ) -> None:
        self.runner = OnnxPolicyRunner(path, providers, threads)
        self.model_version = self.runner.version
        self.episode_id = ""

    def start_episode(self, env: Any, episode_id: str, seed: int | None) -> None:
        self.episode_id = episode_id

    def decide(
        self, env: Any, obs: Any, info: dict[str, Any], *, reward: float | None, history: list[str]
    ) -> Decision:
        from envs.rollout import observation_fields

        observation = Observation(
            "edge", self.episode_id, len(history), **observation_fields(obs, info), history=history
        )
        (decision,) = self.runner.decide([observation])
        decision.decided_by = "onnx"
        return decision

    def end_episode(self, **_: Any) -> None:
        pass
