"""Horovod really works: the patched build, Gloo, named collectives from a thread."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

MP = Path(__file__).parent / "mp"


def test_check_build_lists_pytorch_and_gloo():
    launcher = Path(sys.executable).with_name("horovodrun")
    out = subprocess.run(
        [str(launcher), "--check-build"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "[X] PyTorch" in out
    assert "[X] Gloo" in out


@pytest.mark.horovod
def test_named_allreduce_from_background_thread(tmp_path, run_horovod):
    run_horovod(2, MP / "named_allreduce.py", str(tmp_path))
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, rec in enumerate(records):
        assert rec["rank"] == rank and rec["size"] == 2
        assert rec["sum"] == [3.0] * 1000  # (0 + 1) + (1 + 1)
        assert rec["avg"] == pytest.approx(0.5)
