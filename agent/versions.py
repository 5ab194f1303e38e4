"""The one version format for every model: immutable, verified versions under one directory.

    ROOT/
      LATEST              the newest complete version's name ("v000007"), replaced atomically
      v000007/            one version: whatever files its model writes (a student's
        manifest.json     safetensors + config, a `save_pretrained` folder, an ONNX file)
        ...               and a manifest: the sha256 of every other file, the model's
                          kind, the training step and arguments, data watermark, metrics
      .tmp/               versions being written (never read)

Generic over what a version holds: a model family (`agent.student.checkpoint`,
Cosmos-Reason's checkpoints) passes `publish` a function that writes its
files, and reads its files back from a `Version` that `read` has verified.
A version is written into `.tmp/`, every file fsynced, renamed into place,
the directory fsynced, and only then `LATEST` replaced, so a reader (or a
writer killed at any moment) only ever sees complete versions. Reading
verifies every hash (and refuses links and paths that leave the version)
before any file is used. stdlib only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from agent.files import move_into_place, sha256, write_text_atomically

FORMAT = "embodied-agent.version/1"
MANIFEST, LATEST, TMP = "manifest.json", "LATEST", ".tmp"
_NAME = re.compile(r"v(\d{6})")


class VersionError(ValueError):
    """A version that must not be used (missing, incomplete, tampered with, another model's)."""


@dataclass(frozen=True)
class Version:
    """A verified version on disk: its files match its manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def kind(self) -> str | None:
        """Which model family wrote it (None: written before versions named their kind)."""
        return self.manifest.get("kind")

    @property
    def files(self) -> dict[str, str]:
        return self.manifest["files"]


def is_version_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def version_names(root: str | Path) -> list[str]:
    """Complete versions under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if is_version_name(p.name) and p.is_dir())


def latest_name(root: str | Path) -> str | None:
    """What `root/LATEST` names, or None (cheap: for polling)."""
    try:
        name = (Path(root) / LATEST).read_text().strip()
    except OSError:
        return None
    return name if is_version_name(name) else None


def is_version(path: str | Path) -> bool:
    """Whether `path` is one version (rather than a root of versions)."""
    return (Path(path) / MANIFEST).is_file()


def resolve(path: str | Path) -> Path:
    """A version directory: `path` itself, or the one `path/LATEST` names."""
    path = Path(path)
    if is_version(path):
        return path
    pointer = path / LATEST
    if not pointer.is_file():
        raise VersionError(f"{path} is neither a version nor holds a {LATEST} file")
    name = pointer.read_text().strip()
    if not is_version_name(name):
        raise VersionError(f"{pointer} names {name[:40]!r}, not a version")
    return path / name


def read(path: str | Path, kind: str | None = None) -> Version:
    """Verify a version (or `path/LATEST`'s): manifest, every hash, and its `kind` if given."""
    path = resolve(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise VersionError(f"{path}: cannot read its manifest ({exc})") from exc
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise VersionError(f"{path}: the manifest lists no files")
    found = manifest.get("kind")
    if kind is not None and found is not None and found != kind:
        raise VersionError(f"{path} holds a {found!r} model, not a {kind!r} one")
    for name, digest in files.items():
        file = _inside(path, name)
        if file.is_symlink() or not file.is_file():
            raise VersionError(f"{path}: {name} is listed in the manifest but missing")
        if sha256(file) != digest:
            raise VersionError(f"{path}: {name} does not match its sha256 in the manifest")
    return Version(path, manifest)


def _inside(root: Path, name: Any) -> Path:
    """`root/name` for a manifest entry that names a plain relative path, else VersionError."""
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if not parts or parts[0] == "/" or ".." in parts or name == MANIFEST:
        raise VersionError(f"{root}: the manifest lists {str(name)[:60]!r}, not a file inside it")
    return root.joinpath(*parts)


def publish(
    root: str | Path,
    write: Callable[[Path, str], None],
    *,
    kind: str,
    step: int,
    args: dict[str, Any] | None = None,
    watermark: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    keep: int = 5,
) -> Path:
    """Write the next version under `root` with `write(directory, name)`, then point LATEST at it.

    `write` fills `directory` (a fresh folder in `root/.tmp/`) with the
    model's files, subfolders allowed; `name` is the version being written.
    Every file is hashed into the manifest with `kind` (the model family),
    `step`, `args` (how it was trained), `watermark` (which data) and
    `metrics`. Keeps the newest `keep` versions (at least the published one).
    Returns the version's path.
    """
    root = Path(root)
    names = version_names(root)
    number = int(names[-1][1:]) + 1 if names else 1
    name = f"v{number:06d}"
    work = root / TMP / f"{name}.{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        write(work, name)
        files = {
            p.relative_to(work).as_posix(): sha256(p)
            for p in sorted(work.rglob("*"))
            if p.is_file() and not p.is_symlink()
        }
        manifest = {
            "format": FORMAT,
            "version": name,
            "kind": kind,
            "files": files,
            "step": step,
            "args": args or {},
            "watermark": watermark or {},
            "metrics": metrics or {},
            "created_at": time.time(),
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        move_into_place(work, root / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_text_atomically(root / LATEST, name + "\n", tmp_dir=root / TMP)
    for old in version_names(root)[: -max(1, keep)]:
        shutil.rmtree(root / old, ignore_errors=True)
    return root / name


def remove_stale_tmp(root: str | Path) -> None:
    """Versions a killed writer was writing are never versions; clear them."""
    shutil.rmtree(Path(root) / TMP, ignore_errors=True)
