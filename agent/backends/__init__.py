"""Decision backends, looked up by name and imported only when chosen.

A new backend is one module with a `Backend` subclass plus one line in
`BACKENDS`; the server does not change.
"""

from __future__ import annotations

import importlib
from typing import Any

from agent.backends.base import Backend, BackendError, EnvInfo

BACKENDS: dict[str, str] = {
    "cosmos": "agent.backends.cosmos:CosmosBackend",
    "onnx": "agent.backends.onnx:OnnxBackend",
    "oracle": "agent.backends.oracle:OracleBackend",
    "policy": "agent.backends.policy:PolicyBackend",
    "zero": "agent.backends.zero:ZeroBackend",
}


def load_backend(name: str, env: EnvInfo, model: str | None = None, **options: Any) -> Backend:
    """Instantiate the backend registered as `name`."""
    try:
        target = BACKENDS[name]
    except KeyError:
        raise BackendError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}") from None
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(env, model, **options)


__all__ = ["BACKENDS", "Backend", "BackendError", "EnvInfo", "load_backend"]
