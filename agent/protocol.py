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
import os
import re
import reprlib
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
TOO_LARGE = "too_large"  # the whole message (all its frames) is over the size limit

_DTYPES = {  # wire name -> dtype: the only dtypes an array may have
    np.dtype(name).str: np.dtype(name)
    for name in ("bool", "u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f2", "f4", "f8")
}
_ALLOWED_DTYPES = frozenset(_DTYPES)
_F32 = np.dtype(np.float32)
_U8 = np.dtype(np.uint8)
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
MAX_ERROR_TEXT = 1024  # an error reply's message is cut to this many characters


class ProtocolError(ValueError):
    """A message that breaks the protocol; becomes an `error` reply with `code`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Brief(reprlib.Repr):
    """reprlib with bytes cut before they are formatted (reprlib formats them whole)."""

    def repr_bytes(self, x: bytes, level: int) -> str:
        return repr(x[: self.maxstring]) + ("..." if len(x) > self.maxstring else "")


_brief = _Brief()
_brief.maxlevel, _brief.maxstring, _brief.maxother, _brief.maxlong = 3, 48, 48, 48
_brief.maxlist = _brief.maxtuple = _brief.maxdict = _brief.maxset = 4


def brief(value: Any, limit: int = 80) -> str:
    """A short repr of an untrusted value: bounded in length and depth, never raises.

    Robot input ends up in error messages; `repr` of a 16 MB string or of a
    list nested a thousand deep would be a 16 MB reply or a RecursionError.
    """
    try:
        text = _brief.repr(value)
    except Exception:  # a hostile __repr__ cannot come off the wire, but never fail here
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- arrays


_WIRE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def _array_map(obj: np.ndarray) -> dict[bytes, Any]:
    """openpi's map for an array; its data is a view of the array's memory (no copy)."""
    name = _WIRE_NAMES.get(obj.dtype)
    if name is None:  # big-endian (sent little-endian) or not allowed at all
        if obj.dtype.byteorder != ">":
            raise TypeError(f"arrays of dtype {obj.dtype} cannot be sent")
        obj = obj.astype(obj.dtype.newbyteorder("<"))
        name = obj.dtype.str
    data = memoryview(obj)
    if not data.c_contiguous:
        data = memoryview(np.ascontiguousarray(obj))
    return {
        b"__ndarray__": True,
        b"data": _Large(data) if data.nbytes >= _SPLICE_BYTES else data,
        b"dtype": name,
        b"shape": list(obj.shape),
    }


def _encode_extra(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return _array_map(obj)
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
    dtype = _DTYPES.get(raw) if type(raw) is str else None
    if dtype is None and isinstance(raw, bytes):
        dtype = _DTYPES.get(raw.decode("ascii", "replace"))
    if dtype is None:
        raise ProtocolError(BAD_ARRAY, f"array dtype {brief(raw)} is not allowed")
    return dtype


def _decode_array(obj: dict) -> np.ndarray:
    """The array an openpi array map describes: a view of the message's bytes, checked."""
    dtype = _checked_dtype(obj.get(b"dtype"))
    data, shape = obj.get(b"data"), obj.get(b"shape")
    if type(data) is not bytes:
        raise ProtocolError(BAD_ARRAY, "array data must be binary")
    if type(shape) is not list or len(shape) > _MAX_ARRAY_DIMS:
        raise ProtocolError(BAD_ARRAY, f"array shape must be a list of <= {_MAX_ARRAY_DIMS} ints")
    size = dtype.itemsize
    for n in shape:
        if type(n) is not int or n < 0:  # (bool is not int here)
            raise ProtocolError(
                BAD_ARRAY, f"array shape {brief(shape)} must hold non-negative ints"
            )
        size *= n
    if size != len(data):
        raise ProtocolError(
            BAD_ARRAY,
            f"array of shape {shape} and dtype {dtype.str} needs {size} bytes, got {len(data)}",
        )
    try:
        return np.ndarray(shape, dtype, data)
    except (ValueError, OverflowError) as exc:  # e.g. an empty array with a huge dimension
        raise ProtocolError(BAD_ARRAY, f"array of shape {brief(shape)}: {exc}") from None


_SPLICE_BYTES = 1 << 16  # array data this large is joined in after packing (msgpack: bin 32)
_SPLICE_EXT = 42  # the ext type of its placeholders


class _Large:
    """Array data to join into the packed message in place of a placeholder."""

    __slots__ = ("data",)

    def __init__(self, data: memoryview) -> None:
        self.data = data


