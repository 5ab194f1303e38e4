"""The one checkpoint format: immutable, verified versions of the student under one directory.

    CKPT/
      LATEST                  the newest complete version's name ("v000007"), replaced atomically
      v000007/
        model.safetensors     the weights (safetensors: tensors only, loading runs no code)
        config.json           format, featuriser and model configs
        manifest.json         sha256 of every other file, training step, data watermark, metrics
        learning_curves.png   (and policy.onnx when the trainer exports too)
      .tmp/                   versions being written (never read)

A version is written into `.tmp/`, every file fsynced, renamed into place,
the directory fsynced, and only then `LATEST` replaced, so a reader (or a
trainer killed at any moment) only ever sees complete versions. Loading
verifies every hash and the exact parameter names and shapes before any
weight is used. torch is imported only where tensors are read or written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.features import FeatureConfig

if TYPE_CHECKING:
    from trainer.model import ModelConfig, Student

FORMAT = "embodied-agent.student/1"
WEIGHTS, CONFIG, MANIFEST, LATEST = "model.safetensors", "config.json", "manifest.json", "LATEST"
TMP = ".tmp"
_VERSION = re.compile(r"v(\d{6})")


class CheckpointError(ValueError):
    """A checkpoint that must not be loaded (missing, incomplete, tampered with, incompatible)."""


@dataclass(frozen=True)
class Version:
    """A verified version on disk (its files match its manifest)."""

    path: Path
    features: FeatureConfig
    model: ModelConfig
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def version_names(root: Path) -> list[str]:
    """Complete versions under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if _VERSION.fullmatch(p.name) and p.is_dir())


def resolve(path: str | Path) -> Path:
    """A version directory: `path` itself, or the one `path/LATEST` names."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    pointer = path / LATEST
    if not pointer.is_file():
        raise CheckpointError(f"{path} is neither a checkpoint version nor holds a {LATEST} file")
    name = pointer.read_text().strip()
    if not _VERSION.fullmatch(name):
        raise CheckpointError(f"{pointer} names {name[:40]!r}, not a version")
    return path / name


def latest_name(root: str | Path) -> str | None:
    """What `root/LATEST` names, or None (cheap: for polling)."""
    try:
        name = (Path(root) / LATEST).read_text().strip()
    except OSError:
        return None
    return name if _VERSION.fullmatch(name) else None


def read_version(path: str | Path) -> Version:
    """Check a version's manifest and hashes and parse its configs; CheckpointError if bad."""
    from trainer.model import ModelConfig

    path = resolve(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        config = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read the manifest or config ({exc})") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        raise CheckpointError(
            f"{path}: checkpoint format {found!r} is not {FORMAT!r} (written by another version)"
        )
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or WEIGHTS not in files or CONFIG not in files:
        raise CheckpointError(f"{path}: the manifest does not list {WEIGHTS} and {CONFIG}")
    for name, digest in files.items():
        file = path / name
        if "/" in name or not file.is_file():
            raise CheckpointError(f"{path}: {name} is listed in the manifest but missing")
        if sha256(file) != digest:
            raise CheckpointError(f"{path}: {name} does not match its sha256 in the manifest")
    try:
        features = FeatureConfig.from_json(json.dumps(config["features"]))
        model = ModelConfig.from_json(json.dumps(config["model"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad featuriser or model config ({exc})") from exc
    return Version(path, features, model, manifest)


def load(path: str | Path, device: str = "cpu") -> tuple[Student, Version]:
    """The verified student of a version (or of `path/LATEST`), in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from trainer.model import Student

    version = read_version(path)
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


def weights_digest(state_dict: dict[str, Any]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (equal digests: equal weights)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def publish(
    root: str | Path,
    model: Student,
    *,
    step: int,
    watermark: dict[str, Any],
    metrics: dict[str, Any],
    keep: int = 5,
    extra_files: Callable[[Path, Student], None] | None = None,
) -> Path:
    """Write `model` as the next version under `root`, then point LATEST at it; returns it.

    `extra_files(directory, model)` may add files (a plot, an ONNX export) to
    the version before it is hashed and published. Keeps the newest `keep`
    versions (at least the published one).
    """
    from safetensors.torch import save_file

    root = Path(root)
    names = version_names(root)
    number = int(names[-1][1:]) + 1 if names else 1
    name = f"v{number:06d}"
    work = root / TMP / f"{name}.{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(work / WEIGHTS))
        config = {
            "format": FORMAT,
            "features": json.loads(model.features.to_json()),
            "model": json.loads(model.config.to_json()),
        }
        (work / CONFIG).write_text(json.dumps(config, indent=1, sort_keys=True))
        if extra_files is not None:
            extra_files(work, model)
        files = {p.name: sha256(p) for p in sorted(work.iterdir()) if p.is_file()}
        manifest = {
            "version": name,
            "files": files,
            "step": step,
            "watermark": watermark,
            "metrics": metrics,
            "created_at": time.time(),
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        for p in work.iterdir():
            _fsync(p)
        _fsync(work)
        os.replace(work, root / name)
        _fsync(root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    pointer = root / TMP / f"{LATEST}.{os.getpid()}"
    pointer.write_text(name + "\n")
    _fsync(pointer)
    os.replace(pointer, root / LATEST)
    _fsync(root)
    for old in version_names(root)[: -max(1, keep)]:
        shutil.rmtree(root / old, ignore_errors=True)
    return root / name


def remove_stale_tmp(root: str | Path) -> None:
    """Versions a killed trainer was writing are never versions; clear them."""
    shutil.rmtree(Path(root) / TMP, ignore_errors=True)
