"""The runtime's wire schema: which messages exist, what each field must be, the error codes.

Pure functions only (no sockets): `encode` any message of `agent.messages`,
`parse_request` / `parse_reply` bytes back into one (validated field by
field, each bad field a `ProtocolError` with its code). The bytes themselves
(msgpack, openpi's array encoding) are `agent.codec`'s; its error codes and
`ProtocolError` are re-exported here, the one name robots and the server use.
A robot needs this module, `agent.codec`, `agent.messages`, `agent.client`,
pyzmq, msgpack and numpy, nothing else. See docs/protocol.md.
"""

from __future__ import annotations

import math
import re
from dataclasses import fields
from typing import Any

import numpy as np

from agent import codec as C
from agent.codec import BACKEND_ERROR as BACKEND_ERROR
from agent.codec import BAD_ARRAY as BAD_ARRAY
from agent.codec import BAD_MESSAGE as BAD_MESSAGE
from agent.codec import BAD_OBSERVATION as BAD_OBSERVATION
from agent.codec import BAD_REQUEST as BAD_REQUEST
from agent.codec import INTERNAL_ERROR as INTERNAL_ERROR
from agent.codec import SHUTTING_DOWN as SHUTTING_DOWN
from agent.codec import TOO_LARGE as TOO_LARGE
from agent.codec import UNKNOWN_TYPE as UNKNOWN_TYPE
from agent.codec import VERSION_MISMATCH as VERSION_MISMATCH
from agent.codec import ProtocolError as ProtocolError
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
    Reply,
    Request,
    StatsReply,
    StatsRequest,
)

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

_F32 = np.dtype(np.float32)
_U8 = np.dtype(np.uint8)
_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_MAX_IMAGES = 8
_MAX_IMAGE_SIDE = 4096
_MAX_STATE = 4096
_MAX_TEXT = 4096
_MAX_OPTIONS = 64
_MAX_OPTION_TEXT = 512
_MAX_TASK = 128
_MAX_REQUEST_ID = 2**63 - 1
_MAX_STEP = 2**31 - 1
MAX_ERROR_TEXT = 1024  # an error reply's message is cut to this many characters


# --------------------------------------------------------------------------- field checks


def _field(msg: dict, name: str, kinds: type | tuple[type, ...], *, optional: bool = False) -> Any:
    value = msg.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _as_tuple(kinds)):
        want = " or ".join(k.__name__ for k in _as_tuple(kinds))
        raise ProtocolError(
            BAD_REQUEST, f"field {name!r} must be {want}, got {type(value).__name__}"
        )
    return value


def _as_tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


_known_ids: set[str] = set()  # identifiers that matched before (a robot sends the same ones)


def _ident(msg: dict, name: str) -> str:
    value = _field(msg, name, str)
    if value in _known_ids:
        return value
    if not _ID_RE.fullmatch(value):
        raise ProtocolError(
            BAD_REQUEST, f"field {name!r} must match {_ID_RE.pattern}, got {C.brief(value)}"
        )
    if len(_known_ids) >= 65536:  # bounded: new episodes keep arriving
        _known_ids.clear()
    _known_ids.add(value)
    return value


def _bounded_int(msg: dict, name: str, high: int) -> int:
    value = _field(msg, name, int)
    if not 0 <= value <= high:
        raise ProtocolError(BAD_REQUEST, f"field {name!r} must be in 0..{high}, got {value}")
    return value


def _finite(msg: dict, name: str) -> float | None:
    value = _field(msg, name, (int, float), optional=True)
    if value is not None and not math.isfinite(value):
        raise ProtocolError(BAD_REQUEST, f"field {name!r} must be finite, got {value}")
    return None if value is None else float(value)


