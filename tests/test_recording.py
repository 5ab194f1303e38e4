"""The server's recording: open episodes to files, rewards in place, SIGKILL and SIGTERM."""

import contextlib
import signal
import threading
import time

import numpy as np
import pytest
import zmq
from runtime_fixtures import serve_subprocess, stop_process, wait_ready

from agent import protocol as P
from agent.client import AgentClient, AgentTimeout
from agent.launch import free_port
from agent.messages import (
    DecideRequest,
    Decision,
    DecisionReply,
    EndEpisode,
    Observation,
    TeacherLabel,
)
from agent.recording import EpisodeBook, EpisodeWriter
from agent.store import FORMAT_VERSION, TMP_DIRNAME, episode_paths, iter_episodes, read_episode

pytestmark = pytest.mark.timeout(90)


def record_episode(book, episode_id="ep", steps=3, **end):
    """Steps as the server records them: a decision, then its reward with the next message."""
    for t in range(steps):
        obs = Observation(
            "robot",
            episode_id,
            t,
            "pick it",
            {"image": np.full((4, 5, 3), t, np.uint8)},
            np.full(2, t, np.float32),
            ["a", "b"],
        )
        dec = Decision(
            action=np.full(4, t, np.float32),
            skill_index=t % 2,
            skill="ab"[t % 2],
            reasoning=f"because {t}",
            decided_by="policy" if t % 2 else "teacher:oracle",
            confidence=0.5,
            teacher=TeacherLabel(Decision(skill_index=1, skill="b"), "oracle"),
        )
        timing = {"queue_ms": 0.1, "inference_ms": 1.0, "batch_size": 1}
        reward = float(t) if t else None
        request = DecideRequest(t, obs, reward, seed=5 if t == 0 else None, task="pick")
        book.record(request, DecisionReply(t, episode_id, t, dec, "m", "7", timing))
    book.end(EndEpisode(0, "robot", episode_id, 5.0, **end))


def test_episode_round_trip(tmp_path):
    writer = EpisodeWriter(tmp_path, {"backend": "zero"})
    book = EpisodeBook("test/Null-v0", writer, idle_timeout_s=30)
    record_episode(book, terminated=True, success=True)
    writer.close()
    (episode,) = list(iter_episodes(tmp_path))
    assert episode.episode_id == "ep" and len(episode) == 3 and episode.success is True
    assert episode.meta["backend"] == "zero" and episode.meta["total_reward"] == 8.0
    assert (episode.meta["seed"], episode.meta["task"], episode.meta["format_version"]) == (
        5,
        "pick",
        FORMAT_VERSION,
    )
    assert episode.images("image").shape == (3, 4, 5, 3) and episode.images()[2, 0, 0, 0] == 2
    np.testing.assert_array_equal(episode.states()[:, 0], [0, 1, 2])
    np.testing.assert_array_equal(episode.actions()[:, 0], [0, 1, 2])
    np.testing.assert_array_equal(episode.skill_indices(), [0, 1, 0])
    np.testing.assert_array_equal(episode.rewards(), [1, 2, 5])
    assert episode.column("reasoning") == ["because 0", "because 1", "because 2"]
    assert episode.column("model_version") == ["7"] * 3
    assert episode.column("terminated") == [False, False, True]
    assert episode.column("decided_by") == ["teacher:oracle", "policy", "teacher:oracle"]
    assert episode.column("teacher_skill_index") == [1, 1, 1]
    assert episode.column("teacher_skill") == ["b"] * 3
    assert episode.column("teacher_model") == ["oracle"] * 3
    assert episode.column("teacher_action") == [None] * 3
    assert episode.column("confidence") == [0.5] * 3


def test_the_store_reads_back_the_steps_it_wrote(tmp_path):
    """`Episode.steps()` is the inverse of what the recorder wrote, history included."""
    writer = EpisodeWriter(tmp_path, {"backend": "zero"})
    book = EpisodeBook("test/Null-v0", writer, idle_timeout_s=30)
    record_episode(book, terminated=True, success=True)
    writer.close()
    (episode,) = list(iter_episodes(tmp_path))
    steps = episode.steps()
    assert [s.observation.step for s in steps] == [0, 1, 2]
    for t, step in enumerate(steps):
        obs, dec = step.observation, step.decision
        assert (obs.robot_id, obs.episode_id, obs.instruction, obs.options) == (
            "robot", "ep", "pick it", ["a", "b"],
        )  # fmt: skip
        np.testing.assert_array_equal(obs.images["image"], np.full((4, 5, 3), t, np.uint8))
        np.testing.assert_array_equal(obs.state, np.full(2, t, np.float32))
        assert obs.history == ["a", "b", "a"][:t] and obs.sim is None
        np.testing.assert_array_equal(dec.action, np.full(4, t, np.float32))
        assert (dec.skill_index, dec.skill, dec.reasoning, dec.confidence) == (
            t % 2, "ab"[t % 2], f"because {t}", 0.5,
        )  # fmt: skip
        assert dec.decided_by == ("policy" if t % 2 else "teacher:oracle")
        assert dec.teacher.model == "oracle" and dec.teacher.decision.skill_index == 1
        assert (step.model_id, step.model_version, step.timing["batch_size"]) == ("m", "7", 1)
    assert [s.reward for s in steps] == [1.0, 2.0, 5.0]