class _Packer:
    """A thread's msgpack packer that copies large array data once.

    Packed plainly, an image is copied into msgpack's buffer and the buffer
    into the message: two copies. Here large data is packed as an 18-byte
    placeholder (an ext record: a random per-thread tag and an index), and the
    message is joined from the packed pieces, each placeholder replaced by its
    bin 32 header and data: one copy, byte for byte what plain packing gives.
    A message whose strings hold the tag (never, in practice) is packed plainly.
    The packer itself is reused: a fresh one allocates its buffer anew every time.
    """

    def __init__(self) -> None:
        self.packer = msgpack.Packer(default=self._default, use_bin_type=True, autoreset=False)
        self.tag = b"\xd8" + _SPLICE_EXT.to_bytes(1, "big") + os.urandom(12)
        self.large: list[memoryview] | None = None  # None: pack large data plainly

    def _default(self, obj: Any) -> Any:
        if type(obj) is _Large:
            if self.large is None:
                return obj.data
            self.large.append(obj.data)
            index = (len(self.large) - 1).to_bytes(4, "big")
            return msgpack.ExtType(_SPLICE_EXT, self.tag[2:] + index)
        return _encode_extra(obj)

    def _pack(self, obj: Any, splice: bool) -> tuple[bytes, list[memoryview]]:
        self.large = [] if splice else None
        try:
            self.packer.pack(obj)
            return self.packer.bytes(), self.large or []
        finally:
            self.packer.reset()
            self.large = None

    def pack(self, obj: Any) -> bytes:
        head, large = self._pack(obj, splice=True)
        if not large:
            return head
        if head.count(self.tag) != len(large):
            return self._pack(obj, splice=False)[0]
        parts, start = [], 0
        for i, data in enumerate(large):
            at = head.index(self.tag + i.to_bytes(4, "big"), start)
            parts += (head[start:at], b"\xc6" + data.nbytes.to_bytes(4, "big"), data)
            start = at + len(self.tag) + 4
        parts.append(head[start:])
        return b"".join(parts)


_local = threading.local()


def packb(obj: Any) -> bytes:
    """Encode a message (numpy arrays included) as msgpack; large arrays are copied once."""
    packer = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = _Packer()
    return packer.pack(obj)


def unpackb(data: bytes | memoryview) -> Any:
    """Decode msgpack bytes; anything malformed raises ProtocolError(BAD_MESSAGE/BAD_ARRAY)."""
    return _unpack(data, _decode_extra)


def _unpack(data: bytes | memoryview, hook: Any) -> Any:
    try:
        return msgpack.unpackb(data, object_hook=hook, raw=False, strict_map_key=False)
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


_known_ids: set[str] = set()  # identifiers that matched before (a robot sends the same ones)


def _ident(msg: dict, name: str) -> str:
    value = _field(msg, name, str)
    if value in _known_ids:
        return value
    if not _ID_RE.fullmatch(value):
        raise ProtocolError(
            BAD_REQUEST, f"field {name!r} must match {_ID_RE.pattern}, got {brief(value)}"
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
    return _decode_array(value)


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
                    node[key] = _decode_array(child)
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
    msg = _unpack(data, None)
    if not isinstance(msg, dict):
        raise ProtocolError(BAD_MESSAGE, f"a message must be a map, got {type(msg).__name__}")
    version = msg.get("protocol")
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        raise ProtocolError(
            VERSION_MISMATCH,
            f"client speaks protocol {brief(version)}; this server "
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
        UNKNOWN_TYPE, f"unknown message type {brief(kind)}; expected hello, decide, end or stats"
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
    observation = {name: getattr(obs, name) for name in _OBSERVATION_WIRE}
    # arrays as maps here, not through msgpack's `default` hook (called per array)
    images = obs.images
    if images:
        observation["images"] = {
            name: _array_map(v) if type(v) is np.ndarray else v for name, v in images.items()
        }
    if type(obs.state) is np.ndarray:
        observation["state"] = _array_map(obs.state)
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
        return packb(_decision_reply(message))
    if isinstance(message, DecideRequest):
        body = _decide_body(message)
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
    msg = _unpack(data, None)  # a reply's only array is a decision's action
    if type(msg) is not dict or type(msg.get("type")) is not str:
        raise ProtocolError(BAD_MESSAGE, "reply is not a typed map")
    kind = msg["type"]
    if kind == DecisionReply.TYPE:
        get = msg.get
        action, point = get("action"), get("point")
        decision = Decision(
            action=None if action is None else _decode_extra(action),
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