def _text(value: Any, what: str, limit: int) -> str:
    if not isinstance(value, str):
        raise ProtocolError(BAD_OBSERVATION, f"{what} must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise ProtocolError(BAD_OBSERVATION, f"{what} is longer than {limit} characters")
    return value


def _array(value: Any, what: str) -> np.ndarray:
    """The array an observation field carries (requests are unpacked without hooks)."""
    if type(value) is not dict or b"__ndarray__" not in value:
        raise ProtocolError(BAD_OBSERVATION, f"{what} must be an array")
    return C.decode_array(value)


def _image(name: str, value: Any) -> np.ndarray:
    value = _array(value, f"image {name!r}")
    if value.dtype is not _U8:  # decoded arrays carry the canonical dtypes of _DTYPES
        raise ProtocolError(BAD_OBSERVATION, f"image {name!r} must be uint8, got {value.dtype}")
    shape = value.shape
    if len(shape) != 3 or shape[2] != 3:
        raise ProtocolError(BAD_OBSERVATION, f"image {name!r} must be HxWx3, got {shape}")
    if not (0 < shape[0] <= _MAX_IMAGE_SIDE and 0 < shape[1] <= _MAX_IMAGE_SIDE):
        raise ProtocolError(BAD_OBSERVATION, f"image {name!r} size {shape[:2]} out of range")
    return value


def _state(value: Any) -> np.ndarray | None:
    if value is None:
        return None
    value = _array(value, "state")
    if value.dtype is not _F32:
        raise ProtocolError(BAD_OBSERVATION, f"state must be float32, got {value.dtype}")
    shape = value.shape
    if len(shape) != 1 or shape[0] > _MAX_STATE:
        raise ProtocolError(
            BAD_OBSERVATION, f"state must be 1-D with <= {_MAX_STATE} values, got shape {shape}"
        )
    # a float sum of float32 values cannot overflow: it is finite iff every value is
    # (and for short vectors it is several times cheaper than np.isfinite(...).all())
    if not math.isfinite(sum(value.tolist())):
        raise ProtocolError(BAD_OBSERVATION, "state contains NaN or infinity")
    return value


def _sim(value: Any) -> dict | None:
    """The SIM-ONLY map, with any openpi array maps inside it turned into arrays."""
    if value is None:
        return None
    if type(value) is not dict:
        raise ProtocolError(BAD_OBSERVATION, "sim must be a map")
    todo: list[Any] = [value]
    while todo:  # iterative: a sim nested a thousand deep must not exhaust the stack
        node = todo.pop()
        items = node.items() if type(node) is dict else enumerate(node)
        for key, child in items:
            if type(child) is dict:
                if b"__ndarray__" in child:
                    node[key] = C.decode_array(child)
                else:
                    todo.append(child)
            elif type(child) is list:
                todo.append(child)
    return value


def _observation(msg: dict, robot_id: str, episode_id: str, step: int) -> Observation:
    raw = _field(msg, "observation", dict)
    images = raw.get("images")
    checked = {}
    if images is not None:
        if type(images) is not dict or len(images) > _MAX_IMAGES:
            raise ProtocolError(BAD_OBSERVATION, f"images must be a map of <= {_MAX_IMAGES} arrays")
        for name, value in images.items():
            name = _text(name, "image name", 64)
            checked[name] = _image(name, value)
    options = raw.get("options")
    options = [] if options is None else options
    if type(options) is not list or len(options) > _MAX_OPTIONS:
        raise ProtocolError(BAD_OBSERVATION, f"options must be a list of <= {_MAX_OPTIONS} strings")
    return Observation(
        robot_id,
        episode_id,
        step,
        _text(raw.get("instruction", ""), "instruction", _MAX_TEXT),
        checked,
        _state(raw.get("state")),
        [_text(o, "option", _MAX_OPTION_TEXT) for o in options],
        _sim(raw.get("sim")),
    )


# --------------------------------------------------------------------------- parsing requests


def parse_request(data: bytes | memoryview) -> Request:
    """Decode and validate one robot message; raises ProtocolError with a code on bad input.

    Unpacked without hooks: arrays are decoded where the schema has them (images,
    state, inside `sim`), which costs a fraction of a hook called on every map.
    """
    msg = C.unpack(data, None)
    if not isinstance(msg, dict):
        raise ProtocolError(BAD_MESSAGE, f"a message must be a map, got {type(msg).__name__}")
    version = msg.get("protocol")
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        raise ProtocolError(
            VERSION_MISMATCH,
            f"client speaks protocol {C.brief(version)}; this server "
            f"speaks {PROTOCOL_VERSION} (supported: {list(SUPPORTED_VERSIONS)})",
        )
    kind = msg.get("type")
    if not isinstance(kind, str):  # an array here would make `kind == ...` below ambiguous
        raise ProtocolError(
            UNKNOWN_TYPE, f"message type must be a string, got {type(kind).__name__}"
        )
    request_id = _bounded_int(msg, "request_id", _MAX_REQUEST_ID)
    if kind == DecideRequest.TYPE:
        robot_id, episode_id = _ident(msg, "robot_id"), _ident(msg, "episode_id")
        step = _bounded_int(msg, "step", _MAX_STEP)
        obs = _observation(msg, robot_id, episode_id, step)
        seed = None if msg.get("seed") is None else _bounded_int(msg, "seed", _MAX_REQUEST_ID)
        task = _field(msg, "task", str, optional=True)
        if task is not None and len(task) > _MAX_TASK:
            raise ProtocolError(BAD_REQUEST, f"field 'task' is longer than {_MAX_TASK} characters")
        return DecideRequest(request_id, obs, _finite(msg, "reward"), seed, task)
    if kind == EndEpisode.TYPE:
        success = _field(msg, "success", bool, optional=True)
        return EndEpisode(
            request_id,
            _ident(msg, "robot_id"),
            _ident(msg, "episode_id"),
            _finite(msg, "reward"),
            bool(_field(msg, "terminated", bool)),
            bool(_field(msg, "truncated", bool)),
            success,
        )
    if kind == Hello.TYPE:
        return Hello(request_id, _ident(msg, "robot_id"))
    if kind == StatsRequest.TYPE:
        return StatsRequest(request_id)
    raise ProtocolError(
        UNKNOWN_TYPE, f"unknown message type {C.brief(kind)}; expected hello, decide, end or stats"
    )


def peek_ids(data: bytes | memoryview) -> tuple[int | None, str | None]:
    """Best-effort request and episode id of a message that failed validation."""
    try:
        msg = C.unpackb(data)
    except ProtocolError:
        return None, None
    if not isinstance(msg, dict):
        return None, None
    rid, eid = msg.get("request_id"), msg.get("episode_id")
    rid = rid if isinstance(rid, int) and not isinstance(rid, bool) and rid >= 0 else None
    eid = eid if isinstance(eid, str) and len(eid) <= 128 else None
    return rid, eid


# --------------------------------------------------------------------------- encoding


def _names(cls: type, *, without: tuple[str, ...] = ()) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls) if f.name not in without)