def test_a_frame_whose_bytes_do_not_fit_its_shape_is_a_clear_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = EpisodeWriter(tmp_path)
    book = EpisodeBook("test/Null-v0", writer, idle_timeout_s=30)
    record_episode(book)
    writer.close()
    (path,) = episode_paths(tmp_path)
    table = pq.read_table(path)
    images = table.column("images").to_pylist()
    images[1][0]["height"] = 100_000  # claims a huge frame
    table = table.set_column(
        table.schema.get_field_index("images"), table.schema.field("images"),
        pa.array(images, table.schema.field("images").type),
    )  # fmt: skip
    pq.write_table(table, path)
    with pytest.raises(ValueError, match="claims 100000x5x3 but holds 60 bytes"):
        read_episode(path).steps()


def test_repeated_episode_ids_get_distinct_files(tmp_path):
    writer = EpisodeWriter(tmp_path)
    book = EpisodeBook("test/Null-v0", writer, idle_timeout_s=30)
    for _ in range(2):
        record_episode(book, "same")
    writer.close()
    assert [p.name for p in episode_paths(tmp_path)] == ["same.1.parquet", "same.parquet"]


def test_stale_temporary_files_are_removed_and_never_listed(tmp_path):
    tmp_dir = tmp_path / TMP_DIRNAME
    tmp_dir.mkdir()
    (tmp_dir / "half.parquet.1.2.tmp").write_bytes(b"PAR1 half written")
    assert episode_paths(tmp_path) == []
    EpisodeWriter(tmp_path).close()
    assert list(tmp_dir.iterdir()) == []


def run_episode(client, episode_id, steps, end=True):
    for t in range(steps):
        client.decide(
            episode_id=episode_id,
            step=t,
            state=np.full(23, t, np.float32),
            reward=None if t == 0 else 1.0,
        )
    if end:
        client.end_episode(episode_id, reward=1.0, terminated=True, success=True)


def recording_server(directory):
    """A real `agent serve` recording into `directory` (zero backend): its endpoint and process."""
    port = free_port()
    server = serve_subprocess(
        port, "--env", "Pusher-v5", "--backend", "zero", "--record", str(directory)
    )
    return f"tcp://127.0.0.1:{port}", server


def test_sigkill_leaves_every_finished_episode_readable(tmp_path):
    endpoint, server = recording_server(tmp_path)
    try:
        wait_ready(endpoint)
        with AgentClient(endpoint, timeout_ms=5000) as client:
            for i in range(3):
                run_episode(client, f"done-{i}", 20)
            deadline = time.monotonic() + 20
            while client.stats()["recorded_episodes"] < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            # more finished episodes are being written while the server dies
            for i in range(3):
                run_episode(client, f"late-{i}", 200)
            run_episode(client, "open", 5, end=False)
    finally:
        server.kill()
        server.communicate(timeout=20)
    names = {p.name for p in episode_paths(tmp_path)}
    assert {"done-0.parquet", "done-1.parquet", "done-2.parquet"} <= names
    assert "open.parquet" not in names
    for path in episode_paths(tmp_path):  # everything visible is a whole episode
        episode = read_episode(path)
        assert episode.meta["steps"] == len(episode) and episode.success
        assert len(episode) == (20 if path.name.startswith("done-") else 200), path.name


def test_sigterm_closes_open_episodes_as_truncated(tmp_path):
    endpoint, server = recording_server(tmp_path)
    try:
        wait_ready(endpoint)
        with AgentClient(endpoint, timeout_ms=5000) as client:
            run_episode(client, "open", 4, end=False)
    finally:
        out = stop_process(server, signal.SIGTERM)
    assert server.returncode == 0, out
    (episode,) = list(iter_episodes(tmp_path))
    assert episode.meta["end_reason"] == "shutdown" and episode.meta["truncated"] is True
    assert episode.column("step") == [0, 1, 2, 3]
    assert len(episode) == 4 and episode.column("truncated")[-1] is True


