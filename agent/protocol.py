"""The runtime's wire format: msgpack messages, numpy arrays in openpi's encoding.

Pure functions only (no sockets): encode a message, decode and validate one.
A robot needs this module, `agent.client`, pyzmq, msgpack and numpy, nothing
else. Arrays travel as maps with the binary keys `__ndarray__`, `data`,
`dtype`, `shape`, exactly like openpi's `msgpack_numpy`, so arrays packed by
existing robot clients decode unchanged. Pickle never crosses the wire.
See docs/protocol.md.
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from agent.backends.base import Decision, Observation

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


# --------------------------------------------------------------------------- messages


@dataclass
class Hello:
    request_id: int
    robot_id: str


@dataclass
class DecideRequest:
    """One robot asks for its next decision; `reward` is what its previous decision earned."""

    request_id: int
    observation: Observation
    reward: float | None = None


@dataclass
class EndEpisode:
    request_id: int
    robot_id: str
    episode_id: str
    reward: float | None = None  # earned by the last decision
    terminated: bool = False
    truncated: bool = False
    success: bool | None = None


@dataclass
class StatsRequest:
    request_id: int


Request = Hello | DecideRequest | EndEpisode | StatsRequest


@dataclass
class Reply:
    """A decoded server reply (client side)."""

    type: str
    request_id: int | None
    episode_id: str | None = None
    step: int | None = None
    decision: Decision | None = None
    model_id: str | None = None
    model_version: str | None = None
    timing: dict[str, float] = field(default_factory=dict)
    body: dict[str, Any] = field(default_factory=dict)  # metadata, stats, end summary
    error_code: str | None = None
    error_message: str | None = None


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


# --------------------------------------------------------------------------- server side


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
    if kind == "decide":
        robot_id, episode_id = _ident(msg, "robot_id"), _ident(msg, "episode_id")
        step = _bounded_int(msg, "step", _MAX_STEP)
        obs = _observation(msg, robot_id, episode_id, step)
        return DecideRequest(request_id, obs, _finite(msg, "reward"))
    if kind == "end":
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
    if kind == "hello":
        return Hello(request_id, _ident(msg, "robot_id"))
    if kind == "stats":
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


def encode_error(
    code: str, message: str, request_id: int | None = None, episode_id: str | None = None
) -> bytes:
    return packb(
        {
            "type": "error",
            "protocol": PROTOCOL_VERSION,
            "request_id": request_id,
            "episode_id": episode_id,
            "code": code,
            "message": message,
        }
    )


def encode_body(kind: str, request_id: int, body: dict[str, Any]) -> bytes:
    """A `hello`, `ended` or `stats` reply."""
    return packb({"type": kind, "protocol": PROTOCOL_VERSION, "request_id": request_id, **body})


def encode_decision(
    request: DecideRequest,
    decision: Decision,
    model_id: str,
    model_version: str,
    timing: dict[str, float],
) -> bytes:
    obs = request.observation
    action = None if decision.action is None else np.asarray(decision.action, dtype=np.float32)
    point = None if decision.point is None else [float(v) for v in decision.point]
    return packb(
        {
            "type": "decision",
            "protocol": PROTOCOL_VERSION,
            "request_id": request.request_id,
            "episode_id": obs.episode_id,
            "step": obs.step,
            "action": action,
            "skill_index": None if decision.skill_index is None else int(decision.skill_index),
            "skill": decision.skill,
            "point": point,
            "reasoning": decision.reasoning,
            "model_id": model_id,
            "model_version": model_version,
            "timing": timing,
        }
    )


# --------------------------------------------------------------------------- robot side


def encode_hello(request_id: int, robot_id: str) -> bytes:
    return packb(
        {
            "type": "hello",
            "protocol": PROTOCOL_VERSION,
            "request_id": request_id,
            "robot_id": robot_id,
        }
    )


def encode_decide(
    request_id: int,
    robot_id: str,
    episode_id: str,
    step: int,
    *,
    images: dict[str, np.ndarray] | None = None,
    state: np.ndarray | None = None,
    instruction: str = "",
    options: list[str] | tuple[str, ...] = (),
    sim: dict[str, Any] | None = None,
    reward: float | None = None,
) -> bytes:
    observation = {
        "images": images or {},
        "state": state,
        "instruction": instruction,
        "options": list(options),
        "sim": sim,
    }
    return packb(
        {
            "type": "decide",
            "protocol": PROTOCOL_VERSION,
            "request_id": request_id,
            "robot_id": robot_id,
            "episode_id": episode_id,
            "step": step,
            "observation": observation,
            "reward": reward,
        }
    )


def encode_end(
    request_id: int,
    robot_id: str,
    episode_id: str,
    *,
    reward: float | None,
    terminated: bool,
    truncated: bool,
    success: bool | None,
) -> bytes:
    return packb(
        {
            "type": "end",
            "protocol": PROTOCOL_VERSION,
            "request_id": request_id,
            "robot_id": robot_id,
            "episode_id": episode_id,
            "reward": reward,
            "terminated": terminated,
            "truncated": truncated,
            "success": success,
        }
    )


def encode_stats(request_id: int) -> bytes:
    return packb({"type": "stats", "protocol": PROTOCOL_VERSION, "request_id": request_id})


def parse_reply(data: bytes | memoryview) -> Reply:
    """Decode a server reply; raises ProtocolError when it is not one."""
    msg = unpackb(data)
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError(BAD_MESSAGE, "reply is not a typed map")
    kind, rid = msg["type"], msg.get("request_id")
    if kind == "error":
        return Reply(
            kind,
            rid,
            msg.get("episode_id"),
            error_code=msg.get("code"),
            error_message=msg.get("message"),
        )
    if kind == "decision":
        point = msg.get("point")
        decision = Decision(
            action=msg.get("action"),
            skill_index=msg.get("skill_index"),
            skill=msg.get("skill"),
            point=None if point is None else tuple(point),
            reasoning=msg.get("reasoning"),
        )
        return Reply(
            kind,
            rid,
            msg.get("episode_id"),
            msg.get("step"),
            decision,
            msg.get("model_id"),
            msg.get("model_version"),
            msg.get("timing") or {},
        )
    body = {k: v for k, v in msg.items() if k not in ("type", "protocol", "request_id")}
    return Reply(kind, rid, body=body)
