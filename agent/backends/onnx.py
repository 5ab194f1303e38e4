"""An exported student (`python -m export`) as a backend: onnxruntime, no torch.

`--model policy.onnx` serves that file and hot-reloads it when it changes on
disk (a new export renames a new file into place): the new file is loaded
and verified on the reloader thread (its metadata, finite outputs on a
warm-up batch) and swapped in between batches, as for the `policy` backend.
`--model CKPT` serves `CKPT/LATEST/policy.onnx` (the trainer's
`--export-onnx`) and follows LATEST.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.backends.base import Backend, BackendError, BadObservation, EnvInfo
from agent.messages import Decision, Observation


@dataclass
class OnnxOptions:
    providers: str = "CPUExecutionProvider"  # comma-separated, in order of preference
    threads: int = 1

    def check(self) -> None:
        if self.threads < 1:
            raise BackendError("threads must be >= 1")


class OnnxBackend(Backend):
    name = "onnx"
    Options = OnnxOptions
    reload_every_s = 1.0

    def __init__(self, env: EnvInfo, model: str | None = None, **options: Any) -> None:
        super().__init__(env, model, **options)
        from agent.extras import MissingExtra, require

        if not model:
            raise BackendError(
                "the onnx backend needs --model policy.onnx (from `python -m export`)"
            )
        try:
            require("edge", "the onnx backend")
        except MissingExtra as exc:
            raise BackendError(str(exc)) from None
        self.source = Path(model)
        self.refused: dict[str, str] = {}
        self.counters = {"decisions": 0, "batches": 0, "versions_loaded": 0, "versions_refused": 0}
        key = self._key()
        loaded = self._load(key)
        if loaded is None:
            raise BackendError(f"cannot serve {model}: {self.refused.get(str(key), 'not found')}")
        self.current = loaded
        self._offered = key  # the newest file handed to the reloader (its thread)

    def _file(self) -> Path:
        if self.source.is_dir():
            from trainer.checkpoint import latest_name

            return self.source / (latest_name(self.source) or "?") / "policy.onnx"
        return self.source

    def _key(self) -> tuple[str, int, int] | None:
        """What identifies the file being served now (path, size, mtime), None if there is none."""
        path = self._file()
        try:
            stat = path.stat()
        except OSError:
            return None
        return (str(path), stat.st_size, stat.st_mtime_ns)

    def _load(self, key: tuple[str, int, int] | None) -> Any | None:
        from export.edge import EdgeError, OnnxPolicyRunner

        if key is None:
            self.refused[str(key)] = f"{self._file()} does not exist"
            return None
        try:
            runner = OnnxPolicyRunner(
                key[0], self.options.providers.split(","), self.options.threads
            )
            runner.warm_up()
        except (EdgeError, ValueError, OSError) as exc:
            self.refused[str(key)] = f"{type(exc).__name__}: {exc}"[:500]
            self.counters["versions_refused"] += 1
            return None
        self.counters["versions_loaded"] += 1
        return runner

    @property
    def model_id(self) -> str:
        return str(self.source)

    @property
    def model_version(self) -> str:
        return self.current.version

    def load_version(self) -> Any | None:
        key = self._key()
        if key is None or key == self._offered or str(key) in self.refused:
            return None  # nothing new (a loaded file may still wait for its swap)
        runner = self._load(key)
        if runner is None:
            raise BackendError(f"{key[0]} refused: {self.refused[str(key)]}")
        self._offered = key
        return runner

    def swap(self, loaded: Any) -> None:
        self.current = loaded

    def check(self, obs: Observation) -> None:
        try:
            self.current.featuriser.check(obs)
        except ValueError as exc:
            raise BadObservation(f"the student cannot take this observation: {exc}") from None

    def decide(self, batch: Sequence[Observation]) -> list[Decision | BackendError]:
        self.counters["batches"] += 1
        self.counters["decisions"] += len(batch)
        try:
            return self.current.decide(batch)
        except ValueError as exc:  # an observation the student cannot take
            raise BackendError(f"the student cannot decide: {exc}") from None

    def stats(self) -> dict[str, Any]:
        return {
            **self.counters,
            "version": self.current.version,
            "providers": self.current.providers,
            "refused": dict(list(self.refused.items())[-5:]),
        }
