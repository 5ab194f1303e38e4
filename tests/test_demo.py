"""`make demo` runs examples/demo.py; run it small and check what it reports."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_demo_serves_robots_and_records(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "demo.py"),
            "--robots",
            "2",
            "--episodes",
            "4",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=540,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["episodes"] == 4
    assert result["recorded_episodes"] == 4
    assert result["success_rate"] >= 0.75
    assert result["recorded_steps"] == result["decisions"]
    assert len(list((tmp_path / "episodes").glob("*.parquet"))) == 4
