"""An exported student (`python -m export`) as a backend: onnxruntime, no torch.

`--model policy.onnx` serves that file and hot-reloads it when it changes on
disk (a new export renames a new file into place); `--model CKPT` serves
`CKPT/<LATEST>/policy.onnx` (the trainer's `--export-onnx`) and follows
LATEST. A new file is verified (its metadata, finite outputs on a warm-up
batch) before it is served; loading, swapping and per-episode versions are
`VersionedBackend`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import versions
from agent.backends.versioned import VersionedBackend, VersionedOptions
from agent.student.checkpoint import ONNX


@dataclass
class OnnxOptions(VersionedOptions):
    providers: str = "CPUExecutionProvider"  # comma-separated, in order of preference


class OnnxBackend(VersionedBackend):
    name = "onnx"
    Options = OnnxOptions
    extra = "edge"
    model_help = "policy.onnx (from `python -m export`) or CKPT (a trainer's --export-onnx)"
    served = "the student"

    @property
    def model_id(self) -> str:
        return str(self.model)

    def _file(self) -> Path:
        source = Path(str(self.model))
        if source.is_dir():
            return source / (versions.latest_name(source) or "?") / ONNX
        return source

    def newest(self) -> str | None:
        """The file to serve now, with its size and modification time (a new export is new)."""
        path = self._file()
        try:
            stat = path.stat()
        except OSError:
            return None
        return f"{path} ({stat.st_size} bytes, mtime {stat.st_mtime_ns})"

    def load(self, key: str) -> Any:
        from agent.student.onnx import OnnxRunner

        path = key.rsplit(" (", 1)[0]
        runner = OnnxRunner(path, self.options.providers.split(","), self.options.threads)
        runner.warm_up(self.options.warmup_batch)
        return runner

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "providers": self.current.providers}
