"""Recorded episodes to Cosmos-Reason examples, and examples to the tensors a step trains on.

One example per labelled decision, by the one label rule (`trainer.data.samples`,
`agent.labels`): the teacher's label where the step has one, else a teacher
backend's executed decision; its rationale is the teacher's recorded
reasoning (`teacher_reasoning`, or `reasoning` when the teacher acted). The
prompt is what the `cosmos` backend asks at serving time
(`CosmosModel.prompt`, one builder); the SFT target is the official answer
format with the rationale in `<think>` (`agent.cosmos.reasoning.answer_text`).
Episodes are split between ranks and the held-out set whole, never by row
(`trainer.episodes`).

Augmentations, both off at serving time: `shuffled` reorders an example's
menu (its label follows its option), so the letter's position is no shortcut
and the model has to read the options (the paper shuffles GRPO's options the
same way); dropping the history line asks the camera what the history would
have told.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from agent.cosmos.inference import CosmosModel, Prompt
from agent.cosmos.reasoning import Style, answer_text, split_reasoning
from agent.store import Episode
from trainer.data import samples

MAX_RATIONALE = 600  # characters of a recorded rationale kept as a target


@dataclass(frozen=True)
class Example:
    """One labelled decision, as Cosmos-Reason is asked it."""

    instruction: str
    options: tuple[str, ...]
    history: tuple[str, ...] | None  # executed skills, oldest first; None: no history line
    image: np.ndarray | None  # the recorded camera frame (H, W, 3) uint8
    label: int  # index into options
    rationale: str  # the teacher's reasoning ("" when it gave none)
    task: str  # the env id (per-task metrics)
    episode: str  # the episode's file name
    weight: float = 1.0

    def shuffled(self, order: Sequence[int]) -> Example:
        """The same decision with its menu in `order` (order[k] = old index of new option k)."""
        options = tuple(self.options[i] for i in order)
        return dataclasses.replace(self, options=options, label=list(order).index(self.label))

    def without_history(self) -> Example:
        return dataclasses.replace(self, history=None)

    def prompt(self, cosmos: CosmosModel) -> Prompt:
        return cosmos.prompt(self.instruction, self.options, self.history, self.image)

    def target(self, style: Style, think: bool = True) -> str:
        return answer_text(style, self.label, self.rationale if think else "")


def rationale_of(text: str | None, style: Style) -> str:
    """The thinking of a recorded rationale: an oracle's sentence as it is, a Cosmos
    completion's `<think>` part, bounded."""
    if not text:
        return ""
    if "<think>" in text or "</think>" in text:
        split = split_reasoning(text, style)
        text = split[0] if split is not None else ""
    return text.strip()[:MAX_RATIONALE]


def examples_of(episode: Episode, style: Style, camera: str | None, failed_weight: float = 1.0):
    """The labelled decisions of one episode that have a menu, as `Example`s."""
    task = str(episode.meta.get("env_id") or episode.meta.get("task") or "")
    out = []
    for s in samples(episode, failed_weight):
        obs = s.observation
        if s.skill is None or not obs.options:
            continue  # Cosmos-Reason answers multiple-choice questions only
        image = None
        if camera is not None:
            image = obs.images.get(camera, next(iter(obs.images.values()), None))
        out.append(
            Example(
                obs.instruction,
                tuple(obs.options),
                tuple(obs.history),
                image,
                s.skill,
                rationale_of(s.rationale, style),
                task,
                episode.path.name,
                s.weight,
            )
        )
    return out


@dataclass
class Examples:
    """A rank's examples (a `trainer.episodes.Shard`): `add_episode` from one thread,
    `sample` from another."""

    style: Style
    camera: str | None = "image"  # None: a text-only model (the blind baseline)
    items: list[Example] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def size(self) -> int:
        return len(self.items)

    def add_episode(self, episode: Episode, failed_weight: float = 1.0) -> int:
        try:
            new = examples_of(episode, self.style, self.camera, failed_weight)
        except ValueError as exc:
            self.skipped.append(f"{episode.path.name}: {exc}")
            return 0
        with self._lock:
            self.items += new
        return len(new)

    def add_all(self, episodes: Iterable[Episode], failed_weight: float = 1.0) -> int:
        return sum(self.add_episode(e, failed_weight) for e in episodes)

    def sample(self, n: int, rng: np.random.Generator) -> list[Example]:
        """`n` examples drawn uniformly, with replacement, from everything added so far."""
        with self._lock:
            if not self.items:
                raise ValueError("no examples yet")
            return [self.items[i] for i in rng.integers(0, len(self.items), n)]

    def all(self, limit: int | None = None, seed: int = 0) -> list[Example]:
        """Up to `limit` examples, a fixed random subset (the same on every call): validation."""
        with self._lock:
            items = list(self.items)
        if limit is None or limit >= len(items):
            return items
        keep = np.random.default_rng(seed).choice(len(items), limit, replace=False)
        return [items[i] for i in sorted(keep)]


