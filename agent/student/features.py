"""The student's featuriser: observations to fixed-size arrays. numpy + pillow, no torch.

One module, used identically by the trainer (on recorded steps), the
`policy` backend (on served observations), the ONNX export (its input
signature) and the ONNX runner, so the student sees the same arrays
everywhere; `choose` turns the student's scores back into decisions. Its
configuration (`FeatureConfig`) travels in every version and in the ONNX
metadata.

What one observation becomes (B = batch):

| array | shape, dtype | from |
|---|---|---|
| `image` | (B, S, S, 3) uint8 | the camera frame, area-resized to S x S (normalised in the model) |
| `state` | (B, D) float32 | proprioception as sent (normalised in the model) |
| `instruction` | (B, Li) int64 | word ids of the instruction (0 = padding) |
| `options` | (B, M, Lo) int64 | word ids of each menu sentence |
| `option_mask` | (B, M) bool | which of the M menu slots hold an option |
| `history` | (B, H, Lo) int64 | the last H executed skills, most recent first |

Words are lower-case runs of letters; numbers become `<num>`. The vocabulary
is built from the training data; a word first seen later maps to one of
`oov_buckets` hashed ids (stable across processes) instead of one shared
unknown id.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from agent.messages import Decision, Observation

PAD, NUM = "<pad>", "<num>"
_WORD = re.compile(r"[a-z]+|\d+")
INPUTS = ("image", "state", "instruction", "options", "option_mask", "history")


def words(text: str) -> list[str]:
    """Lower-case words of `text`; every number is the same word, `<num>`."""
    return [NUM if w.isdigit() else w for w in _WORD.findall(text.lower())]


def build_vocabulary(texts: Iterable[str]) -> tuple[str, ...]:
    """`<pad>` first, then every word of `texts` in sorted order (deterministic)."""
    seen = {w for text in texts for w in words(text)}
    seen.discard(PAD)
    return (PAD, *sorted(seen))


@dataclass(frozen=True)
class FeatureConfig:
    """Everything that decides the featuriser's arrays; saved with the student."""

    vocabulary: tuple[str, ...]
    state_dim: int
    state_mean: tuple[float, ...]
    state_std: tuple[float, ...]
    image_size: int = 96
    camera: str | None = "image"  # None: the student sees no image
    max_instruction_words: int = 24
    max_option_words: int = 10
    max_options: int = 8
    history: int = 12
    oov_buckets: int = 64
    action_dim: int = 0  # > 0: the student also regresses a low-level action

    def __post_init__(self) -> None:
        if not self.vocabulary or self.vocabulary[0] != PAD:
            raise ValueError(f"the vocabulary must start with {PAD!r}")
        if len(self.state_mean) != self.state_dim or len(self.state_std) != self.state_dim:
            raise ValueError("state_mean and state_std must have state_dim values")
        if min(self.state_std, default=1.0) <= 0:
            raise ValueError("state_std must be positive")
        for name in ("image_size", "max_instruction_words", "max_option_words", "max_options"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.history < 0 or self.oov_buckets < 1 or self.action_dim < 0:
            raise ValueError("history >= 0, oov_buckets >= 1 and action_dim >= 0 are required")

    @property
    def token_count(self) -> int:
        """Rows of the student's word embedding: the vocabulary plus the hashed buckets."""
        return len(self.vocabulary) + self.oov_buckets

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> FeatureConfig:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("a feature config must be a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(
                f"unknown feature config fields {unknown} (written by a newer version?)"
            )
        for name in ("vocabulary", "state_mean", "state_std"):
            if name in raw:
                raw[name] = tuple(raw[name])
        return cls(**raw)


def resize_area(image: np.ndarray, size: int) -> np.ndarray:
    """`image` (H, W, 3) uint8 area-averaged to (size, size, 3) uint8 (pillow's box filter)."""
    from PIL import Image

    if image.shape[:2] == (size, size):
        return np.ascontiguousarray(image, dtype=np.uint8)
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    return np.asarray(pil.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


@dataclass
class Featuriser:
    """Turns observations into the student's input arrays (see the module docstring)."""

    config: FeatureConfig
    _ids: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._ids = {w: i for i, w in enumerate(self.config.vocabulary)}

    def word_id(self, word: str) -> int:
        known = self._ids.get(word)
        if known is not None:
            return known
        bucket = zlib.crc32(word.encode()) % self.config.oov_buckets
        return len(self.config.vocabulary) + bucket

    def token_ids(self, text: str, length: int) -> np.ndarray:
        ids = [self.word_id(w) for w in words(text)][:length]
        return np.array(ids + [0] * (length - len(ids)), np.int64)

    def __call__(self, observations: Sequence[Observation]) -> dict[str, np.ndarray]:
        """A batch of input arrays, one row per observation; ValueError for what cannot fit."""
        rows = [self.one(obs) for obs in observations]
        return {name: np.stack([row[name] for row in rows]) for name in self.input_names}

    def blank(self, batch: int) -> dict[str, np.ndarray]:
        """`batch` rows of a neutral two-option observation: a warm-up input for a new model."""
        c = self.config
        blank = Observation(
            "warmup",
            "warmup",
            0,
            "warm up",
            {c.camera: np.zeros((c.image_size, c.image_size, 3), np.uint8)} if c.camera else {},
            np.asarray(c.state_mean, np.float32),
            ["wait", "go"],
        )
        return self([blank] * batch)

    @property
    def input_names(self) -> tuple[str, ...]:
        return INPUTS if self.config.camera is not None else INPUTS[1:]

    def check(self, obs: Observation) -> None:
        """ValueError for an observation the student cannot take (cheap: nothing is computed)."""
        c = self.config
        if obs.state is None or np.shape(obs.state) != (c.state_dim,):
            got = None if obs.state is None else np.shape(obs.state)
            raise ValueError(f"the student needs a state of shape ({c.state_dim},), got {got}")
        if len(obs.options) > c.max_options:
            raise ValueError(
                f"the student takes at most {c.max_options} options, got {len(obs.options)}"
            )
        if c.camera is not None and c.camera not in obs.images:
            raise ValueError(
                f"the student needs camera {c.camera!r}; the observation has {sorted(obs.images)}"
            )

    def one(self, obs: Observation) -> dict[str, np.ndarray]:
        self.check(obs)
        c = self.config
        options = np.zeros((c.max_options, c.max_option_words), np.int64)
        mask = np.zeros(c.max_options, bool)
        for i, option in enumerate(obs.options):
            options[i] = self.token_ids(option, c.max_option_words)
            mask[i] = True
        history = np.zeros((c.history, c.max_option_words), np.int64)
        recent = obs.history[-c.history :] if c.history else []
        for i, skill in enumerate(reversed(recent)):
            history[i] = self.token_ids(skill, c.max_option_words)
        row: dict[str, Any] = {
            "state": np.asarray(obs.state, np.float32),
            "instruction": self.token_ids(obs.instruction, c.max_instruction_words),
            "options": options,
            "option_mask": mask,
            "history": history,
        }
        if c.camera is not None:
            row["image"] = resize_area(obs.images[c.camera], c.image_size)
        return row


def fit_config(
    observations: Iterable[Observation],
    *,
    camera: str | None = "image",
    action_dim: int = 0,
    **settings: Any,
) -> FeatureConfig:
    """A FeatureConfig from training observations: their vocabulary and state statistics."""
    texts: list[str] = []
    states: list[np.ndarray] = []
    for obs in observations:
        texts += [obs.instruction, *obs.options, *obs.history]
        if obs.state is not None:
            states.append(np.asarray(obs.state, np.float64))
    if not states:
        raise ValueError("no observation with a state to fit the featuriser on")
    dims = {s.shape for s in states}
    if len(dims) != 1:
        raise ValueError(f"observations have states of different shapes {sorted(dims)}")
    stacked = np.stack(states)
    std = np.maximum(stacked.std(0), 1e-3)
    return FeatureConfig(
        vocabulary=build_vocabulary(texts),
        state_dim=stacked.shape[1],
        state_mean=tuple(float(v) for v in stacked.mean(0)),
        state_std=tuple(float(v) for v in std),
        camera=camera,
        action_dim=action_dim,
        **settings,
    )


def choose(
    scores: np.ndarray, actions: np.ndarray | None, observations: Sequence[Observation]
) -> list[Decision]:
    """Decisions from option scores (B, M) and actions (B, A): the top option of each menu,
    its softmax probability as `confidence`; the inverse of the featuriser's menu slots.
    The one place scores become decisions (torch student and ONNX runner alike)."""
    decisions = []
    for i, obs in enumerate(observations):
        decision = Decision()
        if obs.options:
            valid = scores[i, : len(obs.options)].astype(np.float64)
            p = np.exp(valid - valid.max())
            p /= p.sum()
            pick = int(p.argmax())
            decision.skill_index, decision.skill = pick, obs.options[pick]
            decision.confidence = float(p[pick])
        if actions is not None:
            decision.action = np.asarray(actions[i], np.float32)
        decisions.append(decision)
    return decisions


def check_warm_up(scores: np.ndarray, actions: np.ndarray | None, what: str) -> None:
    """ValueError unless the outputs for `Featuriser.blank` are finite (its two options, actions).

    Run on every new version before it is served, by the torch student and the
    ONNX runner alike.
    """
    if not np.isfinite(scores[:, :2]).all() or (
        actions is not None and not np.isfinite(actions).all()
    ):
        raise ValueError(f"{what} gives non-finite outputs on a warm-up batch")
