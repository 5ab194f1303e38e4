"""The issue's "Done when": `agent serve --env tabletop/PickPlace-v0` + examples/robot_loop.py,
as real processes, report the oracle's success through the runtime; recordings load back."""

import json
import signal
import subprocess
import sys

import pytest
from runtime_fixtures import ROOT, serve_subprocess, stop_process, wait_ready

from agent.launch import free_port
from agent.store import iter_episodes

ENV_ID = "tabletop/PickPlace-v0"


@pytest.mark.timeout(240)
def test_serve_and_robot_loop_reach_oracle_success(tmp_path):
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    server = serve_subprocess(port, "--env", ENV_ID, "--record", str(tmp_path))
    try:
        meta = wait_ready(endpoint)
        assert meta["env_id"] == ENV_ID and meta["backend"] == "oracle" and meta["has_skills"]
        loop = subprocess.run(
            [
                sys.executable,
                "examples/robot_loop.py",
                "--endpoint",
                endpoint,
                "--env",
                ENV_ID,
                "--robots",
                "2",
                "--episodes",
                "4",
                "--json",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=200,
        )
    finally:
        server_out = stop_process(server, signal.SIGTERM)
    assert loop.returncode == 0, loop.stdout + loop.stderr
    summary = json.loads(loop.stdout.strip().splitlines()[-1])
    assert set(summary) == {
        "success_rate",
        "episodes",
        "decisions",
        "p50_ms",
        "p99_ms",
        "decisions_per_s",
        "decided_by",
        "escalation_rate",
        "model_versions",
        "failed_seeds",
    }
    assert summary["decided_by"] == {"oracle": summary["decisions"]}
    assert summary["escalation_rate"] == 0.0 and summary["model_versions"] == ["0"]
    assert summary["failed_seeds"] == []
    assert sorted(e.meta["seed"] for e in iter_episodes(tmp_path)) == [0, 1, 2, 3]
    assert summary["episodes"] == 4 and summary["success_rate"] >= 0.95
    assert summary["decisions"] >= 8 and summary["p50_ms"] > 0 and summary["decisions_per_s"] > 0
    assert server.returncode == 0, server_out
    episodes = list(iter_episodes(tmp_path))
    assert len(episodes) == 4, server_out
    assert sum(len(e) for e in episodes) == summary["decisions"]
    assert all(e.success and e.meta["end_reason"] == "end" for e in episodes)
    assert episodes[0].images("image").shape[1:] == (224, 224, 3)
