"""Durable files: the one atomic write (temp name, fsync, rename, fsync the directory) and sha256.

Everything the project says is "recorded" or "published" goes through
`write_atomically` or `move_into_place`: episode files (`agent.store`), model
versions and `LATEST` (`agent.versions`), ONNX exports, plots, the trainer's
resume state. A reader, or a process killed at any moment, sees the old file
or the new one, never a part; the directory fsync makes the rename itself
survive a power cut. stdlib only.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync(path: str | Path) -> None:
    """Flush a file's or a directory's contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_into_place(source: str | Path, target: str | Path) -> None:
    """Rename a fully written `source` (a file or a directory) to `target`, durably.

    `source` and everything in it is fsynced first, then renamed (atomic on
    one filesystem, replacing a file `target`), then `target`'s directory is
    fsynced.
    """
    source, target = Path(source), Path(target)
    if source.is_dir():
        for path in source.rglob("*"):
            fsync(path)
    fsync(source)
    os.replace(source, target)
    fsync(target.parent)


def write_atomically(
    path: str | Path, write: Callable[[Path], None], tmp_dir: str | Path | None = None
) -> None:
    """Call `write(tmp)` to fill a temporary file, then move it into `path` durably.

    The temporary file lives in `tmp_dir` (default: `path`'s directory, as a
    hidden name), which must be on the same filesystem; it is removed if
    `write` fails.
    """
    path = Path(path)
    folder = Path(tmp_dir) if tmp_dir is not None else path.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        write(tmp)
        move_into_place(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path: str | Path, text: str, tmp_dir: str | Path | None = None) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text), tmp_dir)


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_digest(state_dict: dict[str, Any]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (equal digests: equal weights)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()