# The wire body of each message: its dataclass fields, except where noted.
_OBSERVATION_WIRE = _names(Observation, without=("robot_id", "episode_id", "step", "history"))
_DECISION_WIRE = _names(Decision, without=("teacher", "model_version"))
_PLAIN_BODY = {
    cls: _names(cls, without=("request_id",))
    for cls in (Hello, EndEpisode, StatsRequest, HelloReply, EndedReply, StatsReply, ErrorReply)
}


def _decide_body(req: DecideRequest) -> dict[str, Any]:
    obs = req.observation
    observation = {name: getattr(obs, name) for name in _OBSERVATION_WIRE}
    # arrays as maps here, not through msgpack's `default` hook (called per array)
    images = obs.images
    if images:
        observation["images"] = {
            name: C.array_map(v) if type(v) is np.ndarray else v for name, v in images.items()
        }
    if type(obs.state) is np.ndarray:
        observation["state"] = C.array_map(obs.state)
    return {
        "robot_id": obs.robot_id,
        "episode_id": obs.episode_id,
        "step": obs.step,
        "observation": observation,
        "reward": req.reward,
        "seed": req.seed,
        "task": req.task,
    }


def _f32_map(values: Any) -> dict[bytes, Any]:
    """A small float32 vector (an action) as openpi's array map; copies its few bytes."""
    a = np.ascontiguousarray(values, dtype="<f4")
    return {b"__ndarray__": True, b"data": a.tobytes(), b"dtype": "<f4", b"shape": list(a.shape)}


