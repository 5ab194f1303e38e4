"""Cosmos-Reason prompts and answers as pure functions (no torch, no I/O).

The one prompt builder: the `cosmos` backend asks exactly what the
post-trainer (`trainer.cosmos`) trains on, from the same observation
(instruction, skill menu, the episode's executed skills), with the same
`PromptSpec`, which travels in every Cosmos version (`agent.cosmos.checkpoint`).
`answer_text` writes the official answer format the trainer's targets use.

Two conventions, both from the official Cosmos-Reason repositories:

- ``reason1`` (Cosmos-Reason1, Qwen2.5-VL): the system prompt asks for
  ``<think>...</think>`` then ``<answer>...</answer>``; text comes before the
  media in the user turn; the multiple-choice answer is the first capital
  letter inside ``<answer>``.
- ``reason2`` (Cosmos-Reason2, Qwen3-VL): plain system prompt, media before
  text, the reasoning format is requested in the user prompt and the answer is
  written right after ``</think>`` (no answer tag). It may also answer with a
  2D point ``{"point_2d": [x, y]}`` normalised to 0..1000.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

Style = Literal["reason1", "reason2"]
STYLES: tuple[Style, ...] = ("reason1", "reason2")

REASON1_SYSTEM = (
    "You are a helpful assistant. Answer the question in the following format: "
    "<think>\nyour reasoning\n</think>\n\n<answer>\nyour answer\n</answer>."
)
REASON2_SYSTEM = "You are a helpful assistant."
REASON2_FORMAT = (
    "Answer the question using the following format:\n\n<think>\nYour reasoning.\n</think>\n\n"
    "Write your final answer immediately after the </think> tag."
)
CHOICE_SUFFIX = "Answer with the option's letter from the given choices directly."
POINT_HINT = (
    "Or, to move the gripper to a place in the image, answer with that point as "
    '{"point_2d": [x, y]}, with x and y normalised to 0..1000.'
)
POINT_RANGE = (0.0, 1000.0)
HISTORY_PREFIX = "Skills done so far, most recent first:"
DEFAULT_HISTORY = 12  # executed skills a prompt shows (Sort's whole episode)

_LETTERS = string.ascii_uppercase
_POINT = re.compile(r'"?point_2d"?\s*:\s*\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\]')


@dataclass(frozen=True)
class ParsedAnswer:
    """What a model's text says: a chosen option, a point, or neither (unparseable)."""

    reasoning: str
    answer: str
    choice: int | None = None
    point: tuple[float, float] | None = None

    @property
    def ok(self) -> bool:
        return self.choice is not None or self.point is not None


def style_for_model_type(model_type: str) -> Style:
    """Cosmos-Reason1 is Qwen2.5-VL, Cosmos-Reason2 is Qwen3-VL."""
    if model_type.startswith("qwen2_5_vl") or model_type.startswith("qwen2_vl"):
        return "reason1"
    if model_type.startswith("qwen3_vl"):
        return "reason2"
    raise ValueError(
        f"model_type {model_type!r} is not a Cosmos-Reason architecture "
        "(expected qwen2_5_vl for Reason1 or qwen3_vl for Reason2)"
    )


def option_letter(index: int) -> str:
    if not 0 <= index < len(_LETTERS):
        raise ValueError(f"option index {index} outside A..Z")
    return _LETTERS[index]


@dataclass(frozen=True)
class PromptSpec:
    """How observations become prompts; saved with every Cosmos version so the backend asks
    what the version was trained on."""

    style: Style
    history: int = DEFAULT_HISTORY  # executed skills shown, most recent first (0: no line)
    points: bool = False  # also offer {"point_2d": [x, y]} answers (Reason2)
    image: bool = True  # False: a text-only model (the blind baseline), shown no image

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"unknown prompt style {self.style!r}; choose one of {STYLES}")
        if not isinstance(self.history, int) or self.history < 0:
            raise ValueError(f"history must be a whole number >= 0, got {self.history!r}")

    @property
    def allow_point(self) -> bool:
        return self.points and self.style == "reason2"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> PromptSpec:
        raw = json.loads(text)
        if not isinstance(raw, dict) or set(raw) - set(cls.__dataclass_fields__):
            raise ValueError(f"not a prompt spec: {str(raw)[:80]}")
        return cls(**raw)

    def question(
        self, instruction: str, options: Sequence[str], history: Sequence[str] | None
    ) -> str:
        """The question of one observation (`history`: its executed skills, oldest first;
        None: a prompt without the history line, as when the history is unknown)."""
        shown = None if history is None or not self.history else list(history)[-self.history :]
        return format_question(instruction, list(options), self.allow_point, shown)


def history_line(history: Sequence[str]) -> str:
    """The executed skills (oldest first in `history`) as one line, most recent first."""
    done = "; ".join(skill.strip() for skill in reversed(history)) if history else "none"
    return f"{HISTORY_PREFIX} {done}."


