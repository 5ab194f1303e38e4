"""The runtime's wire format: msgpack messages, numpy arrays in openpi's encoding.

Pure functions only (no sockets): `encode` any message of `agent.messages`,
`parse_request` / `parse_reply` bytes back into one (validated). A robot needs
this module, `agent.messages`, `agent.client`, pyzmq, msgpack and numpy,
nothing else. Arrays travel as maps with the binary keys `__ndarray__`, `data`,
`dtype`, `shape`, exactly like openpi's `msgpack_numpy`, so arrays packed by
existing robot clients decode unchanged. Pickle never crosses the wire.
See docs/protocol.md.
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import fields
from typing import Any

import msgpack
import numpy as np

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

# Error codes carried by `error` replies.
BAD_MESSAGE = "bad_message"  # not msgpack / not a map
BAD_REQUEST = "bad_request"  # wrong schema: missing or mistyped field
BAD_ARRAY = "bad_array"  # array header inconsistent or dtype not allowed
BAD_OBSERVATION = "bad_observation"  # wrong dtype, shape, NaN, or not what the env produces
VERSION_MISMATCH = "version_mismatch"
UNKNOWN_TYPE = "unknown_type"
BACKEND_ERROR = "backend_error"
INTERNAL_ERROR = "internal_error"
SHUTTING_DOWN = "shutting_down"

_ALLOWED_DTYPES = frozenset(
    np.dtype(name).str
    for name in ("bool", "u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f2", "f4", "f8")
)
_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_MAX_ARRAY_DIMS = 8
_MAX_IMAGES = 8
_MAX_IMAGE_SIDE = 4096
_MAX_STATE = 4096
_MAX_TEXT = 4096
_MAX_OPTIONS = 64
_MAX_OPTION_TEXT = 512
_MAX_TASK = 128
_MAX_REQUEST_ID = 2**63 - 1
_MAX_STEP = 2**31 - 1


class ProtocolError(ValueError):
    """A message that breaks the protocol; becomes an `error` reply with `code`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------- arrays


