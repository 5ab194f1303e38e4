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
@pytest.mark.timeout(600)
def test_transport_benchmark_compares_the_runtime_with_openpi_and_zeromq():
    result = run_json(
        "benchmarks/transport.py", "--clients", "2", "--seconds", "0.5", "--rounds", "1",
        "--json", timeout=560,
    )  # fmt: skip
    medians = result["medians"]["2"]
    assert medians["runtime"]["decisions"] > 0 and medians["runtime"]["errors"] == 0
    assert medians["echo"]["decisions"] > 0
    if result["openpi"] in ("installed", "cached"):  # the real peer, from the registry
        assert medians["openpi"]["decisions"] > 0
        assert medians["ratios"]["decisions_runtime_over_openpi"] > 0
    else:
        assert result["openpi"].startswith("could not install"), result["openpi"]
    assert result["profile_us"]["server_parse_and_validate"] > 0


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


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_learning_benchmark_runs_every_stage(tmp_path):
    result = run_json(
        "benchmarks/learning.py", "--quick", "--out", str(tmp_path), "--json", timeout=560
    )
    (row,) = result["sizes"]
    assert set(row["student"]) == set(result["tasks"]) == set(result["oracle"])
    assert all(r["success"] == 1.0 for r in result["oracle"].values())
    assert set(result["sync"]) == {"1xnone", "2xnone", "2xma"}
    assert all(r["samples_per_s"] > 0 for r in result["sync"].values())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dagger_benchmark_runs_rounds_and_the_escalation_curve(tmp_path):
    result = run_json(
        "benchmarks/dagger.py", "--quick", "--out", str(tmp_path), "--json", timeout=560
    )
    assert [r["round"] for r in result["rounds"]] == [0, 1]
    assert [r["teacher_labelled_episodes_per_task"] for r in result["rounds"]] == [3, 5]
    assert [r["beta"] for r in result["rounds"]] == [1.0, 0.5]  # the oracle, then mixing
    (collected,) = result["rounds"][1]["collected"].values()
    assert collected["decisions"] > 0 and 0.0 <= collected["teacher_acted"] <= 1.0
    (point,) = result["escalation"]
    assert 0.0 <= point["escalation_rate"] <= 1.0


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_hot_reload_benchmark_swaps_and_refuses_corrupt_versions():
    result = run_json(
        "benchmarks/hot_reload.py", "--robots", "4", "--versions", "6", "--every-s", "0.3", "--json",
        timeout=360,
    )  # fmt: skip
    assert result["version_swaps"] >= 3 and result["versions_refused"] == 3
    assert result["corrupt_served"] == []
    swaps = result["with_swaps"]
    assert swaps["lost"] == swaps["failed"] == swaps["mismatched"] == 0


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_edge_benchmark_compares_torch_and_onnx(trained, recorded):
    result = run_json(
        "benchmarks/edge.py", "--checkpoint", str(trained), "--episodes", str(recorded),
        "--seeds", "2", "--repeats", "10", "--rounds", "1", "--tasks", "tabletop/Push-v0", "--json",
        timeout=360,
    )  # fmt: skip
    assert {"torch_eager", "ort_fp32"} <= set(result["speed"])
    assert result["export"]["parity_max_abs_diff"] <= 1e-4
    assert result["success"]["ort_fp32"] == result["success"]["torch_eager"]
    int8_goals = [v for k, v in result["goals"].items() if k.startswith("int8")]
    assert len(int8_goals) == 2 and (all(int8_goals) or result["why"])  # a miss says why


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cosmos_posttrain_benchmark_runs_every_stage(tmp_path):
    result = run_json(
        "benchmarks/cosmos_posttrain.py", "--quick", "--json", "--out", str(tmp_path),
        timeout=560,
    )  # fmt: skip
    assert set(result["runs"]) == {"sft", "grpo_early"}
    assert result["runs"]["sft"]["ranks"] == 2 and result["runs"]["sft"]["steps"] > 0
    for name in ("before", "sft", "grpo_early"):
        assert set(result["accuracy"][name]) >= {"with_history", "camera_only", "image_zeroed"}
    assert result["accuracy"]["before"]["with_history"]["parse_rate"] < 0.5  # a random model
    loop = result["closed_loop"]["sft"]["tabletop/PickPlace-v0"]
    assert loop["decisions"] > 0 and 0 <= loop["success"] <= 1
    assert result["latency_8_robots"]["p50_ms"] > 0
    assert Path(result["curves"]).is_file()