def _decision_reply(reply: DecisionReply) -> dict[str, Any]:
    """The wire map of a decision reply, built directly: it is on every request's path.

    Decision fields that are None are left out (readers treat absent as nil),
    which makes the reply cheaper to pack and to parse. The keys are
    `_DECISION_WIRE` plus the reply's own (tests/test_protocol.py keeps them in step).
    """
    d = reply.decision
    body = {
        "type": DecisionReply.TYPE,
        "protocol": PROTOCOL_VERSION,
        "request_id": reply.request_id,
        "episode_id": reply.episode_id,
        "step": reply.step,
        "decided_by": d.decided_by,
        "model_id": reply.model_id,
        "model_version": reply.model_version,
        "timing": reply.timing,
    }
    if d.action is not None:
        body["action"] = _f32_map(d.action)
    if d.skill_index is not None:
        body["skill_index"] = int(d.skill_index)
    if d.skill is not None:
        body["skill"] = d.skill
    if d.point is not None:
        body["point"] = [float(v) for v in d.point]
    if d.reasoning is not None:
        body["reasoning"] = d.reasoning
    if d.confidence is not None:
        body["confidence"] = float(d.confidence)
    return body


def encode(message: Request | Reply) -> bytes:
    """The msgpack bytes of any request or reply (one envelope for all of them)."""
    if type(message) is DecisionReply:
        return C.packb(_decision_reply(message))
    if isinstance(message, DecideRequest):
        body = _decide_body(message)
    else:
        body = {name: getattr(message, name) for name in _PLAIN_BODY[type(message)]}
    return C.packb(
        {
            "type": message.TYPE,
            "protocol": PROTOCOL_VERSION,
            "request_id": message.request_id,
            **body,
        }
    )


# --------------------------------------------------------------------------- parsing replies

_REPLIES: dict[str, type] = {
    cls.TYPE: cls for cls in (HelloReply, EndedReply, StatsReply, ErrorReply)
}


def parse_reply(data: bytes | memoryview) -> Reply:
    """Decode a server reply; raises ProtocolError when it is not one."""
    msg = C.unpack(data, None)  # a reply's only array is a decision's action
    if type(msg) is not dict or type(msg.get("type")) is not str:
        raise ProtocolError(BAD_MESSAGE, "reply is not a typed map")
    kind = msg["type"]
    if kind == DecisionReply.TYPE:
        get = msg.get
        action, point = get("action"), get("point")
        decision = Decision(
            action=None if action is None else C.decode_extra(action),
            skill_index=get("skill_index"),
            skill=get("skill"),
            point=None if point is None else tuple(point),
            reasoning=get("reasoning"),
            decided_by=get("decided_by"),
            confidence=get("confidence"),
        )
        return DecisionReply(
            get("request_id"),
            get("episode_id"),
            get("step"),
            decision,
            get("model_id") or "",
            get("model_version") or "",
            get("timing") or {},
        )
    cls = _REPLIES.get(kind)
    if cls is None:
        raise ProtocolError(BAD_MESSAGE, f"unknown reply type {kind[:64]!r}")
    return cls(msg.get("request_id"), **{name: msg.get(name) for name in _PLAIN_BODY[cls]})
