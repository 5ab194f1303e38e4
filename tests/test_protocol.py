"""Wire format: openpi-compatible arrays, request validation, reply decoding, batching policy."""

import math

import msgpack
import numpy as np
import pytest
from runtime_fixtures import openpi_pack

from agent import codec as C
from agent import protocol as P
from agent.batching import BatchPolicy, CallCost, RobotActivity
from agent.messages import (
    DecideRequest,
    Decision,
    DecisionReply,
    EndedReply,
    EndEpisode,
    ErrorReply,
    Hello,
    HelloReply,
    Observation,
    StatsReply,
    StatsRequest,
    TeacherLabel,
)


@pytest.mark.parametrize("dtype", ["uint8", "float32", "float64", "int64", "bool", "int16"])
def test_arrays_round_trip(dtype):
    arr = (np.arange(24) % 7).astype(dtype).reshape(2, 3, 4)
    out = C.unpackb(C.packb({"a": arr, "nested": [arr[0]]}))
    np.testing.assert_array_equal(out["a"], arr)
    assert out["a"].dtype == arr.dtype and out["nested"][0].shape == (3, 4)


def test_openpi_encoded_arrays_decode_unchanged():
    image = np.random.default_rng(0).integers(0, 255, (8, 6, 3), dtype=np.uint8)
    blob = msgpack.packb({"observation/image": image}, default=openpi_pack)
    np.testing.assert_array_equal(C.unpackb(blob)["observation/image"], image)


def test_our_arrays_use_openpi_keys():
    raw = msgpack.unpackb(C.packb(np.zeros((2, 2), np.float32)), raw=False)
    assert set(raw) == {b"__ndarray__", b"data", b"dtype", b"shape"}
    assert raw[b"dtype"] == "<f4" and list(raw[b"shape"]) == [2, 2]


def test_numpy_scalars_round_trip():
    assert C.unpackb(C.packb(np.float32(1.5))) == np.float32(1.5)


@pytest.mark.parametrize(
    "header",
    [
        {b"__ndarray__": True, b"data": b"\0" * 3, b"dtype": "<f4", b"shape": [1]},
        {b"__ndarray__": True, b"data": b"", b"dtype": "|O", b"shape": [0]},
        {b"__ndarray__": True, b"data": b"\0" * 4, b"dtype": "<f4", b"shape": [-1]},
        {b"__ndarray__": True, b"data": "text", b"dtype": "<f4", b"shape": [1]},
    ],
)
def test_bad_array_headers_are_refused(header):
    with pytest.raises(P.ProtocolError) as err:
        C.unpackb(msgpack.packb(header))
    assert err.value.code == P.BAD_ARRAY


def decide_message(**overrides):
    obs = Observation(
        "robot-1",
        "ep-1",
        3,
        instruction="pick",
        images={"image": np.zeros((4, 4, 3), np.uint8)},
        state=np.ones(5, np.float32),
        options=["a", "b"],
        sim={"x": np.ones(2)},
    )
    msg = C.unpackb(P.encode(DecideRequest(7, obs, reward=0.5, seed=11, task="tabletop/Stack-v0")))
    for key, value in overrides.items():
        if key.startswith("obs_"):
            msg["observation"][key[4:]] = value
        else:
            msg[key] = value
    return C.packb(msg)


