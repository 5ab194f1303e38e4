"""Shared test helpers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.fixture(scope="session")
def recorded(tmp_path_factory):
    """Oracle episodes recorded by a real `agent serve` from real robot processes:
    10 of PickPlace (seeds 0-9) and 6 of Push (seeds 0-5), one subdirectory per env."""
    from agent.launch import run_robots, serving

    root = tmp_path_factory.mktemp("episodes")
    for env_id, n in (("tabletop/PickPlace-v0", 10), ("tabletop/Push-v0", 6)):
        with serving(env_id, "--record", str(root / env_id.split("/")[1])) as (endpoint, _):
            summary = run_robots(endpoint, env_id, n, seed=0, robots=2, timeout_s=240)
        assert summary["episodes"] == n
    return root


@pytest.fixture(scope="session")
def trained(recorded, tmp_path_factory):
    """A small student trained (one process, 250 steps) on `recorded`; its CKPT directory."""
    from agent.launch import run, trainer_command

    out = tmp_path_factory.mktemp("ckpt") / "student"
    cmd = trainer_command(
        1, "--episodes", str(recorded), "--out", str(out), "--max-steps", "250",
        "--width", "32", "--publish-every-s", "1e9", "--json", "--quiet",
    )  # fmt: skip
    run(cmd, timeout_s=300, what="the trainer")
    return out
