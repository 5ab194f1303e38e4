"""Hostile input: every message gets a reply, the server stays up, valid requests still work."""

import time

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from runtime_fixtures import running_server

from agent import protocol as P
from agent.client import AgentClient, AgentTimeout
from agent.envspec import ObservationSpec
from agent.messages import DecideRequest, DecisionReply, ErrorReply, Observation, Reply

pytestmark = pytest.mark.timeout(180)
MAX_BYTES = 64 * 1024
SPEC = ObservationSpec(state_shape=(14,), image_shapes={"image": (8, 8, 3)})
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def server():
    with running_server(spec=SPEC, max_message_bytes=MAX_BYTES) as srv:
        yield srv


@pytest.fixture(scope="module")
def raw(server):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    yield sock
    sock.close(linger=0)


def valid_message(request_id=1):
    obs = Observation(
        "fuzz-robot",
        "fuzz-ep",
        0,
        instruction="go",
        images={"image": np.zeros((8, 8, 3), np.uint8)},
        state=np.zeros(14, np.float32),
        options=["a"],
    )
    return P.unpackb(P.encode(DecideRequest(request_id, obs)))


def exchange(sock, payload: bytes) -> Reply:
    sock.send(payload)
    assert sock.poll(5000), "the server sent no reply"
    return P.parse_reply(sock.recv())


def code_of(reply: Reply) -> str | None:
    return reply.code if isinstance(reply, ErrorReply) else None


def assert_still_serving(server):
    with AgentClient(server.endpoint, timeout_ms=5000) as client:
        reply = client.decide(episode_id="after", step=1, state=np.zeros(14, np.float32))
    assert reply.step == 1


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.builds(lambda n, kind: np.zeros(n, kind), st.integers(0, 4), st.sampled_from(["u1", "f4"])),
)
values = st.recursive(
    scalars,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.binary(max_size=8)), kids, max_size=4),
    ),
    max_leaves=12,
)
FIELDS = [
    "type",
    "protocol",
    "request_id",
    "robot_id",
    "episode_id",
    "step",
    "reward",
    "seed",
    "task",
    "observation",
    "obs:images",
    "obs:state",
    "obs:instruction",
    "obs:options",
    "obs:sim",
]


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_get_error_replies(raw, blob):
    reply = exchange(raw, blob)
    assert code_of(reply) != P.INTERNAL_ERROR, reply  # bad input is never a server bug
    if reply.TYPE != "error":  # random bytes that happen to be a valid message
        P.parse_request(blob)


@FUZZ
@given(st.sampled_from(FIELDS), values)
@example(field="obs:images", value=np.zeros(3, np.uint8))  # arrays where maps/lists belong
@example(field="obs:options", value=np.zeros(3, np.float32))
@example(field="type", value=np.zeros(0, np.uint8))  # `array == "decide"` is ambiguous
def test_wrong_schema_gets_a_reply_with_our_request_id(raw, field, value):
    msg = valid_message(request_id=42)
    if field.startswith("obs:"):
        msg["observation"][field[4:]] = value
    else:
        msg[field] = value
    try:
        payload = P.packb(msg)
    except (TypeError, ValueError, OverflowError):
        return  # not representable in msgpack at all
    reply = exchange(raw, payload)
    assert reply.TYPE in ("error", "decision", "hello", "ended", "stats")
    assert code_of(reply) != P.INTERNAL_ERROR, reply  # bad input is never a server bug
    if reply.TYPE == "error" and field != "request_id":
        assert reply.request_id == 42, reply


dtypes = st.sampled_from(["|u1", "<f4", "<f8", "<i8", "|b1", "<f2", "|O", "<U3", ">f4", "<c8"])
shapes = st.lists(st.integers(0, 8), max_size=4)  # stays under MAX_BYTES


@FUZZ
@given(st.sampled_from(["image", "state"]), dtypes, shapes, st.booleans())
def test_wrong_arrays_get_error_replies(raw, target, dtype, shape, consistent):
    itemsize = 1 if dtype[1] in "ub" else int(dtype[2:]) if dtype[2:].isdigit() else 4
    size = int(np.prod(shape)) * itemsize + (0 if consistent else 1)
    array = {b"__ndarray__": True, b"data": b"\0" * size, b"dtype": dtype, b"shape": shape}
    msg = valid_message(request_id=7)
    if target == "image":
        msg["observation"]["images"] = {"image": array}
    else:
        msg["observation"]["state"] = array
    reply = exchange(raw, P.packb(msg))
    good = consistent and (
        (target == "image" and dtype == "|u1" and shape == [8, 8, 3])
        or (target == "state" and dtype == "<f4" and shape == [14])
    )
    assert isinstance(reply, DecisionReply if good else ErrorReply), (reply, dtype, shape)
    assert code_of(reply) != P.INTERNAL_ERROR, (reply, dtype, shape)
    assert reply.request_id == 7 or code_of(reply) in (P.BAD_ARRAY, P.BAD_MESSAGE)


@FUZZ
@given(
    st.one_of(
        st.integers(-5, 1000).filter(lambda v: v != P.PROTOCOL_VERSION),
        st.text(max_size=4),
        st.none(),
        st.floats(),
    )
)
def test_other_protocol_versions_are_refused_clearly(raw, version):
    msg = valid_message()
    msg["protocol"] = version
    reply = exchange(raw, P.packb(msg))
    assert reply.TYPE == "error" and code_of(reply) == P.VERSION_MISMATCH
    assert "speaks" in reply.message


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_state_is_refused(server, bad):
    with AgentClient(server.endpoint, timeout_ms=5000) as client:
        state = np.zeros(14, np.float32)
        state[3] = bad
        with pytest.raises(Exception, match="NaN or infinity"):
            client.decide(episode_id="nan", step=0, state=state)


def test_oversize_messages_are_dropped_by_zmq_and_the_server_stays_up(server):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    msg = valid_message()
    msg["observation"]["instruction"] = "x" * (2 * MAX_BYTES)
    sock.send(P.packb(msg))
    assert not sock.poll(500), "an oversize message must never be processed"
    sock.close(linger=0)
    time.sleep(0.1)
    assert_still_serving(server)


def test_client_refuses_to_send_more_than_the_server_accepts(server):
    with AgentClient(server.endpoint, timeout_ms=5000) as client:
        client.hello()
        with pytest.raises(ValueError, match="exceeds the server's limit"):
            client.decide(episode_id="big", step=0, instruction="x" * (2 * MAX_BYTES))
    big = {"image": np.zeros((1024, 1024, 3), np.uint8)}
    with (
        AgentClient(server.endpoint, timeout_ms=300) as client,  # no handshake: limit unknown
        pytest.raises(AgentTimeout, match="call hello"),
    ):
        client.decide(episode_id="big", step=0, images=big)


def test_server_still_serves_after_the_fuzzing(server):
    assert_still_serving(server)
    assert server.stats()["errors"] > 0
