"""Server restarts and a soak run, with real `agent serve` processes."""

import json
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
from runtime_fixtures import ROOT, serve_subprocess, stop_process, wait_ready

from agent.client import AgentClient
from agent.launch import free_port


@pytest.mark.timeout(120)
def test_clients_survive_a_server_restart_without_mismatched_replies():
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    args = ("--env", "Pusher-v5", "--backend", "zero")
    server = serve_subprocess(port, *args)
    try:
        wait_ready(endpoint)
        with AgentClient(endpoint, timeout_ms=300, retries=60) as client:
            for step in range(60):
                if step == 30:  # the server dies mid-run; a new one takes its place 1 s later
                    server.kill()
                    server.communicate(timeout=20)
                    restarted: list = []
                    later = threading.Timer(
                        1.0, lambda into=restarted: into.append(serve_subprocess(port, *args))
                    )
                    later.start()
                reply = client.decide(  # meanwhile: timeouts (300 ms), reconnects, retries
                    episode_id="long-run", step=step, state=np.full(23, step, np.float32)
                )
                if step == 30:
                    later.join()
                    server = restarted[0]
                assert (reply.episode_id, reply.step) == ("long-run", step)
                assert reply.decision.action.shape == (7,)
            assert client.reconnects >= 1
    finally:
        stop_process(server, signal.SIGTERM)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_soak_32_robots_nothing_lost_or_mismatched_memory_flat():
    proc = subprocess.run(
        [sys.executable, "benchmarks/soak.py", "--robots", "32", "--seconds", "4", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["lost"] == 0 and result["mismatched"] == 0
    assert result["received"] == result["sent"] > 32 * 10
    assert result["rss_growth_mb"] < 25, result


@pytest.mark.timeout(120)
def test_serve_explains_a_busy_port_and_an_unknown_env():
    port = free_port()
    first = serve_subprocess(port, "--env", "Pusher-v5")
    try:
        wait_ready(f"tcp://127.0.0.1:{port}")
        second = serve_subprocess(port, "--env", "Pusher-v5")
        out, _ = second.communicate(timeout=60)
        assert second.returncode == 2 and "cannot listen" in out and "in use" in out
    finally:
        stop_process(first, signal.SIGTERM)
    unknown = serve_subprocess(free_port(), "--env", "Nope-v9")
    out, _ = unknown.communicate(timeout=60)
    assert unknown.returncode == 2 and "cannot make env 'Nope-v9'" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-batch", "0"], "max batch must be >= 1"),
        (["--batch-timeout-ms", "-1"], "batch timeout must be >= 0"),
        (["--max-message-mb", "0"], "max message size"),
        (["--episode-timeout-s", "0"], "episode timeout must be > 0"),
        (["--record", "/proc/no-such-dir/episodes"], "cannot record to"),
    ],
)
def test_serve_refuses_bad_settings_with_a_clear_message(args, message, capsys):
    from agent.cli import main as agent_main

    argv = ["serve", "--env", "Pusher-v5", "--bind", f"tcp://127.0.0.1:{free_port()}", *args]
    assert agent_main(argv) == 2
    assert message in capsys.readouterr().err
