"""`make demo` runs examples/demo.py: run its quick setting end to end and check what it reports."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = {
    "oracle_success",
    "student_success",
    "edge_success",
    "episodes_recorded",
    "versions_published",
    "escalation_rate",
    "seconds",
}


@pytest.mark.slow
@pytest.mark.horovod
@pytest.mark.timeout(900)
def test_the_quick_demo_runs_every_stage(tmp_path):
    """Real servers, real horovodrun with ShadowSync, real onnxruntime with torch unimportable."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=840,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) >= KEYS
    for key in ("oracle_success", "student_success", "edge_success"):
        assert set(result[key]) == {"PickPlace", "Stack", "mean"}
    assert result["oracle_success"]["mean"] == 1.0
    # the student beats random menu choices by a wide margin, through the runtime and on the edge
    assert result["student_success"]["mean"] >= result["random_success"]["mean"] + 0.4
    assert result["edge_success"] == result["student_success"]
    assert result["versions_published"] >= 1 and result["shadowsync_rounds"] > 0
    assert 0.0 <= result["escalation_rate"] <= 1.0
    for stage in ("teach", "learn", "take over", "evaluate", "deploy", "report"):
        assert f"{stage}:" in proc.stdout
    for name in ("learning_curve.png", "contact_sheet.png", "policy.onnx"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "ckpt" / "LATEST").exists() and list((tmp_path / "episodes").iterdir())
    assert (tmp_path / "logs" / "take-over-Stack.log").read_text().count("[serve]") >= 1