def test_valid_decide_request_parses():
    req = P.parse_request(decide_message())
    assert isinstance(req, DecideRequest)
    assert (req.seed, req.task) == (11, "tabletop/Stack-v0")
    obs = req.observation
    assert (req.request_id, obs.robot_id, obs.episode_id, obs.step, req.reward) == (
        7,
        "robot-1",
        "ep-1",
        3,
        0.5,
    )
    assert obs.images["image"].shape == (4, 4, 3) and obs.state.dtype == np.float32
    assert obs.options == ["a", "b"] and obs.instruction == "pick"
    np.testing.assert_array_equal(obs.sim["x"], np.ones(2))


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"protocol": 0}, P.VERSION_MISMATCH),
        ({"protocol": 99}, P.VERSION_MISMATCH),
        ({"protocol": 1.0}, P.VERSION_MISMATCH),
        ({"type": "teleport"}, P.UNKNOWN_TYPE),
        ({"request_id": True}, P.BAD_REQUEST),
        ({"request_id": -1}, P.BAD_REQUEST),
        ({"episode_id": "../../etc/passwd"}, P.BAD_REQUEST),
        ({"step": "3"}, P.BAD_REQUEST),
        ({"reward": math.nan}, P.BAD_REQUEST),
        ({"obs_state": np.array([1.0, np.nan], np.float32)}, P.BAD_OBSERVATION),
        ({"obs_state": np.ones(5, np.float64)}, P.BAD_OBSERVATION),
        ({"obs_state": np.ones((5, 1), np.float32)}, P.BAD_OBSERVATION),
        ({"obs_images": {"image": np.zeros((4, 4, 3), np.float32)}}, P.BAD_OBSERVATION),
        ({"obs_images": {"image": np.zeros((4, 4), np.uint8)}}, P.BAD_OBSERVATION),
        ({"obs_options": "a, b"}, P.BAD_OBSERVATION),
        ({"obs_options": np.zeros(3, np.float32)}, P.BAD_OBSERVATION),
        ({"obs_images": np.zeros((4, 4, 3), np.uint8)}, P.BAD_OBSERVATION),
        ({"obs_instruction": 5}, P.BAD_OBSERVATION),
        ({"obs_sim": [1, 2]}, P.BAD_OBSERVATION),
        ({"observation": None}, P.BAD_REQUEST),
        ({"seed": -1}, P.BAD_REQUEST),
        ({"seed": "7"}, P.BAD_REQUEST),
        ({"task": 3}, P.BAD_REQUEST),
        ({"task": "x" * 200}, P.BAD_REQUEST),
    ],
)
def test_bad_requests_get_codes(overrides, code):
    with pytest.raises(P.ProtocolError) as err:
        P.parse_request(decide_message(**overrides))
    assert err.value.code == code, err.value.message


def test_version_mismatch_message_is_clear():
    with pytest.raises(P.ProtocolError, match="speaks protocol 0; this server speaks 1"):
        P.parse_request(decide_message(protocol=0))


def test_garbage_is_bad_message():
    for blob in (b"", b"\xc1", b"\x93\x01\x02", msgpack.packb([1, 2])):
        with pytest.raises(P.ProtocolError) as err:
            P.parse_request(blob)
        assert err.value.code == P.BAD_MESSAGE


def test_peek_ids_recovers_ids_of_invalid_requests():
    assert P.peek_ids(decide_message(protocol=0)) == (7, "ep-1")
    assert P.peek_ids(b"\xc1") == (None, None)


def test_decision_reply_round_trip():
    dec = Decision(
        action=np.array([1, 2, 3, 4], np.float32),
        skill_index=np.int64(1),
        skill="b",
        point=(500.0, 250.0),
        reasoning="because",
        decided_by="escalated:oracle",
        confidence=0.25,
        teacher=TeacherLabel(Decision(skill_index=0, skill="a"), "oracle"),
    )
    sent = DecisionReply(7, "ep-1", 3, dec, "m", "3", {"queue_ms": 0.1}, latency_ms=9.0)
    reply = P.parse_reply(P.encode(sent))
    assert isinstance(reply, DecisionReply)
    assert (reply.request_id, reply.episode_id, reply.step, reply.timing) == (
        7,
        "ep-1",
        3,
        {"queue_ms": 0.1},
    )
    np.testing.assert_array_equal(reply.decision.action, dec.action)
    assert reply.decision.skill_index == 1 and reply.decision.point == (500.0, 250.0)
    assert reply.decision.reasoning == "because" and reply.model_version == "3"
    assert reply.decision.decided_by == "escalated:oracle" and reply.decision.confidence == 0.25
    # the teacher's label is recorded, never sent; latency is the client's own measurement
    assert reply.decision.teacher is None and reply.latency_ms is None


def test_the_decision_reply_carries_every_decision_field_but_the_recorded_ones():
    """The reply is built field by field for speed; it must keep up with `Decision`."""
    from dataclasses import fields

    dec = Decision(
        action=np.zeros(2, np.float32),
        skill_index=0,
        skill="a",
        point=(1.0, 2.0),
        reasoning="r",
        decided_by="x",
        confidence=0.5,
    )
    sent = C.unpackb(P.encode(DecisionReply(1, "e", 0, dec, "m", "v", {})))
    wire = {f.name for f in fields(Decision)} - {"teacher", "model_version"}
    assert wire == set(P._DECISION_WIRE) and wire <= set(sent)
    bare = C.unpackb(P.encode(DecisionReply(1, "e", 0, Decision(decided_by="x"), "m", "v", {})))
    assert set(bare) == {"type", "protocol", "request_id", "episode_id", "step", "decided_by",
                         "model_id", "model_version", "timing"}  # fmt: skip
    assert P.parse_reply(P.encode(DecisionReply(1, "e", 0, Decision(), "m", "v", {}))).decision == (
        Decision()
    )


