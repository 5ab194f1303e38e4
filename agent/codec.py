"""The wire codec: msgpack with numpy arrays in openpi's encoding, and the errors it raises.

Pure functions, no schema and no sockets (the schema is `agent.protocol`).
Arrays travel as maps with the binary keys `__ndarray__`, `data`, `dtype`,
`shape`, exactly like openpi's `msgpack_numpy`, so arrays packed by existing
robot clients decode unchanged; only the dtypes below are allowed, and a
decoded array is a checked view of the message's bytes (no copy). Large
arrays are copied once when packing. Pickle never crosses the wire.
`brief` bounds what of an untrusted value may be echoed in an error.
"""

from __future__ import annotations

import os
import reprlib
import threading
from typing import Any

import msgpack
import numpy as np

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
MAX_ARRAY_DIMS = 8


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


def array_map(obj: np.ndarray) -> dict[bytes, Any]:
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
        return array_map(obj)
    if isinstance(obj, np.generic):
        if obj.dtype.str not in _ALLOWED_DTYPES:
            raise TypeError(f"scalars of dtype {obj.dtype} cannot be sent")
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot encode {type(obj).__name__} in a message")


def decode_extra(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        return decode_array(obj)
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


def decode_array(obj: dict) -> np.ndarray:
    """The array an openpi array map describes: a view of the message's bytes, checked."""
    dtype = _checked_dtype(obj.get(b"dtype"))
    data, shape = obj.get(b"data"), obj.get(b"shape")
    if type(data) is not bytes:
        raise ProtocolError(BAD_ARRAY, "array data must be binary")
    if type(shape) is not list or len(shape) > MAX_ARRAY_DIMS:
        raise ProtocolError(BAD_ARRAY, f"array shape must be a list of <= {MAX_ARRAY_DIMS} ints")
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
    return unpack(data, decode_extra)


def unpack(data: bytes | memoryview, hook: Any) -> Any:
    try:
        return msgpack.unpackb(data, object_hook=hook, raw=False, strict_map_key=False)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises many types for garbage input
        raise ProtocolError(BAD_MESSAGE, f"not a valid msgpack message: {exc}") from None
