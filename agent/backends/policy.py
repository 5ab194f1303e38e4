"""The trained student as a backend, with hot reload of every version the trainer publishes.

`--model CKPT` serves the newest version under CKPT and keeps following
`CKPT/LATEST`; `--model CKPT/v000007` serves that version only. A new
version is loaded and verified off the serving thread (`load_version`, run by
the server's reloader: manifest hashes, exact parameter names and shapes,
finite scores on a warm-up batch) and swapped in between batches (`swap`); a
version that fails is never served and is counted. With `swap_at=episode`
each episode stays on the version that decided its first step.

torch is imported by this backend only (the `learn` extra).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.backends.base import Backend, BackendError, BadObservation, EnvInfo
from agent.messages import Decision, Observation

MAX_PINNED_EPISODES = 4096


@dataclass
class PolicyOptions:
    threads: int = 1  # torch threads for inference
    swap_at: str = (
        "batch"  # batch: new versions serve from the next batch; episode: from new episodes
    )
    warmup_batch: int = 4  # observations in the verification batch of a new version

    def check(self) -> None:
        if self.swap_at not in ("batch", "episode"):
            raise BackendError(f"swap_at must be batch or episode, got {self.swap_at!r}")
        if self.threads < 1 or self.warmup_batch < 1:
            raise BackendError("threads and warmup_batch must be >= 1")


@dataclass
class Loaded:
    """One verified version in memory."""

    name: str
    model: Any  # trainer.model.Student
    featuriser: Any  # trainer.features.Featuriser


class PolicyBackend(Backend):
    name = "policy"
    Options = PolicyOptions
    reload_every_s = 1.0

    def __init__(self, env: EnvInfo, model: str | None = None, **options: Any) -> None:
        super().__init__(env, model, **options)
        from agent.extras import MissingExtra, require

        if not model:
            raise BackendError(
                "the policy backend needs --model CKPT (a trainer's --out directory)"
            )
        try:
            require("learn", "the policy backend")
        except MissingExtra as exc:
            raise BackendError(str(exc)) from None
        import torch

        from trainer.checkpoint import MANIFEST

        torch.set_num_threads(self.options.threads)
        path = Path(model)
        self.follow = not (path / MANIFEST).is_file()  # a CKPT root, not one version
        self.root = path
        self.refused: dict[str, str] = {}
        self.counters = {"decisions": 0, "batches": 0, "versions_loaded": 0, "versions_refused": 0}
        self._pinned: OrderedDict[str, Loaded] = OrderedDict()
        loaded = self._load(path)
        if loaded is None:
            raise BackendError(f"cannot serve {model}: {self.refused[self._pointer()]}")
        self.current = loaded
        self._offered = loaded.name  # the newest version handed to the reloader (its thread)

    # ------------------------------------------------------------------ versions

    @property
    def model_id(self) -> str:
        return str(self.root)

    @property
    def model_version(self) -> str:
        return self.current.name

    def _pointer(self) -> str:
        from trainer.checkpoint import latest_name

        return (latest_name(self.root) if self.follow else self.root.name) or "?"

    def _load(self, path: Path) -> Loaded | None:
        """Load and verify a version; None (and the reason in `refused`) if it must not be served."""
        from trainer.checkpoint import CheckpointError, load
        from trainer.features import Featuriser

        name = path.name if not self.follow else self._pointer()
        try:
            model, version = load(path)
            featuriser = Featuriser(version.features)
            self._warm_up(model, featuriser, version.name)
        except (CheckpointError, ValueError, RuntimeError, OSError) as exc:
            self.refused[name] = f"{type(exc).__name__}: {exc}"[:500]
            self.counters["versions_refused"] += 1
            return None
        self.counters["versions_loaded"] += 1
        return Loaded(version.name, model, featuriser)

    def _warm_up(self, model: Any, featuriser: Any, name: str) -> None:
        """A blank batch through the model: every score of a real option must be finite."""
        import torch

        arrays = featuriser.blank(self.options.warmup_batch)
        with torch.inference_mode():
            scores, actions = model(**{k: torch.from_numpy(v) for k, v in arrays.items()})
        if not torch.isfinite(scores[:, :2]).all() or (
            actions is not None and not torch.isfinite(actions).all()
        ):
            raise ValueError(f"version {name} gives non-finite outputs on a warm-up batch")

    def load_version(self) -> Loaded | None:
        if not self.follow:
            return None
        name = self._pointer()
        if name in ("?", self._offered) or name in self.refused:
            return None  # nothing new (a loaded version may still wait for its swap)
        loaded = self._load(self.root)
        if loaded is None:
            raise BackendError(f"version {name} refused: {self.refused[name]}")
        self._offered = loaded.name
        return loaded

    def swap(self, loaded: Loaded) -> None:
        self.current = loaded

    # ------------------------------------------------------------------ deciding

    def check(self, obs: Observation) -> None:
        try:
            self._version_for(obs, pin=False).featuriser.check(obs)
        except ValueError as exc:
            raise BadObservation(f"the student cannot take this observation: {exc}") from None

    def decide(self, batch: Sequence[Observation]) -> list[Decision | BackendError]:
        from trainer.student import decide

        self.counters["batches"] += 1
        self.counters["decisions"] += len(batch)
        groups: dict[str, tuple[Loaded, list[int]]] = {}
        for i, obs in enumerate(batch):
            version = self._version_for(obs)
            groups.setdefault(version.name, (version, []))[1].append(i)
        decisions: list[Decision | None] = [None] * len(batch)
        for version, indices in groups.values():
            observations = [batch[i] for i in indices]
            try:
                made = decide(version.model, version.featuriser, observations)
            except ValueError as exc:  # an observation the student cannot take
                raise BackendError(f"the student cannot decide: {exc}") from None
            for i, decision in zip(indices, made, strict=True):
                decision.model_version = version.name
                decisions[i] = decision
        return [d for d in decisions if d is not None]

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
            **self.counters,
            "version": self.current.name,
            "refused": dict(list(self.refused.items())[-5:]),
            "pinned_episodes": len(self._pinned),
        }
