"""CURVE authentication: authorised robots are served, everyone else gets nothing."""

import numpy as np
import pytest
import zmq.auth
from runtime_fixtures import running_server

from agent.cli import main as agent_main
from agent.client import AgentClient, AgentTimeout
from agent.curve import CurveKeys, client_keys

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    directory = tmp_path_factory.mktemp("keys")
    assert agent_main(["keys", str(directory), "--client", "robot"]) == 0
    return directory


def test_keys_command_writes_an_authorised_pair(keys):
    assert (keys / "server.key_secret").exists() and (keys / "authorized" / "robot.key").exists()
    assert not (keys / "authorized" / "robot.key_secret").exists()
    for secret in ("server.key_secret", "robot.key_secret"):
        assert (keys / secret).stat().st_mode & 0o077 == 0, f"{secret} is readable by others"
    assert agent_main(["keys", str(keys), "--client", "server"]) == 2  # would replace its pair


def test_authorised_robot_is_served(keys):
    with (
        running_server(curve_dir=keys) as server,
        AgentClient(server.endpoint, timeout_ms=5000, curve=client_keys(keys, "robot")) as client,
    ):
        assert client.decide(episode_id="e", step=0, state=np.zeros(3, np.float32)).step == 0


def test_unauthorised_robots_get_nothing(keys, tmp_path):
    _, secret = zmq.auth.create_certificates(tmp_path, "intruder")
    pub, sec = zmq.auth.load_certificate(secret)
    server_public, _ = zmq.auth.load_certificate(keys / "server.key")
    with running_server(curve_dir=keys) as server:
        stranger = CurveKeys(pub, sec, server_public)
        with (
            AgentClient(server.endpoint, timeout_ms=400, curve=stranger) as client,
            pytest.raises(AgentTimeout),
        ):
            client.hello()
        with AgentClient(server.endpoint, timeout_ms=400) as plain, pytest.raises(AgentTimeout):
            plain.hello()
        assert server.stats()["requests"] == 0
