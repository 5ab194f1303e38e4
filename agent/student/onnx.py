"""The one onnxruntime runner: an exported student on a robot or in the runtime, without torch.

numpy + onnxruntime + the torch-free featuriser only. The `.onnx` file
carries everything (`python -m export` puts the featuriser's config, the
model version and the source version's weights hash in its metadata, under
the keys below), so a robot needs that one file. Used by `agent serve
--backend onnx` and by `examples/edge_robot.py` (as
`envs.rollout.LocalPolicy(OnnxRunner(path))`).

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
from agent.student.features import FeatureConfig, Featuriser, check_warm_up, choose

# the ONNX metadata keys `python -m export` writes and this runner reads
META_FEATURES = "embodied_agent.features"
META_MODEL = "embodied_agent.model"
META_VERSION = "embodied_agent.version"
META_SOURCE = "embodied_agent.source_sha256"
META_OUTPUTS = "embodied_agent.outputs"


class EdgeError(RuntimeError):
    """An ONNX file that cannot be run as a student (not ours, bad metadata, bad outputs)."""


def session(path: str | Path, providers: Sequence[str] | None = None, threads: int = 1) -> Any:
    """An onnxruntime session on `providers` (CPU by default); EdgeError where it cannot be made."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = list(providers or ["CPUExecutionProvider"])
    missing = [p for p in wanted if p not in available]
    if missing:
        raise EdgeError(f"execution providers {missing} are not available here; have {available}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=wanted)
    except Exception as exc:  # onnxruntime raises its own types for bad files
        raise EdgeError(f"{path}: onnxruntime cannot load it ({exc})") from exc


class OnnxRunner:
    """An exported student as an onnxruntime session: observations in, decisions out."""

    def __init__(
        self, path: str | Path, providers: Sequence[str] | None = None, threads: int = 1
    ) -> None:
        self.path = Path(path)
        self.session = session(self.path, providers, threads)
        meta = self.session.get_modelmeta().custom_metadata_map
        if META_FEATURES not in meta:
            raise EdgeError(
                f"{self.path} has no {META_FEATURES} metadata (not exported by `python -m export`)"
            )
        try:
            self.featuriser = Featuriser(FeatureConfig.from_json(meta[META_FEATURES]))
        except (TypeError, ValueError) as exc:
            raise EdgeError(f"{self.path}: bad featuriser metadata ({exc})") from exc
        self.model_version = meta.get(META_VERSION, "?")
        self.source_sha256 = meta.get(META_SOURCE, "")
        self.outputs = [o.name for o in self.session.get_outputs()]
        if self.outputs[0] != "scores":
            raise EdgeError(f"{self.path}: first output is {self.outputs[0]!r}, not 'scores'")
        self.providers = self.session.get_providers()

    def run(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        out = self.session.run(None, arrays)
        return out[0], (out[1] if len(out) > 1 else None)

    def check(self, obs: Observation) -> None:
        """ValueError for an observation the student cannot take (cheap)."""
        self.featuriser.check(obs)

    def decide(self, observations: Sequence[Observation]) -> list[Decision]:
        scores, actions = self.run(self.featuriser(observations))
        return choose(scores, actions, observations)

    def warm_up(self, batch: int = 4) -> None:
        """A blank batch through the graph; EdgeError unless the outputs are finite."""
        try:
            check_warm_up(*self.run(self.featuriser.blank(batch)), str(self.path))
        except ValueError as exc:
            raise EdgeError(str(exc)) from None

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "version": self.model_version,
            "source_sha256": self.source_sha256,
            "providers": self.providers,
            "inputs": list(self.featuriser.input_names),
            "features": json.loads(self.featuriser.config.to_json()),
        }
