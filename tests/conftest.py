"""Shared test helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MUJOCO_GL", "egl")


def horovodrun(
    np_: int, script: Path, *args: str, timeout: float = 240
) -> subprocess.CompletedProcess:
    """Launch `script` on `np_` local ranks with Gloo; fail (never hang) after `timeout` s."""
    launcher = Path(sys.executable).with_name("horovodrun")
    cmd = [
        str(launcher),
        "-np",
        str(np_),
        "-H",
        f"localhost:{np_}",
        "--gloo",
        sys.executable,
        str(script),
        *args,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"horovodrun timed out after {timeout}s: {exc.stdout!r} {exc.stderr!r}")
    if proc.returncode != 0:
        pytest.fail(f"horovodrun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def run_horovod():
    return horovodrun
