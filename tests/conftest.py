"""Shared test helpers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MUJOCO_GL", "egl")


def horovodrun(
    np_: int, script: Path, *args: str, timeout: float = 240
) -> subprocess.CompletedProcess:
    """Launch `script` on `np_` local ranks with Gloo; fail (never hang) after `timeout` s.

    The launcher runs in its own session so a timeout kills the ranks too, not
    just horovodrun.
    """
    launcher = Path(sys.executable).with_name("horovodrun")
    cmd = [str(launcher), "-np", str(np_), "-H", f"localhost:{np_}", "--gloo"]
    cmd += [sys.executable, str(script), *args]
    popen = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        stdout, stderr = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(popen.pid, signal.SIGKILL)
        stdout, stderr = popen.communicate(timeout=30)
        pytest.fail(f"horovodrun timed out after {timeout}s:\n{stdout}\n{stderr}")
    if popen.returncode != 0:
        pytest.fail(f"horovodrun failed ({popen.returncode}):\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)


@pytest.fixture
def run_horovod():
    return horovodrun
