"""`agent doctor`: what this installation can do, checked rather than assumed."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def _version(module: str) -> str | None:
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:
        return None


def horovod_build() -> dict[str, bool]:
    """Frameworks and controllers that `horovodrun --check-build` reports as built."""
    launcher = shutil.which("horovodrun") or str(Path(sys.executable).with_name("horovodrun"))
    try:
        out = subprocess.run(
            [launcher, "--check-build"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {
        line.split("]", 1)[1].strip(): line.strip().startswith("[X]")
        for line in out.splitlines()
        if line.strip().startswith("[")
    }


def collect() -> dict:
    info: dict = {"python": sys.version.split()[0]}
    for module in (
        "numpy",
        "zmq",
        "msgpack",
        "gymnasium",
        "mujoco",
        "torch",
        "transformers",
        "onnxruntime",
        "horovod",
    ):
        info[module] = _version(module)
    torch = sys.modules.get("torch")
    info["cuda"] = bool(torch and torch.cuda.is_available())
    info["horovod_build"] = horovod_build()
    info["mujoco_gl"] = os.environ.get("MUJOCO_GL")
    return info


def report(as_json: bool = False) -> int:
    info = collect()
    build = info["horovod_build"]
    ok = bool(build.get("PyTorch") and build.get("Gloo"))
    if as_json:
        print(json.dumps({**info, "ok": ok}))
    else:
        for key, value in info.items():
            print(f"{key:>14}: {value}")
        print("ok" if ok else "Horovod is missing PyTorch or Gloo: run scripts/bootstrap.sh")
    return 0 if ok else 1
