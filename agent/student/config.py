"""The student network's settings (torch-free: read with a version's config by anyone)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelConfig:
    width: int = 64
    word_dim: int = 32
    layers: int = 2
    heads: int = 4
    channels: tuple[int, ...] = (16, 32, 32)
    patch: int = 4  # the first conv's kernel and stride
    dropout: float = 0.1
    image_dropout: float = 0.3  # training only: drop the image token of this share of samples
    shift: int = 4  # training only: random shift of up to this many pixels

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelConfig:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("a model config must be a JSON object")
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown model config fields {unknown} (written by a newer version?)")
        if "channels" in raw:
            raw["channels"] = tuple(raw["channels"])
        return cls(**raw)