def _encode_extra(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.byteorder == ">":
            obj = obj.astype(obj.dtype.newbyteorder("<"))
        if obj.dtype.str not in _ALLOWED_DTYPES:
            raise TypeError(f"arrays of dtype {obj.dtype} cannot be sent")
        if not obj.flags.c_contiguous:
            obj = np.ascontiguousarray(obj)
        data = memoryview(obj.reshape(-1)).cast("B") if obj.size else b""  # no copy
        return {
            b"__ndarray__": True,
            b"data": data,
            b"dtype": obj.dtype.str,
            b"shape": list(obj.shape),
        }
    if isinstance(obj, np.generic):
        if obj.dtype.str not in _ALLOWED_DTYPES:
            raise TypeError(f"scalars of dtype {obj.dtype} cannot be sent")
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot encode {type(obj).__name__} in a message")


def _decode_extra(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        return _decode_array(obj)
    if b"__npgeneric__" in obj:
        dtype = _checked_dtype(obj.get(b"dtype"))
        try:
            return dtype.type(obj[b"data"])
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ProtocolError(BAD_ARRAY, f"bad numpy scalar: {exc}") from None
    return obj


def _checked_dtype(raw: Any) -> np.dtype:
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", "replace")
    if not isinstance(raw, str) or raw not in _ALLOWED_DTYPES:
        raise ProtocolError(BAD_ARRAY, f"array dtype {raw!r} is not allowed")
    return np.dtype(raw)


def _decode_array(obj: dict) -> np.ndarray:
    dtype = _checked_dtype(obj.get(b"dtype"))
    data, shape = obj.get(b"data"), obj.get(b"shape")
    if not isinstance(data, bytes):
        raise ProtocolError(BAD_ARRAY, "array data must be binary")
    if not isinstance(shape, list | tuple) or len(shape) > _MAX_ARRAY_DIMS:
        raise ProtocolError(BAD_ARRAY, f"array shape must be a list of <= {_MAX_ARRAY_DIMS} ints")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise ProtocolError(BAD_ARRAY, f"array shape {shape!r} must hold non-negative ints")
    if math.prod(shape) * dtype.itemsize != len(data):
        raise ProtocolError(
            BAD_ARRAY,
            f"array of shape {list(shape)} and dtype {dtype.str} "
            f"needs {math.prod(shape) * dtype.itemsize} bytes, got {len(data)}",
        )
    return np.ndarray(buffer=data, dtype=dtype, shape=tuple(shape))


_local = threading.local()


def packb(obj: Any) -> bytes:
    """Encode a message (numpy arrays included) as msgpack.

    Reuses one packer per thread: a fresh packer allocates its buffer anew for
    every message, which costs ~30x more than the copy itself for 150 kB images.
    """
    packer = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer(
            default=_encode_extra, use_bin_type=True, autoreset=False
        )
    try:
        packer.pack(obj)
        return packer.bytes()
    finally:
        packer.reset()


def unpackb(data: bytes | memoryview) -> Any:
    """Decode msgpack bytes; anything malformed raises ProtocolError(BAD_MESSAGE/BAD_ARRAY)."""
    try:
        return msgpack.unpackb(data, object_hook=_decode_extra, raw=False, strict_map_key=False)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises many types for garbage input
        raise ProtocolError(BAD_MESSAGE, f"not a valid msgpack message: {exc}") from None


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


def _ident(msg: dict, name: str) -> str:
    value = _field(msg, name, str)
    if not _ID_RE.fullmatch(value):
        raise ProtocolError(
            BAD_REQUEST, f"field {name!r} must match {_ID_RE.pattern}, got {value!r}"
        )
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


def _image(name: str, value: Any) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise ProtocolError(BAD_OBSERVATION, f"image {name!r} must be an array")
    if value.dtype != np.uint8:
        raise ProtocolError(BAD_OBSERVATION, f"image {name!r} must be uint8, got {value.dtype}")
    if value.ndim != 3 or value.shape[2] != 3:
        raise ProtocolError(BAD_OBSERVATION, f"image {name!r} must be HxWx3, got {value.shape}")
    if not (0 < value.shape[0] <= _MAX_IMAGE_SIDE and 0 < value.shape[1] <= _MAX_IMAGE_SIDE):
        raise ProtocolError(BAD_OBSERVATION, f"image {name!r} size {value.shape[:2]} out of range")
    return value


def _state(value: Any) -> np.ndarray | None:
    if value is None:
        return None
    if not isinstance(value, np.ndarray):
        raise ProtocolError(BAD_OBSERVATION, "state must be an array")
    if value.dtype != np.float32:
        raise ProtocolError(BAD_OBSERVATION, f"state must be float32, got {value.dtype}")
    if value.ndim != 1 or value.shape[0] > _MAX_STATE:
        raise ProtocolError(
            BAD_OBSERVATION,
            f"state must be 1-D with <= {_MAX_STATE} values, got shape {value.shape}",
        )
    if not np.isfinite(value).all():
        raise ProtocolError(BAD_OBSERVATION, "state contains NaN or infinity")
    return value


def _observation(msg: dict, robot_id: str, episode_id: str, step: int) -> Observation:
    raw = _field(msg, "observation", dict)
    images = raw.get("images")
    images = {} if images is None else images
    if not isinstance(images, dict) or len(images) > _MAX_IMAGES:
        raise ProtocolError(BAD_OBSERVATION, f"images must be a map of <= {_MAX_IMAGES} arrays")
    checked = {}
    for name, value in images.items():
        checked[_text(name, "image name", 64)] = _image(str(name), value)
    options = raw.get("options")
    options = [] if options is None else options
    if not isinstance(options, list) or len(options) > _MAX_OPTIONS:
        raise ProtocolError(BAD_OBSERVATION, f"options must be a list of <= {_MAX_OPTIONS} strings")
    sim = raw.get("sim")
    if sim is not None and not isinstance(sim, dict):
        raise ProtocolError(BAD_OBSERVATION, "sim must be a map")
    return Observation(
        robot_id=robot_id,
        episode_id=episode_id,
        step=step,
        instruction=_text(raw.get("instruction", ""), "instruction", _MAX_TEXT),
        images=checked,
        state=_state(raw.get("state")),
        options=[_text(o, "option", _MAX_OPTION_TEXT) for o in options],
        sim=sim,
    )


# --------------------------------------------------------------------------- parsing requests


def parse_request(data: bytes | memoryview) -> Request:
    """Decode and validate one robot message; raises ProtocolError with a code on bad input."""
    msg = unpackb(data)
    if not isinstance(msg, dict):
        raise ProtocolError(BAD_MESSAGE, f"a message must be a map, got {type(msg).__name__}")
    version = msg.get("protocol")
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        raise ProtocolError(
            VERSION_MISMATCH,
            f"client speaks protocol {version!r}; this server "
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
        UNKNOWN_TYPE, f"unknown message type {kind!r}; expected hello, decide, end or stats"
    )


def peek_ids(data: bytes | memoryview) -> tuple[int | None, str | None]:
    """Best-effort request and episode id of a message that failed validation."""
    try:
        msg = unpackb(data)
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
    return {
        "robot_id": obs.robot_id,
        "episode_id": obs.episode_id,
        "step": obs.step,
        "observation": {name: getattr(obs, name) for name in _OBSERVATION_WIRE},
        "reward": req.reward,
        "seed": req.seed,
        "task": req.task,
    }


def _decision_fields(decision: Decision) -> dict[str, Any]:
    body = {name: getattr(decision, name) for name in _DECISION_WIRE}
    if decision.action is not None:
        body["action"] = np.asarray(decision.action, dtype=np.float32)
    if decision.skill_index is not None:
        body["skill_index"] = int(decision.skill_index)
    if decision.point is not None:
        body["point"] = [float(v) for v in decision.point]
    if decision.confidence is not None:
        body["confidence"] = float(decision.confidence)
    return body


def _decision_reply_body(reply: DecisionReply) -> dict[str, Any]:
    return {
        "episode_id": reply.episode_id,
        "step": reply.step,
        **_decision_fields(reply.decision),
        "model_id": reply.model_id,
        "model_version": reply.model_version,
        "timing": reply.timing,
    }


def encode(message: Request | Reply) -> bytes:
    """The msgpack bytes of any request or reply (one envelope for all of them)."""
    if isinstance(message, DecideRequest):
        body = _decide_body(message)
    elif isinstance(message, DecisionReply):
        body = _decision_reply_body(message)
    else:
        body = {name: getattr(message, name) for name in _PLAIN_BODY[type(message)]}
    return packb(
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
    msg = unpackb(data)
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError(BAD_MESSAGE, "reply is not a typed map")
    kind = msg["type"]
    if kind == DecisionReply.TYPE:
        point = msg.get("point")
        decision = Decision(**{name: msg.get(name) for name in _DECISION_WIRE})
        decision.point = None if point is None else tuple(point)
        return DecisionReply(
            msg.get("request_id"),
            msg.get("episode_id"),
            msg.get("step"),
            decision,
            msg.get("model_id") or "",
            msg.get("model_version") or "",
            msg.get("timing") or {},
        )
    cls = _REPLIES.get(kind)
    if cls is None:
        raise ProtocolError(BAD_MESSAGE, f"unknown reply type {kind[:64]!r}")
    return cls(msg.get("request_id"), **{name: msg.get(name) for name in _PLAIN_BODY[cls]})
