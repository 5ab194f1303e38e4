"""Real ZeroMQ sockets between AgentClient and Server: handshake, decisions, errors, batching."""

import threading
import time

import numpy as np
import pytest
import zmq
from runtime_fixtures import TEST_ENV, running_server

from agent import protocol as P
from agent.backends.base import Backend, BackendError, BadObservation
from agent.backends.zero import ZeroBackend
from agent.client import AgentClient, AgentTimeout, ServerError
from agent.envspec import ObservationSpec
from agent.messages import DecideRequest, Decision, EndedReply, Hello, HelloReply, Observation
from agent.server import Server, ServerConfig
from agent.store import iter_episodes

pytestmark = pytest.mark.timeout(60)


class SlowBackend(Backend):
    """Costs `delay_s` per call whatever the batch size; remembers batch sizes.

    Refuses observations whose instruction is `refuse` on receipt (`check`),
    and answers those whose instruction is `fail_on` with a BackendError alone.
    """

    name = "slow"

    def __init__(self, env, model=None, delay_s=0.02, fail_on=None, refuse=None):
        super().__init__(env, model)
        self.delay_s, self.fail_on, self.refuse, self.sizes = delay_s, fail_on, refuse, []

    def check(self, obs):
        if obs.instruction == self.refuse:
            raise BadObservation(f"cannot take {self.refuse!r}")

    def decide(self, batch):
        self.sizes.append(len(batch))
        time.sleep(self.delay_s)
        return [
            BackendError(f"cannot decide {self.fail_on!r}")
            if obs.instruction == self.fail_on
            else Decision(action=np.full(4, obs.step, np.float32))
            for obs in batch
        ]


def test_handshake_reports_metadata():
    with (
        running_server(max_batch=8) as server,
        AgentClient(server.endpoint, timeout_ms=5000) as client,
    ):
        meta = client.hello()
    assert meta["protocol"] == P.PROTOCOL_VERSION and meta["env_id"] == "test/Null-v0"
    assert meta["backend"] == "zero" and meta["max_batch"] == 8
    assert {"model_id", "model_version", "max_message_bytes", "batch_timeout_ms"} <= set(meta)


def test_decision_echoes_ids_and_reports_timing():
    with running_server() as server, AgentClient(server.endpoint, timeout_ms=5000) as client:
        reply = client.decide(
            episode_id="ep-a", step=4, state=np.zeros(3, np.float32), options=["go"]
        )
    assert (reply.episode_id, reply.step) == ("ep-a", 4)
    assert reply.decision.action.shape == (4,) and reply.decision.skill == "go"
    assert {"queue_ms", "inference_ms", "batch_size"} <= set(reply.timing)
    assert reply.model_id == "zero"


def test_errors_are_replies_and_server_stays_up():
    spec = ObservationSpec(state_shape=(3,))
    with (
        running_server(spec=spec) as server,
        AgentClient(server.endpoint, timeout_ms=5000) as client,
    ):
        with pytest.raises(ServerError) as err:
            client.decide(episode_id="e", step=0, state=np.zeros(5, np.float32))
        assert err.value.code == P.BAD_OBSERVATION and "shape (3,)" in err.value.message
        assert client.decide(episode_id="e", step=0, state=np.zeros(3, np.float32)).step == 0


def test_late_reply_is_never_taken_for_the_current_one():
    backend = SlowBackend(TEST_ENV, delay_s=0.4)
    with running_server(backend) as server, AgentClient(server.endpoint, timeout_ms=150) as client:
        with pytest.raises(AgentTimeout):
            client.decide(episode_id="e", step=1)
        client.timeout_ms = 5000
        reply = client.decide(episode_id="e", step=2)
    assert reply.step == 2 and reply.decision.action[0] == 2


def test_stale_replies_on_one_socket_are_skipped():
    """Two requests on one DEALER: asking with the second id returns only the second reply."""
    backend = SlowBackend(TEST_ENV, delay_s=0.05)
    with running_server(backend) as server, AgentClient(server.endpoint, timeout_ms=5000) as client:
        client._socket.send(P.encode(DecideRequest(999_999, Observation(client.robot_id, "e", 1))))
        reply = client.decide(episode_id="e", step=2)
    assert reply.step == 2 and client.stale_replies == 1


