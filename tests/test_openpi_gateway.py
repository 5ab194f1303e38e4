"""The openpi WebSocket front door: metadata frame, msgpack-numpy in, action dict out, /healthz."""

import signal
import threading
import time
import urllib.request

import msgpack
import numpy as np
import pytest
from runtime_fixtures import (
    TEST_ENV,
    openpi_pack,
    running_server,
    serve_subprocess,
    stop_process,
    wait_ready,
)
from websockets.sync.client import connect

from agent import codec as C
from agent import protocol as P
from agent.backends.base import Backend
from agent.launch import free_port
from agent.messages import Decision
from agent.openpi_gateway import OpenpiGateway, openpi_observation
from agent.store import iter_episodes

pytestmark = pytest.mark.timeout(60)


def libero_observation(step=0):
    return {
        "observation/image": np.zeros((16, 16, 3), np.uint8),
        "observation/wrist_image": np.zeros((3, 16, 16), np.uint8),
        "observation/state": np.full(8, step, np.float64),
        "prompt": "open the drawer",
    }


class EchoStep(Backend):
    name = "echo"

    def __init__(self, env, model=None):
        super().__init__(env, model)
        self.sizes = []

    def decide(self, batch):
        self.sizes.append(len(batch))
        time.sleep(0.005)  # a call costs something, so concurrent robots pile up into batches
        return [
            Decision(action=np.full(4, obs.state[0], np.float32), reasoning="echo") for obs in batch
        ]


@pytest.fixture
def gateway():
    backend = EchoStep(TEST_ENV)
    with running_server(backend, batch_timeout_ms=50) as server:
        door = OpenpiGateway(server.endpoint, port=0)
        port = door.start()
        try:
            yield port, backend
        finally:
            door.stop()


def test_openpi_observation_mapping():
    fields = openpi_observation(libero_observation(step=2))
    assert set(fields["images"]) == {"image", "wrist_image"}
    assert fields["images"]["wrist_image"].shape == (16, 16, 3)
    assert fields["state"].dtype == np.float32 and fields["state"][0] == 2
    assert fields["instruction"] == "open the drawer"


def test_openpi_client_round_trip(gateway):
    port, _ = gateway
    with connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None) as ws:
        metadata = C.unpackb(ws.recv())
        assert metadata["protocol"] == P.PROTOCOL_VERSION and metadata["backend"] == "echo"
        for step in range(3):
            ws.send(msgpack.packb(libero_observation(step), default=openpi_pack))
            action = C.unpackb(ws.recv())
            assert action["actions"].shape == (1, 4) and action["actions"][0, 0] == step
            assert action["reasoning"] == "echo" and "infer_ms" in action["server_timing"]
        assert "prev_total_ms" in action["server_timing"]


def test_errors_are_text_frames_and_the_connection_stays_open(gateway):
    port, _ = gateway
    with connect(f"ws://127.0.0.1:{port}", compression=None) as ws:
        ws.recv()
        ws.send(b"\xc1 not msgpack")
        error = ws.recv()
        assert isinstance(error, str) and "Error in inference server" in error
        ws.send(msgpack.packb(libero_observation(5), default=openpi_pack))
        assert C.unpackb(ws.recv())["actions"][0, 0] == 5


def test_healthz(gateway):
    port, _ = gateway
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
        assert response.status == 200 and response.read() == b"OK\n"


def test_openpi_robots_share_the_batching_scheduler(gateway):
    port, backend = gateway
    barrier = threading.Barrier(4)
    errors = []

    def robot():
        try:
            with connect(f"ws://127.0.0.1:{port}", compression=None) as ws:
                ws.recv()
                barrier.wait(10)
                for step in range(5):
                    ws.send(msgpack.packb(libero_observation(step), default=openpi_pack))
                    assert C.unpackb(ws.recv())["actions"][0, 0] == step
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=robot) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and max(backend.sizes) > 1


def test_sigterm_with_an_open_openpi_robot_stops_promptly_and_records_it(tmp_path):
    port, ws_port = free_port(), free_port()
    server = serve_subprocess(
        port, "--env", "Pusher-v5", "--backend", "zero", "--openpi-port", str(ws_port),
        "--record", str(tmp_path),
    )  # fmt: skip
    try:
        wait_ready(f"tcp://127.0.0.1:{port}")
        with connect(f"ws://127.0.0.1:{ws_port}", compression=None, open_timeout=10) as ws:
            ws.recv(timeout=10)
            observation = {"observation/state": np.zeros(23, np.float32), "prompt": "push"}
            ws.send(msgpack.packb(observation, default=openpi_pack))
            assert C.unpackb(ws.recv(timeout=10))["actions"].shape == (1, 7)
            started = time.monotonic()
            output = stop_process(server, signal.SIGTERM, timeout=30)
            assert time.monotonic() - started < 10, output  # not the gateway's 60 s timeouts
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
    assert "could not close openpi episode" not in output, output
    assert [e.meta["end_reason"] for e in iter_episodes(tmp_path)] == ["end"]


def test_serve_explains_a_busy_openpi_port(capsys):
    import socket

    from agent.cli import main as agent_main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        argv = ["serve", "--env", "Pusher-v5", "--bind", f"tcp://127.0.0.1:{free_port()}"]
        assert agent_main([*argv, "--openpi-port", str(busy.getsockname()[1])]) == 2
    assert "cannot start the openpi front door" in capsys.readouterr().err