def format_question(
    instruction: str,
    options: list[str],
    allow_point: bool = False,
    history: Sequence[str] | None = None,
) -> str:
    """The embodied next-action question as multiple choice, official wording.

    `history` (oldest first) adds a line of the skills executed so far, most
    recent first (the paper's "previous subtask" framing): most recent first
    puts the skill that decides the next one at the same place in every prompt.
    """
    if not options and not allow_point:
        raise ValueError("a next-action question needs at least one option or allow_point")
    if len(options) > len(_LETTERS):
        raise ValueError(f"{len(options)} options do not fit the letters A..Z")
    lines = [
        f"The robot's task: {instruction.strip()}" if instruction.strip() else "",
        history_line(history) if history is not None else "",
        "What is the next action the robot should take?",
    ]
    lines += [f"({option_letter(i)}) {option.strip()}" for i, option in enumerate(options)]
    if options:
        lines.append(CHOICE_SUFFIX)
    if allow_point:
        lines.append(POINT_HINT)
    return "\n".join(line for line in lines if line)


def build_messages(style: Style, question: str, media: list[str]) -> list[dict[str, Any]]:
    """Chat messages for the processor's chat template.

    `media` lists the user turn's media kinds in order ("image" or "video");
    the pixels themselves go to the processor separately.
    """
    if style not in STYLES:
        raise ValueError(f"unknown prompt style {style!r}; choose one of {STYLES}")
    for kind in media:
        if kind not in ("image", "video"):
            raise ValueError(f"unknown media kind {kind!r}")
    media_items: list[dict[str, Any]] = [{"type": kind} for kind in media]
    if style == "reason1":
        system, user = REASON1_SYSTEM, [{"type": "text", "text": question}, *media_items]
    else:
        text = f"{question}\n\n{REASON2_FORMAT}"
        system, user = REASON2_SYSTEM, [*media_items, {"type": "text", "text": text}]
    return [
        {"role": "system", "content": [{"type": "text", "text": system}]},
        {"role": "user", "content": user},
    ]


def answer_text(style: Style, choice: int, reasoning: str = "") -> str:
    """A completion in the official format: `reasoning` in <think>, then option `choice`'s letter
    (Reason1 inside <answer>, Reason2 right after </think>). The post-trainer's SFT target."""
    letter = option_letter(choice)
    think = f"<think>\n{reasoning.strip()}\n</think>\n\n"
    if style == "reason1":
        return f"{think}<answer>\n{letter}\n</answer>"
    if style == "reason2":
        return f"{think}{letter}"
    raise ValueError(f"unknown prompt style {style!r}; choose one of {STYLES}")


def split_reasoning(text: str, style: Style) -> tuple[str, str] | None:
    """(reasoning, answer region) of a completion; None when it was cut off mid-thought."""
    text = text.strip()
    open_at, close_at = text.find("<think>"), text.find("</think>")
    if close_at >= 0:
        start = open_at + len("<think>") if 0 <= open_at < close_at else 0
        reasoning, rest = text[start:close_at], text[close_at + len("</think>") :]
    elif open_at >= 0:
        return None  # thinking never finished: more tokens may help
    else:
        reasoning, rest = "", text
    if style == "reason1":
        tag_at = rest.find("<answer>")
        if tag_at >= 0:
            rest = rest[tag_at + len("<answer>") :]
            end_at = rest.find("</answer>")
            rest = rest if end_at < 0 else rest[:end_at]
    return reasoning.strip(), rest.strip()


def parse_point(answer: str) -> tuple[float, float] | None:
    """The first ``{"point_2d": [x, y]}`` with both coordinates within 0..1000."""
    match = _POINT.search(answer)
    if match is None:
        return None
    x, y = float(match.group(1)), float(match.group(2))
    low, high = POINT_RANGE
    return (x, y) if low <= x <= high and low <= y <= high else None


def parse_choice(answer: str, n_options: int) -> int | None:
    """Index of the chosen option: a standalone valid letter, else the first valid capital."""
    valid = _LETTERS[:n_options]
    if not valid:
        return None
    standalone = re.search(rf"(?<![A-Za-z])[{valid}](?![A-Za-z])", answer)
    if standalone is not None:
        return valid.index(standalone.group(0))
    first = re.search(r"[A-Z]", answer)
    if first is not None and first.group(0) in valid:
        return valid.index(first.group(0))
    return None


def parse_answer(text: str, style: Style, n_options: int) -> ParsedAnswer:
    """Read a completion; never raises on any model output."""
    split = split_reasoning(text, style)
    if split is None:
        return ParsedAnswer(reasoning=text.strip(), answer="")
    reasoning, answer = split
    point = parse_point(answer) if style == "reason2" else None
    choice = None if point is not None else parse_choice(answer, n_options)
    return ParsedAnswer(reasoning=reasoning, answer=answer, choice=choice, point=point)