def augment(
    example: Example, rng: np.random.Generator, shuffle: float, drop_history: float
) -> Example:
    """With probability `shuffle` a random menu order, with `drop_history` no history line."""
    if shuffle and rng.random() < shuffle:
        example = example.shuffled(rng.permutation(len(example.options)).tolist())
    if drop_history and rng.random() < drop_history:
        example = example.without_history()
    return example


# --------------------------------------------------------------------------- tensors


def completion_batch(
    cosmos: CosmosModel, prompts: Sequence[Prompt], completions: Sequence[Sequence[int]]
) -> dict[str, torch.Tensor]:
    """Prompts followed by completion token ids, right-padded, for a teacher-forced forward.

    `completion_mask` marks the completion tokens (the ones a loss is taken
    on). `mm_token_type_ids` goes with the ids: without it the multimodal
    RoPE positions depend on the whole sequence, so a forward pass would see
    where the sequence ends (a silent leak of the answer's length).
    """
    images = [image for p in prompts for image in p.images] or None
    encoded = cosmos.processor(text=[p.text for p in prompts], images=images, padding=False)
    ids = [list(p) + list(c) for p, c in zip(encoded["input_ids"], completions, strict=True)]
    width = max(len(x) for x in ids)
    pad = cosmos.tokenizer.pad_token_id
    batch = {
        "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
        "completion_mask": torch.tensor(
            [
                [0] * len(p) + [1] * len(c) + [0] * (width - len(p) - len(c))
                for p, c in zip(encoded["input_ids"], completions, strict=True)
            ],
            dtype=torch.bool,
        ),
        "mm_token_type_ids": torch.tensor(
            [list(t) + [0] * (width - len(t)) for t in encoded["mm_token_type_ids"]]
        ),
    }
    if images is not None:
        batch["pixel_values"] = torch.as_tensor(np.asarray(encoded["pixel_values"]))
        batch["image_grid_thw"] = torch.as_tensor(np.asarray(encoded["image_grid_thw"]))
    return {k: v.to(cosmos.device) for k, v in batch.items()}


def target_ids(cosmos: CosmosModel, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of assistant turns `texts`, each ended with the end-of-turn token."""
    return [
        [*cosmos.tokenizer(text, add_special_tokens=False).input_ids, cosmos.end_id]
        for text in texts
    ]


def token_logprobs(
    model: Any,
    batch: dict[str, torch.Tensor],
    temperature: float = 1.0,
    suppressed: Sequence[int] = (),
) -> torch.Tensor:
    """log p(token | everything before it) of the completion tokens (0 elsewhere), under the
    distribution at `temperature` without the `suppressed` tokens (what sampled them: the
    vision placeholders `CosmosModel.generate` never emits); (B, T).

    Logits are computed from the first completion token on only (`logits_to_keep`): the
    prompt's positions would cost the vocabulary projection for nothing.
    """
    mask = batch["completion_mask"]
    first = int(mask.float().argmax(1).min()) if bool(mask.any()) else mask.shape[1] - 1
    keep = torch.arange(max(first - 1, 0), mask.shape[1] - 1, device=mask.device)
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    logits = model(**inputs, logits_to_keep=keep).logits.float() / temperature
    targets = batch["input_ids"][:, keep + 1]
    picked = torch.gather(logits, 2, targets[:, :, None]).squeeze(2)
    if suppressed:  # out of the normaliser only: prompt targets (image tokens) stay finite
        logits = logits.index_fill(2, torch.tensor(list(suppressed), device=logits.device), -1e9)
    logp = torch.zeros(mask.shape, dtype=logits.dtype, device=logits.device)
    logp[:, keep + 1] = picked - torch.logsumexp(logits, dim=-1)
    return logp * mask