def test_every_episode_acknowledged_as_recorded_survives_a_sigkill(tmp_path):
    """`recorded: true` means on disk: SIGKILL right after such replies loses none of them."""
    endpoint, server = recording_server(tmp_path)
    acknowledged, lock, stop = {}, threading.Lock(), threading.Event()

    def robot(index):
        with contextlib.suppress(AgentTimeout), AgentClient(endpoint, timeout_ms=5000) as client:
            for n in range(1000):
                if stop.is_set():
                    return
                episode_id = f"r{index}-{n}"
                run_episode(client, episode_id, 10 + 7 * (n % 5), end=False)
                reply = client.end_episode(episode_id, reward=1.0, terminated=True, success=True)
                with lock:
                    if reply.recorded:
                        acknowledged[episode_id] = reply.steps
                    if len(acknowledged) >= 40:
                        stop.set()
                        server.kill()  # right after the reply: the file must already be there
                        return

    try:
        wait_ready(endpoint)
        robots = [threading.Thread(target=robot, args=(i,)) for i in range(3)]
        for t in robots:
            t.start()
        for t in robots:
            t.join(120)
    finally:
        server.kill()
        server.communicate(timeout=20)
    assert len(acknowledged) >= 40
    on_disk = {p.stem: read_episode(p) for p in episode_paths(tmp_path)}
    for episode_id, steps in acknowledged.items():
        assert episode_id in on_disk, (
            f"{episode_id} was acknowledged as recorded but is not on disk"
        )
        assert len(on_disk[episode_id]) == steps == on_disk[episode_id].meta["steps"]


def test_ended_says_recorded_only_with_recording_on_and_steps_to_write(tmp_path):
    endpoint, server = recording_server(tmp_path)
    try:
        wait_ready(endpoint)
        with AgentClient(endpoint, timeout_ms=5000) as client:
            run_episode(client, "ep", 3, end=False)
            reply = client.end_episode("ep", terminated=True)
            assert reply.recorded and reply.steps == 3
            assert (tmp_path / "ep.parquet").is_file()  # already there when the reply arrives
            unknown = client.end_episode("never-started", terminated=True)
            assert not unknown.recorded and unknown.steps == 0
    finally:
        stop_process(server, signal.SIGTERM)


def test_a_repeated_end_waits_for_the_same_write_and_gets_the_same_answer(tmp_path):
    """A client that timed out and resends `end` must not be told `recorded: false`."""
    endpoint, server = recording_server(tmp_path)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    try:
        wait_ready(endpoint)
        with AgentClient(endpoint, timeout_ms=5000) as client:
            run_episode(client, "ep", 50, end=False)
        sock.connect(endpoint)
        for rid in (1, 2, 3):  # back to back: the later ones arrive while "ep" is being written
            sock.send(P.encode(EndEpisode(rid, "robot", "ep", 1.0, terminated=True)))
        replies = sorted((P.parse_reply(sock.recv()) for _ in range(3)), key=lambda r: r.request_id)
        assert [(r.request_id, r.recorded, r.steps) for r in replies] == [
            (1, True, 50),
            (2, True, 50),
            (3, True, 50),
        ]
        assert [p.name for p in episode_paths(tmp_path)] == ["ep.parquet"]  # written once
    finally:
        sock.close()
        stop_process(server, signal.SIGTERM)


def test_an_end_after_the_server_closed_the_episode_says_whether_it_was_recorded(tmp_path):
    recorded = threading.Event()
    writer = EpisodeWriter(tmp_path)
    book = EpisodeBook(
        "test/Null-v0", writer, idle_timeout_s=30, max_steps=3,
        on_recorded=lambda episode, ok: recorded.set(),
    )  # fmt: skip
    try:
        record_episode(book, "long", steps=3)  # closed as too_long at its 3rd step
        assert book.end(EndEpisode(1, "robot", "long")) == (3, None)  # still being written
        assert recorded.wait(30)
        assert book.written("long", True) == 3
        assert book.end(EndEpisode(2, "robot", "long")) == (3, True)
        assert book.end(EndEpisode(3, "robot", "unknown")) == (0, False)
    finally:
        writer.close()
    assert read_episode(tmp_path / "long.parquet").meta["end_reason"] == "too_long"
