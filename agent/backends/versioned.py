"""`VersionedBackend`: a backend that serves published versions of a model and hot-reloads new ones.

A subclass says where versions come from and how one is loaded:
`newest()` names the newest version available now (cheap: polled by the
server's reloader thread), `load(key)` loads it into a `Loaded` model (slow,
on the reloader thread). The base does the rest, the same way for every
model family (the student in torch, its ONNX export, Cosmos-Reason next):

* a new version is loaded and verified off the serving thread
  (`load_version`): `load` raises for what cannot be served (hashes,
  parameters, a warm-up batch whose outputs are not finite), and the refusal
  is counted and remembered, never retried;
* it is swapped in between batches (`swap`); with `swap_at=episode` each
  episode stays on the version that decided its first step;
* `check` and `decide` go to the version serving the observation's episode,
  and every decision says which version made it.
"""

from __future__ import annotations

import abc
import dataclasses
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from agent.backends.base import Backend, BackendError, BadObservation, EnvInfo
from agent.extras import MissingExtra, require
from agent.messages import Decision, Observation

MAX_PINNED_EPISODES = 4096
MAX_REFUSALS_SHOWN = 5


class Loaded(Protocol):
    """One verified version in memory (`agent.student.inference.TorchStudent`,
    `agent.student.onnx.OnnxRunner`)."""

    model_version: str

    def check(self, obs: Observation) -> None:
        """ValueError for an observation this version cannot take (cheap)."""

    def decide(self, observations: Sequence[Observation]) -> list[Decision]: ...


@dataclass
class VersionedOptions:
    swap_at: str = "batch"  # batch: new versions serve from the next batch; episode: new episodes
    warmup_batch: int = 4  # observations in the verification batch of a new version
    threads: int = 1  # the model's intra-op threads (torch, onnxruntime)

    def check(self) -> None:
        if self.swap_at not in ("batch", "episode"):
            raise BackendError(f"swap_at must be batch or episode, got {self.swap_at!r}")
        if self.warmup_batch < 1 or self.threads < 1:
            raise BackendError("warmup_batch and threads must be >= 1")


@dataclass
class VersionCounters:
    decisions: int = 0
    batches: int = 0
    versions_loaded: int = 0
    versions_refused: int = 0


class VersionedBackend(Backend):
    """Serve the newest verified version of `--model`; see the module docstring."""

    Options: ClassVar[type] = VersionedOptions
    reload_every_s: ClassVar[float | None] = 1.0
    extra: ClassVar[str]  # the extra whose packages `load` needs
    model_help: ClassVar[str]  # what --model names, for the error when it is missing
    served: ClassVar[str] = "the model"  # what it serves, in error messages

    def __init__(self, env: EnvInfo, model: str | None = None, **options: Any) -> None:
        super().__init__(env, model, **options)
        if not model:
            raise BackendError(f"the {self.name} backend needs --model {self.model_help}")
        try:
            require(self.extra, f"the {self.name} backend")
        except MissingExtra as exc:
            raise BackendError(str(exc)) from None
        self.counters = VersionCounters()
        self.refused: dict[str, str] = {}
        self._pinned: OrderedDict[str, Loaded] = OrderedDict()
        self.setup(model)
        key = self.newest()
        loaded = self._load(key)
        if loaded is None:
            raise BackendError(f"cannot serve {model}: {self.refused[str(key)]}")
        self.current = loaded
        self._offered = key  # the newest version handed to the reloader (its thread)

    # ------------------------------------------------------------------ what a subclass says

    def setup(self, model: str) -> None:
        """Take `--model` apart before the first `newest()` (e.g. a root or one version)."""

    @abc.abstractmethod
    def newest(self) -> str | None:
        """The key of the newest version available now (None: none); cheap, polled."""

    @abc.abstractmethod
    def load(self, key: str) -> Loaded:
        """Load and verify version `key`; raise (ValueError, RuntimeError, OSError) if it must
        not be served."""

    # ------------------------------------------------------------------ versions

    @property
    def model_version(self) -> str:
        return self.current.model_version

    def _load(self, key: str | None) -> Loaded | None:
        """A verified version, or None (and the reason in `refused`) if it must not be served."""
        try:
            if key is None:
                raise FileNotFoundError(f"{self.model} holds no version to serve")
            loaded = self.load(key)
        except (ValueError, RuntimeError, OSError) as exc:
            self.refused[str(key)] = f"{type(exc).__name__}: {exc}"[:500]
            self.counters.versions_refused += 1
            return None
        self.counters.versions_loaded += 1
        return loaded

    def load_version(self) -> Loaded | None:
        key = self.newest()
        if key is None or key == self._offered or key in self.refused:
            return None  # nothing new (a loaded version may still wait for its swap)
        loaded = self._load(key)
        if loaded is None:
            raise BackendError(f"version {key} refused: {self.refused[key]}")
        self._offered = key
        return loaded

    def swap(self, loaded: Loaded) -> None:
        self.current = loaded

    # ------------------------------------------------------------------ deciding

    def check(self, obs: Observation) -> None:
        try:
            self._version_for(obs, pin=False).check(obs)
        except ValueError as exc:
            raise BadObservation(f"{self.served} cannot take this observation: {exc}") from None

    def decide(self, batch: Sequence[Observation]) -> list[Decision | BackendError]:
        self.counters.batches += 1
        self.counters.decisions += len(batch)
        groups: dict[int, tuple[Loaded, list[int]]] = {}
        for i, obs in enumerate(batch):
            version = self._version_for(obs)
            groups.setdefault(id(version), (version, []))[1].append(i)
        decisions: list[Decision | BackendError] = list(batch)  # type: ignore[arg-type]
        for version, indices in groups.values():
            try:
                made = version.decide([batch[i] for i in indices])
            except ValueError as exc:  # an observation the model cannot take
                raise BackendError(f"{self.served} cannot decide: {exc}") from None
            for i, decision in zip(indices, made, strict=True):
                decision.model_version = version.model_version
                decisions[i] = decision
        return decisions

    def _version_for(self, obs: Observation, pin: bool = True) -> Loaded:
        if self.options.swap_at != "episode":
            return self.current
        pinned = self._pinned.get(obs.episode_id)
        if pinned is None and not pin:
            return self.current
        if pinned is None:
            pinned = self._pinned[obs.episode_id] = self.current
            while len(self._pinned) > MAX_PINNED_EPISODES:
                self._pinned.popitem(last=False)
        else:
            self._pinned.move_to_end(obs.episode_id)
        return pinned

    def stats(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self.counters),
            "version": self.current.model_version,
            "refused": dict(list(self.refused.items())[-MAX_REFUSALS_SHOWN:]),
            "pinned_episodes": len(self._pinned),
        }
