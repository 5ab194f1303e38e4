"""The one interface every decision-maker implements, and how backends take options.

The server hands a backend a batch of observations from different robots and
gets one decision per observation back. Backends never see sockets, msgpack or
episodes; the server never sees models. This module imports no torch.

Options: each backend declares an `Options` dataclass; `agent serve
--backend-opt KEY=VALUE` strings and `load_backend(..., key=value)` keyword
arguments are both turned into it by `parse_options`, with one clear error per
unknown key or bad value.

New model versions: `load_version()` loads and verifies a newer version off
the serving thread (slow, any thread), `swap(loaded)` serves it from the next
batch on (cheap, the decision loop's thread). The server runs the first on a
reloader thread and the second between batches, so loading never stalls robots.
"""

from __future__ import annotations

import abc
import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from agent.messages import Decision, Observation


@dataclass(frozen=True)
class EnvInfo:
    """What a backend may know about the environment it serves."""

    env_id: str
    action_shape: tuple[int, ...] | None = None  # low-level Box action, if any
    action_low: np.ndarray | None = None
    action_high: np.ndarray | None = None
    has_skills: bool = False


class BackendError(RuntimeError):
    """A backend could not decide (or start); the server turns it into an error reply."""


class BadObservation(ValueError):
    """An observation this backend can never decide (`check`); a `bad_observation` reply."""


@dataclass
class NoOptions:
    """The options of a backend that takes none."""

    def check(self) -> None:
        """Refuse values that parse but make no sense (BackendError)."""


def parse_option_pairs(pairs: Sequence[str]) -> dict[str, str]:
    """`["temperature=0.6", ...]` -> `{"temperature": "0.6"}` (values are converted later)."""
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise BackendError(f"--backend-opt expects KEY=VALUE, got {pair!r}")
        options[key.strip()] = value
    return options


def parse_options(cls: type, backend: str, options: dict[str, Any]) -> Any:
    """Build the options dataclass `cls` from strings or typed values, then `check()` it."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(known))
    if unknown:
        if not known:
            raise BackendError(f"the {backend} backend takes no options, got {unknown}")
        raise BackendError(f"unknown {backend} option(s) {unknown}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, raw in options.items():
        try:
            values[name] = _convert(raw, hints[name])
        except (TypeError, ValueError) as exc:
            raise BackendError(f"{backend} option {name}={raw!r}: {exc}") from None
    parsed = cls(**values)
    parsed.check()
    return parsed


def _convert(raw: Any, kind: Any) -> Any:
    if isinstance(kind, types.UnionType):  # `float | None`: "none" or the other type
        if raw is None or (isinstance(raw, str) and raw.lower() in ("", "none")):
            return None
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(raw, str) and raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if kind is int and isinstance(raw, float) and not raw.is_integer():
        raise ValueError("expected an integer")
    return kind(raw)


class Backend(abc.ABC):
    """Decide a batch of observations; report model identity; warm up; load new versions."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    # Seconds between `load_version` polls when the server is not told otherwise;
    # None: this backend has no versions to pick up.
    reload_every_s: ClassVar[float | None] = None

    def __init__(self, env: EnvInfo, model: str | None = None, **options: Any) -> None:
        self.env = env
        self.model = model
        self.options = parse_options(self.Options, self.name, options)

    @property
    def model_id(self) -> str:
        return self.model or self.name

    @property
    def model_version(self) -> str:
        return "0"

    def check(self, obs: Observation) -> None:  # noqa: B027 - optional hook
        """Raise BadObservation for an observation this backend cannot take (cheap).

        The server calls it when a request arrives, before batching, so one
        robot's bad input never reaches (or fails) a batch of other robots'.
        """

    @abc.abstractmethod
    def decide(self, batch: Sequence[Observation]) -> list[Decision | BackendError]:
        """One decision per observation, in order.

        A BackendError in place of a decision answers that robot alone with
        `backend_error`; raising fails the whole batch (every robot in it gets
        the error), so reserve it for failures that are not one observation's.
        """

    def warmup(self) -> None:  # noqa: B027 - optional hook
        """Pay one-off costs (compilation, allocation) before the first robot."""

    def load_version(self) -> Any | None:
        """Load and verify a newer model version, if there is one (slow; off the serving thread).

        Returns an opaque loaded model for `swap`, or None when there is nothing
        new. Raises BackendError for a version that must not be served.
        """
        return None

    def swap(self, loaded: Any) -> None:
        """Serve `loaded` (from `load_version`) from the next batch on; cheap."""
        raise BackendError(f"the {self.name} backend has no versions to swap")

    def stats(self) -> dict[str, Any]:
        """Counters for logs and benchmarks (e.g. parse failures, fallbacks)."""
        return {}