def test_robots_are_batched_together_and_get_their_own_answers():
    backend = SlowBackend(TEST_ENV, delay_s=0.02)
    mismatches, errors = [], []

    def robot(i, endpoint):
        try:
            with AgentClient(endpoint, timeout_ms=10_000, robot_id=f"r{i}") as client:
                for step in range(8):
                    reply = client.decide(episode_id=f"ep{i}", step=step)
                    if reply.step != step or reply.decision.action[0] != step:
                        mismatches.append((i, step, reply.step))
        except Exception as exc:
            errors.append(exc)

    with running_server(backend, max_batch=8, batch_timeout_ms=5) as server:
        threads = [threading.Thread(target=robot, args=(i, server.endpoint)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        stats = server.stats()
    assert not errors and not mismatches
    assert max(backend.sizes) > 1 and stats["mean_batch"] > 1.5
    assert stats["decisions"] == 64


def test_lone_request_does_not_wait_for_the_batch_window():
    with (
        running_server(batch_timeout_ms=3000) as server,
        AgentClient(server.endpoint, timeout_ms=5000) as client,
    ):
        replies = [client.decide(episode_id="e", step=s) for s in range(3)]
    assert all(r.timing["queue_ms"] < 1000 for r in replies)


@pytest.mark.parametrize("how", ["refused on receipt", "failed in the batch"])
def test_backend_failure_only_hits_the_robot_that_caused_it(how):
    """One bad robot among four: only it gets an error, and no batch is decided twice."""
    refused = how == "refused on receipt"
    backend = SlowBackend(
        TEST_ENV,
        delay_s=0.05,
        fail_on=None if refused else "bad",
        refuse="bad" if refused else None,
    )
    results = {}
    go = threading.Barrier(4)

    def robot(name, instruction, endpoint):
        with AgentClient(endpoint, timeout_ms=10_000, robot_id=name) as client:
            client.hello()
            go.wait(10)
            try:
                results[name] = client.decide(episode_id=name, step=0, instruction=instruction).step
            except ServerError as exc:
                results[name] = exc.code

    with running_server(backend, max_batch=8, batch_timeout_ms=200) as server:
        threads = [
            threading.Thread(
                target=robot, args=(f"r{i}", "bad" if i == 0 else "ok", server.endpoint)
            )
            for i in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    bad = P.BAD_OBSERVATION if refused else P.BACKEND_ERROR
    assert results == {"r0": bad, "r1": 0, "r2": 0, "r3": 0}
    assert sum(backend.sizes) == (3 if refused else 4)  # nobody's observation decided twice


class MalformedDecision(Backend):
    """A buggy backend: its decision for instruction "bad" cannot be encoded."""

    name = "malformed"

    def decide(self, batch):
        return [
            Decision(point=("x", "y")) if obs.instruction == "bad" else Decision(skill="ok")
            for obs in batch
        ]


def test_a_decision_that_cannot_be_sent_is_an_error_reply_and_the_server_stays_up():
    with (
        running_server(MalformedDecision(TEST_ENV)) as server,
        AgentClient(server.endpoint, timeout_ms=5000) as client,
    ):
        with pytest.raises(ServerError) as err:
            client.decide(episode_id="e", step=0, instruction="bad")
        assert err.value.code == P.INTERNAL_ERROR and "cannot be sent" in err.value.message
        assert client.decide(episode_id="e", step=0, instruction="fine").decision.skill == "ok"


def test_end_episode_records_full_transitions(tmp_path):
    with (
        running_server(record_dir=tmp_path) as server,
        AgentClient(server.endpoint, timeout_ms=5000) as client,
    ):
        for step in range(3):
            client.decide(
                episode_id="ep-1",
                step=step,
                state=np.full(2, step, np.float32),
                reward=None if step == 0 else float(step),
            )
        ended = client.end_episode("ep-1", reward=10.0, terminated=True, success=True)
    assert ended == EndedReply(ended.request_id, "ep-1", 3, True)
    (episode,) = list(iter_episodes(tmp_path))
    assert episode.meta["success"] is True and episode.meta["end_reason"] == "end"
    np.testing.assert_array_equal(episode.rewards(), [1.0, 2.0, 10.0])
    np.testing.assert_array_equal(episode.states()[:, 0], [0, 1, 2])
    assert episode.column("terminated") == [False, False, True]


def test_quiet_robot_gets_its_episode_closed_as_truncated(tmp_path):
    with (
        running_server(record_dir=tmp_path, episode_timeout_s=0.3) as server,
        AgentClient(server.endpoint, timeout_ms=5000) as client,
    ):
        client.decide(episode_id="gone", step=0)
        deadline = time.monotonic() + 10
        while server.stats()["recorded_episodes"] < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
    (episode,) = list(iter_episodes(tmp_path))
    assert episode.meta["truncated"] is True and episode.meta["end_reason"] == "idle_timeout"


def test_a_robot_that_disconnects_gets_its_episode_closed_after_the_grace(tmp_path):
    with running_server(record_dir=tmp_path, disconnect_grace_s=0.3) as server:
        with AgentClient(server.endpoint, timeout_ms=5000) as client:
            client.decide(episode_id="left", step=0)
            client.decide(episode_id="left", step=1)
        # the robot crashed: its socket is closed, the 30 s idle timeout is far away
        deadline = time.monotonic() + 10
        while server.stats()["recorded_episodes"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.stats()["open_episodes"] == 0
    (episode,) = list(iter_episodes(tmp_path))
    assert episode.meta["end_reason"] == "disconnected" and episode.meta["truncated"] is True
    assert len(episode) == 2


def test_a_robot_that_reconnects_within_the_grace_keeps_its_episode(tmp_path):
    with (
        running_server(record_dir=tmp_path, disconnect_grace_s=1.0) as server,
        AgentClient(server.endpoint, timeout_ms=5000) as client,
    ):
        client.decide(episode_id="back", step=0)
        client.reconnect()  # what the client does after a timeout: a new connection
        client.decide(episode_id="back", step=1)
        time.sleep(1.5)  # longer than the grace
        client.decide(episode_id="back", step=2)
        assert client.end_episode("back", terminated=True).steps == 3
    (episode,) = list(iter_episodes(tmp_path))
    assert episode.meta["end_reason"] == "end" and len(episode) == 3


def test_requests_that_arrive_while_the_server_stops_are_told_so(tmp_path):
    server = Server(
        ZeroBackend(TEST_ENV),
        ServerConfig(bind="tcp://127.0.0.1:0", record_dir=tmp_path, shutdown_grace_s=3.0),
    )
    endpoint = server.bind()
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    with AgentClient(endpoint, timeout_ms=5000) as client:
        client.decide(episode_id="open", step=0)
        server.stop()
        time.sleep(0.5)  # the loop has noticed and is flushing
        with pytest.raises(ServerError) as err:
            client.decide(episode_id="late", step=0)
        assert err.value.code == P.SHUTTING_DOWN
    thread.join(30)
    assert not thread.is_alive()
    (episode,) = list(iter_episodes(tmp_path))
    assert episode.meta["end_reason"] == "shutdown"


def test_req_clients_work_too():
    """A plain REQ socket (an envelope with an empty delimiter) gets its reply."""
    with running_server() as server:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(server.endpoint)
        sock.send(P.encode(Hello(1, "req-robot")))
        assert sock.poll(5000)
        reply = P.parse_reply(sock.recv())
        sock.close()
    assert isinstance(reply, HelloReply) and reply.request_id == 1


def test_a_retried_step_replaces_itself_and_keeps_rewards_in_place(tmp_path):
    with (
        running_server(record_dir=tmp_path) as server,
        AgentClient(server.endpoint, timeout_ms=5000) as client,
    ):
        client.decide(episode_id="retry", step=0)
        client.decide(episode_id="retry", step=1, reward=1.0)
        client.decide(episode_id="retry", step=1, reward=1.0)  # the robot resent step 1
        client.end_episode("retry", reward=2.0, terminated=True)
    (episode,) = list(iter_episodes(tmp_path))
    assert episode.column("step") == [0, 1]
    np.testing.assert_array_equal(episode.rewards(), [1.0, 2.0])


class Reloading(Backend):
    """Has a newer version on every poll, which takes `load_s` to load; remembers threads."""

    name = "reloading"

    def __init__(self, env, model=None, load_s=0.3):
        super().__init__(env, model)
        self.version, self.load_s = 0, load_s
        self.decide_threads, self.swap_threads, self.load_threads = set(), set(), set()

    @property
    def model_version(self):
        return str(self.version)

    def load_version(self):
        self.load_threads.add(threading.get_ident())
        time.sleep(self.load_s)  # reading and verifying a checkpoint
        return self.version + 1

    def swap(self, loaded):
        self.swap_threads.add(threading.get_ident())
        self.version = loaded

    def decide(self, batch):
        self.decide_threads.add(threading.get_ident())
        return [Decision(action=np.zeros(4, np.float32)) for _ in batch]


def test_new_versions_load_off_the_decision_loop_and_swap_between_batches():
    backend = Reloading(TEST_ENV, load_s=0.3)
    with (
        running_server(backend, reload_every_s=0.05) as server,
        AgentClient(server.endpoint, timeout_ms=5000) as client,
    ):
        replies = []
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            replies.append(client.decide(episode_id="r", step=len(replies)))
        stats = server.stats()
    versions = [int(r.model_version) for r in replies]
    assert versions == sorted(versions) and versions[-1] >= 3  # picked up without a restart
    assert stats["version_swaps"] >= 3 and stats["model_version"] == str(backend.version)
    # loading (0.3 s each) never held a robot up: decisions kept flowing meanwhile
    assert len(replies) > 10 * versions[-1]
    assert backend.swap_threads == backend.decide_threads
    assert not backend.load_threads & backend.decide_threads


class FailingLoad(Reloading):
    def load_version(self):
        raise BackendError("manifest hash mismatch")


def test_a_version_that_fails_to_load_is_refused_and_counted():
    with (
        running_server(FailingLoad(TEST_ENV), reload_every_s=0.05) as server,
        AgentClient(server.endpoint, timeout_ms=5000) as client,
    ):
        time.sleep(0.5)
        reply = client.decide(episode_id="r", step=0)
        stats = server.stats()
    assert reply.model_version == "0" and stats["versions_refused"] >= 3


class Remembering(Backend):
    """Answers option 0 and remembers the history each observation came with."""

    name = "remembering"

    def __init__(self, env, model=None):
        super().__init__(env, model)
        self.histories = []

    def decide(self, batch):
        self.histories += [list(obs.history) for obs in batch]
        return [Decision(skill_index=0, skill=obs.options[0]) for obs in batch]


def test_server_hands_backends_the_skills_it_answered_in_the_episode():
    backend = Remembering(TEST_ENV)
    with running_server(backend) as server, AgentClient(server.endpoint, timeout_ms=5000) as c:
        c.decide(episode_id="h", step=0, options=["grasp"])
        c.decide(episode_id="h", step=1, options=["lift"])
        c.decide(episode_id="h", step=1, options=["lift"])  # a retry sees the same history
        c.decide(episode_id="other", step=0, options=["open the gripper"])
        c.decide(episode_id="h", step=2, options=["place on the red pad"])
    assert backend.histories == [[], ["grasp"], ["grasp"], [], ["grasp", "lift"]]


def test_decisions_say_who_decided():
    with running_server() as server, AgentClient(server.endpoint, timeout_ms=5000) as client:
        reply = client.decide(episode_id="e", step=0, options=["go"])
    assert reply.decision.decided_by == "zero"


def test_serve_backend_options_are_parsed_and_checked():
    from agent.backends import EnvInfo, load_backend
    from agent.backends.base import parse_option_pairs

    assert parse_option_pairs(["temperature=0.6", "fallback=noop", "x=a=b"]) == {
        "temperature": "0.6",
        "fallback": "noop",
        "x": "a=b",
    }
    with pytest.raises(BackendError, match="KEY=VALUE"):
        parse_option_pairs(["temperature"])
    with pytest.raises(BackendError, match="takes no options"):
        load_backend("zero", EnvInfo("Pusher-v5", action_shape=(7,)), None, temperature="0.6")