def plain_msgpack(message: dict) -> bytes:
    """What msgpack itself makes of a message, arrays as openpi maps (copied the usual way)."""
    return msgpack.packb(message, default=openpi_pack, use_bin_type=True)


def test_large_arrays_are_spliced_in_byte_for_byte_as_msgpack_packs_them():
    rng = np.random.default_rng(0)
    images = {
        "scene": rng.integers(0, 255, (224, 224, 3), dtype=np.uint8),  # spliced (>= 64 kB)
        "wrist": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8),  # packed inline
        "side": rng.integers(0, 255, (400, 300, 3), dtype=np.uint8)[:, ::2],  # not contiguous
    }
    state = rng.standard_normal(14).astype(np.float32)
    obs = Observation("r", "e", 2, "go", images, state, ["a"])
    sent = P.encode(DecideRequest(9, obs))
    body = C.unpackb(sent)
    assert sent == plain_msgpack(body)
    parsed = P.parse_request(sent).observation
    for name, image in images.items():
        np.testing.assert_array_equal(parsed.images[name], image)


def test_a_message_holding_the_splice_tag_is_packed_plainly():
    C.packb({})  # make this thread's packer
    tag = C._local.packer.tag
    image = np.arange(70_000, dtype=np.uint8)
    message = {"data": C.array_map(image), "trap": tag + (0).to_bytes(4, "big")}
    packed = C.packb(message)
    assert C.unpackb(packed)["trap"] == tag + (0).to_bytes(4, "big")
    np.testing.assert_array_equal(C.unpackb(packed)["data"], image)


def test_every_message_round_trips():
    end = P.parse_request(P.encode(EndEpisode(2, "r", "e", 1.0, True, False, True)))
    assert end == EndEpisode(2, "r", "e", 1.0, True, False, True)
    err = P.parse_reply(P.encode(ErrorReply(5, "e", P.BAD_REQUEST, "nope")))
    assert err == ErrorReply(5, "e", P.BAD_REQUEST, "nope")
    for message in (
        Hello(1, "robot"),
        StatsRequest(4),
    ):
        assert P.parse_request(P.encode(message)) == message
    for reply in (HelloReply(1, {"a": 1}), EndedReply(2, "e", 3, True), StatsReply(3, {})):
        assert P.parse_reply(P.encode(reply)) == reply


def test_observation_history_never_travels():
    obs = Observation("r", "e", 1, history=["grasp"])
    assert P.parse_request(P.encode(DecideRequest(1, obs))).observation.history == []


def test_lone_robot_is_never_kept_waiting():
    policy = BatchPolicy(max_batch=16, timeout_s=10.0)
    assert policy.should_flush(pending=1, oldest_age_s=0.0, active_robots=1)


def test_batch_waits_for_active_robots_until_full_or_timeout():
    policy = BatchPolicy(max_batch=4, timeout_s=0.01)
    assert not policy.should_flush(pending=2, oldest_age_s=0.001, active_robots=8)
    assert policy.should_flush(pending=2, oldest_age_s=0.02, active_robots=8)
    assert policy.should_flush(pending=4, oldest_age_s=0.0, active_robots=8)
    assert not policy.should_flush(pending=0, oldest_age_s=1.0, active_robots=0)
    assert policy.wait_s(0.004) == pytest.approx(0.006)


def test_robot_activity_forgets_quiet_robots():
    activity = RobotActivity(window_s=1.0)
    activity.seen("a", now=0.0)
    activity.seen("b", now=0.8)
    assert activity.active(now=0.9) == 2
    assert activity.active(now=1.5) == 1


def test_batch_window_never_exceeds_one_backend_call():
    policy = BatchPolicy(max_batch=16, timeout_s=0.010)
    assert policy.should_flush(pending=2, oldest_age_s=0.0002, active_robots=8, call_cost_s=0.0001)
    assert not policy.should_flush(
        pending=2, oldest_age_s=0.0002, active_robots=8, call_cost_s=0.005
    )
    assert policy.wait_s(0.001, call_cost_s=0.004) == pytest.approx(0.003)


def test_call_cost_tracks_backend_time():
    cost = CallCost(alpha=0.5)
    assert cost.seconds == float("inf")
    cost.update(0.004)
    cost.update(0.002)
    assert cost.seconds == pytest.approx(0.003)
