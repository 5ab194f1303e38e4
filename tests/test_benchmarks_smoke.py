"""The benchmark scripts the docs quote still run (tiny sizes; their numbers are not checked here)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_json(*args: str, timeout: float = 240) -> dict:
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout.strip()
    return json.loads(out if out.startswith("{") else out.splitlines()[-1])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_transport_benchmark_reports_both_servers():
    result = run_json("benchmarks/transport.py", "--clients", "1,2", "--seconds", "0.5", "--json")
    assert [row["clients"] for row in result["runtime"]] == [1, 2]
    assert all(row["decisions"] > 0 and row["errors"] == 0 for row in result["runtime"])
    assert [row["clients"] for row in result["openpi_style_same_run"]] == [1, 2]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_batching_benchmark_compares_batch_sizes():
    result = run_json(
        "benchmarks/batching.py", "--robots", "4", "--seconds", "0.5", "--rounds", "1", "--json"
    )
    (round_,) = result["rounds"]
    assert round_["max_batch_1"]["mean_batch"] == 1.0
    assert round_["max_batch_1"]["mismatched"] == round_["max_batch_4"]["mismatched"] == 0
    assert result["speedup_median"] > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_envs_speed_benchmark_measures_physics_ratio():
    result = run_json(
        "benchmarks/envs_speed.py",
        "--env",
        "tabletop/Push-v0",
        "--steps",
        "100",
        "--frames",
        "5",
        "--rounds",
        "2",
    )
    push = result["results"]["tabletop/Push-v0"]
    assert push["raw_mj_steps_per_s"] > 0 and push["env_steps_per_s"] > 0
    assert push["physics_ratio"] > 0 and push["render_fps_224"] > 0


def test_doctor_reports_a_working_horovod():
    agent = Path(sys.executable).with_name("agent")
    proc = subprocess.run(
        [str(agent), "doctor", "--json"], capture_output=True, text=True, timeout=120
    )
    info = json.loads(proc.stdout)
    assert proc.returncode == 0 and info["ok"]
    assert info["horovod_build"]["PyTorch"] and info["horovod_build"]["Gloo"]
