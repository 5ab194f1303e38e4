"""A student version: what the trainer publishes and the runtime, exporter and edge read.

A student is one version in the generic format (`agent.versions`: immutable
`vNNNNNN/`, sha256 manifest, atomic `LATEST`) holding

    model.safetensors     the weights (safetensors: tensors only, loading runs no code)
    config.json           {"format": FORMAT, "features": {...}, "model": {...}}
    learning_curves.png   (the trainer's plot) and policy.onnx (with --export-onnx)

`read` verifies a version and parses its configs without torch (what the
runtime needs to decide whether to load it); `load` also checks the exact
parameter names and shapes before any weight is used. torch is imported only
where tensors are read or written.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import versions
from agent.student.config import ModelConfig
from agent.student.features import FeatureConfig

if TYPE_CHECKING:
    from agent.student.modeling import Student

KIND = "student"
FORMAT = "embodied-agent.student/1"
WEIGHTS, CONFIG, ONNX = "model.safetensors", "config.json", "policy.onnx"


class CheckpointError(versions.VersionError):
    """A student version that must not be loaded (missing, tampered with, incompatible)."""


@dataclass(frozen=True)
class StudentVersion:
    """A verified student version: its configs, parsed."""

    version: versions.Version
    features: FeatureConfig
    model: ModelConfig

    @property
    def path(self) -> Path:
        return self.version.path

    @property
    def name(self) -> str:
        return self.version.name

    @property
    def manifest(self) -> dict[str, Any]:
        return self.version.manifest


def read(path: str | Path) -> StudentVersion:
    """Verify a version (or `path/LATEST`'s) and parse its configs; CheckpointError if bad."""
    try:
        version = versions.read(path, KIND)
    except versions.VersionError as exc:
        raise CheckpointError(str(exc)) from None
    if WEIGHTS not in version.files or CONFIG not in version.files:
        raise CheckpointError(f"{version.path}: the manifest does not list {WEIGHTS} and {CONFIG}")
    try:
        config = json.loads((version.path / CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{version.path}: cannot read {CONFIG} ({exc})") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        raise CheckpointError(
            f"{version.path}: checkpoint format {found!r} is not {FORMAT!r} "
            "(written by another version)"
        )
    try:
        features = FeatureConfig.from_json(json.dumps(config["features"]))
        model = ModelConfig.from_json(json.dumps(config["model"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{version.path}: bad featuriser or model config ({exc})") from exc
    return StudentVersion(version, features, model)


def load(path: str | Path, device: str = "cpu") -> tuple[Student, StudentVersion]:
    """The verified student of a version (or of `path/LATEST`), in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from agent.student.modeling import Student

    version = read(path)
    model = Student(version.features, version.model)
    try:
        tensors = load_file(str(version.path / WEIGHTS), device=device)
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{version.path}: unreadable weights ({exc})") from exc
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))[:5]
        extra = sorted(set(found) - set(expected))[:5]
        wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])[:5]
        raise CheckpointError(
            f"{version.path}: parameters do not fit the model "
            f"(missing {missing}, unexpected {extra}, wrong shapes {wrong})"
        )
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval(), version


ExtraFiles = Callable[[Path, str, "Student"], None]


def publish(
    root: str | Path,
    model: Student,
    *,
    step: int,
    args: dict[str, Any] | None = None,
    watermark: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    keep: int = 5,
    extra_files: ExtraFiles | None = None,
) -> Path:
    """Publish `model` as the next student version under `root`; returns its path.

    `extra_files(directory, version_name, model)` may add files (a plot, an
    ONNX export) before the version is hashed and published.
    """
    from safetensors.torch import save_file

    def write(directory: Path, name: str) -> None:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS))
        config = {
            "format": FORMAT,
            "features": json.loads(model.features.to_json()),
            "model": json.loads(model.config.to_json()),
        }
        (directory / CONFIG).write_text(json.dumps(config, indent=1, sort_keys=True))
        if extra_files is not None:
            extra_files(directory, name, model)

    return versions.publish(
        root,
        write,
        kind=KIND,
        step=step,
        args=args,
        watermark=watermark,
        metrics=metrics,
        keep=keep,
    )
