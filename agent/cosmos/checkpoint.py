"""A Cosmos-Reason version: what the post-trainer publishes and the `cosmos` backend serves.

One version in the generic format (`agent.versions`: immutable `vNNNNNN/`,
sha256 manifest with the training arguments, atomic `LATEST`) holding a
`save_pretrained` folder and

    cosmos.json   {"format": FORMAT, "prompt": PromptSpec, "base": ..., "warmup": {...}}

`prompt` is how the version was asked during training (the backend asks the
same way); `warmup` is one decision from the training data (instruction,
menu, history) that a servable version must answer parseably; `base` is set
for LoRA versions (`adapter_model.safetensors` + `adapter_config.json`
only): the checkpoint the adapter applies to, loaded first and merged.

`read` verifies the hashes and parses `cosmos.json` without torch; `load`
builds the `CosmosModel`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import versions
from agent.cosmos.reasoning import PromptSpec

if TYPE_CHECKING:
    from agent.cosmos.inference import CosmosModel

KIND = "cosmos"
FORMAT = "embodied-agent.cosmos/1"
SPEC = "cosmos.json"
ADAPTER = "adapter_config.json"


class CheckpointError(versions.VersionError):
    """A Cosmos version that must not be served (missing, tampered with, not Cosmos)."""


@dataclass(frozen=True)
class CosmosVersion:
    """A verified Cosmos version: its prompt spec and warm-up decision, parsed."""

    version: versions.Version
    spec: PromptSpec
    warmup: dict[str, Any]
    base: str | None  # LoRA: the checkpoint the adapter applies to

    @property
    def path(self) -> Path:
        return self.version.path

    @property
    def name(self) -> str:
        return self.version.name


def is_versioned(path: str | Path) -> bool:
    """Whether `path` is a version or a root of versions (rather than a plain checkpoint)."""
    path = Path(path)
    return versions.is_version(path) or (path / versions.LATEST).is_file()


def read(path: str | Path) -> CosmosVersion:
    """Verify a version (or `path/LATEST`'s) and parse its cosmos.json; CheckpointError if bad."""
    try:
        version = versions.read(path, KIND)
    except versions.VersionError as exc:
        raise CheckpointError(str(exc)) from None
    if version.kind != KIND or SPEC not in version.files:
        raise CheckpointError(f"{version.path} is not a Cosmos-Reason version (no {SPEC})")
    try:
        raw = json.loads((version.path / SPEC).read_text())
        if raw.get("format") != FORMAT:
            raise ValueError(f"format {raw.get('format')!r} is not {FORMAT!r}")
        spec = PromptSpec.from_json(json.dumps(raw["prompt"]))
        warmup = raw["warmup"]
        if not isinstance(warmup, dict) or not isinstance(warmup.get("options"), list):
            raise ValueError("the warm-up decision has no options")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{version.path}: bad {SPEC} ({exc})") from None
    base = raw.get("base")
    if (ADAPTER in version.files) != (base is not None):
        raise CheckpointError(f"{version.path}: a LoRA version needs both {ADAPTER} and a base")
    return CosmosVersion(version, spec, warmup, base)


def answers_warmup(cosmos: CosmosModel, warmup: dict[str, Any], max_new_tokens: int) -> bool:
    """Whether `cosmos` answers its warm-up decision parseably (greedy, a black camera image):
    the backend refuses a version that does not, so the trainer checks before it publishes."""
    import numpy as np

    from agent.cosmos.reasoning import parse_answer

    size = int(warmup.get("image_size") or 112)
    prompt = cosmos.prompt(
        str(warmup.get("instruction", "")),
        [str(o) for o in warmup["options"]],
        [str(h) for h in warmup.get("history", [])],
        np.zeros((size, size, 3), np.uint8),
    )
    training = cosmos.model.training
    cosmos.model.eval()
    try:
        text = cosmos.generate([prompt], max_new_tokens).texts[0]
    finally:
        cosmos.model.train(training)
    return parse_answer(text, cosmos.spec.style, len(warmup["options"])).ok


def load(path: str | Path, **options: Any) -> tuple[CosmosModel, CosmosVersion]:
    """The verified version's model (`CosmosModel.load` options: device, dtype, compile, fps)."""
    from agent.cosmos.inference import CosmosModel

    version = read(path)
    if version.base is None:
        return CosmosModel.load(str(version.path), spec=version.spec, **options), version
    from peft import PeftModel

    cosmos = CosmosModel.load(version.base, spec=version.spec, **options)
    cosmos.model = PeftModel.from_pretrained(cosmos.model, str(version.path)).merge_and_unload()
    return cosmos, version


def publish(
    root: str | Path,
    model: Any,
    processor: Any,
    spec: PromptSpec,
    *,
    warmup: dict[str, Any],
    step: int,
    base: str | None = None,
    args: dict[str, Any] | None = None,
    watermark: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    keep: int = 5,
    extra_files: Callable[[Path], None] | None = None,
) -> Path:
    """Publish `model` (a transformers model, or a peft model whose adapter is saved over
    `base`) with its processor as the next Cosmos version under `root`; returns its path."""
    from agent.cosmos.loading import save_vlm

    def write(directory: Path, name: str) -> None:
        if base is None:
            save_vlm(directory, model, processor)
        else:  # peft: the adapter only; the processor is the base's
            model.save_pretrained(directory)
        config = {
            "format": FORMAT,
            "prompt": json.loads(spec.to_json()),
            "warmup": warmup,
            "base": base,
        }
        (directory / SPEC).write_text(json.dumps(config, indent=1, sort_keys=True))
        if extra_files is not None:
            extra_files(directory)

    return versions.publish(
        root,
        write,
        kind=KIND,
        step=step,
        args=args,
        watermark=watermark,
        metrics=metrics,
        keep=keep,
    )
