"""ONNX export: the parity gate, metadata, int8, the onnx backend, and the torch-free edge robot."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from agent import versions
from agent.backends import EnvInfo, load_backend
from agent.launch import last_json, run_robots, serving
from agent.store import iter_episodes
from agent.student import checkpoint as ckpt
from agent.student.features import Featuriser
from agent.student.inference import TorchStudent
from agent.student.onnx import OnnxRunner
from envs.rollout import LocalPolicy, run_episode
from export import onnx_export

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[1]
ENV_ID = "tabletop/PickPlace-v0"


@pytest.fixture(scope="module")
def exported(trained, recorded, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "policy.onnx"
    report = onnx_export.export_checkpoint(trained, out, episodes=recorded)
    return out, report


def test_export_passes_the_parity_gate_and_carries_its_metadata(exported, trained):
    path, report = exported
    assert report.parity.max_abs_diff <= onnx_export.TOLERANCE
    assert report.parity.random_batches == [1, 3, 16]
    assert report.parity.recorded > 20 and report.parity.recorded_agreement == 1.0
    assert "dynamo=True" in report.exporter
    version = ckpt.read(trained)
    runner = OnnxRunner(path)
    assert runner.featuriser.config == version.features  # the one file is enough
    assert runner.model_version == version.name
    assert runner.source_sha256 == version.manifest["files"][ckpt.WEIGHTS]
    graph = onnx.load(str(path))
    assert [i.name for i in graph.graph.input] == list(Featuriser(version.features).input_names)
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8  # raw image
    batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # a dynamic batch axis


def test_the_gate_refuses_a_tampered_graph_and_writes_nothing(trained, tmp_path, monkeypatch):
    model, version = ckpt.load(trained)
    real_add_metadata = onnx_export._add_metadata

    def add_metadata_then_tamper(path, meta):
        real_add_metadata(path, meta)
        proto = onnx.load(str(path))
        weight = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))
        values = onnx.numpy_helper.to_array(weight).copy()
        values.flat[0] += 0.5  # a changed weight somewhere in the graph
        weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
        onnx.save(proto, str(path))

    monkeypatch.setattr(onnx_export, "_add_metadata", add_metadata_then_tamper)
    out = tmp_path / "policy.onnx"
    with pytest.raises(onnx_export.ExportError, match="max score difference"):
        onnx_export.export(model, out, version=version.name, source_sha256="x")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_int8_is_written_only_when_it_agrees(exported, recorded, trained, tmp_path):
    path, _ = exported
    featuriser = Featuriser(ckpt.read(trained).features)
    calibration = onnx_export.recorded_inputs(recorded, featuriser)
    report = onnx_export.quantize(path, tmp_path / "policy.int8.onnx", calibration)
    assert report["observations"] == len(calibration["option_mask"])
    assert 0.0 <= report["agreement"] <= 1.0 and report["size_bytes"] < report["fp32_size_bytes"]
    assert report["written"] == (report["agreement"] >= 0.99)
    assert (tmp_path / "policy.int8.onnx").exists() == report["written"]
    if report["written"]:
        assert OnnxRunner(tmp_path / "policy.int8.onnx").model_version == versions.latest_name(
            trained
        )


def test_the_export_command_prints_its_report(trained, recorded, tmp_path):
    out = tmp_path / "p.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "export", "--checkpoint", str(trained), "--out", str(out),
         "--episodes", str(recorded), "--json"],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["parity"]["max_abs_diff"] <= 1e-4 and out.exists()
    assert "parity: max score difference" in proc.stderr


def test_the_onnx_backend_serves_real_robots(exported, tmp_path):
    path, _ = exported
    with serving(ENV_ID, "--backend", "onnx", "--model", str(path), "--record", str(tmp_path)) as (
        endpoint,
        _,
    ):
        summary = run_robots(endpoint, ENV_ID, 4, seed=1000, robots=2)
    assert summary["episodes"] == 4 and summary["decided_by"] == {"onnx": summary["decisions"]}
    assert summary["model_versions"] == [OnnxRunner(path).model_version]
    rows = [r for e in iter_episodes(tmp_path) for r in e.table.to_pylist()]
    assert all(0 <= r["confidence"] <= 1 for r in rows)


def test_the_onnx_backend_reloads_a_newer_file(exported, tmp_path):
    path, _ = exported
    served = tmp_path / "policy.onnx"
    served.write_bytes(path.read_bytes())
    backend = load_backend("onnx", EnvInfo(ENV_ID, has_skills=True), str(served))
    assert backend.load_version() is None  # nothing new
    (tmp_path / "next.onnx").write_bytes(b"not onnx at all")
    (tmp_path / "next.onnx").replace(served)
    with pytest.raises(Exception, match="refused"):
        backend.load_version()
    assert backend.load_version() is None  # refused once, not retried
    (tmp_path / "next.onnx").write_bytes(path.read_bytes())
    (tmp_path / "next.onnx").replace(served)
    backend.swap(backend.load_version())
    assert backend.stats()["versions_refused"] == 1 and backend.stats()["versions_loaded"] == 2


def test_the_edge_robot_matches_the_torch_student_without_torch(exported, trained):
    path, _ = exported
    seeds = range(2000, 2008)
    import envs

    env = envs.make_skill_env(ENV_ID)
    torch_policy = LocalPolicy(TorchStudent.load(trained), "policy")
    torch_runs = [run_episode(env, torch_policy, seed) for seed in seeds]
    in_process = [
        run_episode(env, LocalPolicy(OnnxRunner(path), "onnx"), seed) for seed in seeds[:2]
    ]
    env.close()
    assert [r.skills for r in in_process] == [r.skills for r in torch_runs[:2]]
    code = (
        "import runpy, sys\n"
        "sys.modules['torch'] = None  # importing torch fails from here on\n"
        f"sys.argv = ['edge_robot.py', '--model', {str(path)!r}, '--env', {ENV_ID!r},\n"
        f"            '--episodes', '{len(seeds)}', '--seed', '{seeds[0]}', '--json']\n"
        f"runpy.run_path({str(ROOT / 'examples' / 'edge_robot.py')!r}, run_name='__main__')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=240, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout[-1000:] + proc.stderr[-2000:]
    summary = last_json(proc.stdout)
    assert summary["episodes"] == len(seeds) and summary["decided_by"] == {
        "onnx": summary["decisions"]
    }
    assert summary["success_rate"] == np.mean([bool(r.success) for r in torch_runs])
    assert summary["failed_seeds"] == [r.seed for r in torch_runs if not r.success]
    assert summary["decisions"] == sum(r.decisions for r in torch_runs)
    assert summary["providers"] == ["CPUExecutionProvider"]


def test_the_trainer_can_export_each_version(recorded, tmp_path):
    from agent.launch import run, trainer_command

    out = tmp_path / "ckpt"
    run(
        trainer_command(
            1, "--episodes", str(recorded), "--out", str(out), "--max-steps", "5",
            "--width", "32", "--export-onnx", "--json", "--quiet",
        ),
        timeout_s=240,
        what="trainer",
    )  # fmt: skip
    version = ckpt.read(out)  # the manifest hashes policy.onnx too
    assert ckpt.ONNX in version.manifest["files"]
    assert OnnxRunner(version.path / ckpt.ONNX).model_version == version.name
