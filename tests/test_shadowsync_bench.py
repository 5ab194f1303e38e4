"""The ShadowSync CTR benchmark: its pure parts, and the --quick mode end to end."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import shadowsync_ctr as bench  # noqa: E402


def test_plan_rotates_the_order():
    assert bench.plan(["a", "b", "c"], 2) == ["a", "b", "c", "b", "c", "a"]


def test_rows_aggregate_ranks_and_repeats():
    def run(algo, examples, seconds, ne, gap):
        stats = None if gap is None else {"sync_gap": gap, "comm_seconds": 0.5}
        return {
            "algo": algo,
            "examples": examples,
            "seconds": seconds,
            "ne": ne,
            "curve": [[1.0, ne]],
            "stats": stats,
        }

    rank0 = {
        "runs": [
            run("none", 100, 1.0, 0.9, None),
            run("s-ma", 100, 1.0, 0.8, 4.0),
            run("s-ma", 100, 2.0, 0.6, 2.0),
        ]
    }
    rank1 = {
        "runs": [
            run("none", 100, 2.0, None, None),
            run("s-ma", 100, 1.0, None, 2.0),
            run("s-ma", 100, 1.0, None, 2.0),
        ]
    }
    rows, curves = bench.rows_for(2, [rank0, rank1], netem=False)
    none, ma = rows
    assert none["eps"] == 100.0 and none["sync_gap"] is None  # 200 examples / slowest 2 s
    assert ma["eps"] == 200.0  # best repeat: 200 examples in 1 s
    assert ma["ne"] == pytest.approx(0.7) and ma["sync_gap"] == 2.5 and ma["repeats"] == 2
    assert ma["eps_vs_none"] == 2.0
    assert curves["s-ma"] == [[1.0, 0.8]]


def test_normalised_entropy_of_the_base_rate_is_one():
    from shadowsync_ctr_worker import CTRConfig, GroundTruth, normalised_entropy

    data = GroundTruth(CTRConfig(rows=50)).sample(4000, seed=3)
    p = float(data.labels.mean())
    assert 0.05 < p < 0.95

    class BaseRate(torch.nn.Module):
        def forward(self, ids, dense):
            return torch.full((len(ids),), math.log(p / (1 - p)))

    assert normalised_entropy(BaseRate(), data, p) == pytest.approx(1.0, abs=1e-4)


def test_netem_without_tools_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # neither ip nor tc on it
    with pytest.raises(SystemExit, match="iproute2"), bench.network_namespace("100mbit"):
        pass


@pytest.mark.slow
@pytest.mark.horovod
@pytest.mark.timeout(400)
def test_quick_benchmark_rows_are_sane(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "shadowsync_ctr.py"),
            "--quick",
            "--json",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=360,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert {(r["algo"], r["trainers"]) for r in rows} == {("none", 1)} | {
        (a, 2) for a in bench.ALGOS
    }
    for row in rows:
        assert {"algo", "trainers", "eps", "ne", "sync_gap"} <= row.keys()
        assert math.isfinite(row["eps"]) and row["eps"] > 1000, row
        assert 0.5 < row["ne"] < 1.0, row  # every run learned something from the clicks
        if row["algo"] == "none":
            assert row["sync_gap"] is None
        elif row["algo"] == "sync-sgd":
            assert row["sync_gap"] == 1.0
        elif row["algo"].startswith("fr-"):
            assert row["sync_gap"] == 20.0
        else:
            assert row["sync_gap"] > 0
    for png in ("eps_vs_trainers.png", "ne_vs_time.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
