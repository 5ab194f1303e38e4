"""GRPO's rule-based rewards, as the Cosmos-Reason1 paper defines them: accuracy and format.

Pure functions of a completion's text. Strict on purpose (reward hacking is
the known failure of these rewards): the answer region must be exactly one
option letter, nothing else; an empty answer, "(A)", two letters or a
letter inside a sentence earn nothing. The format reward wants one block per
tag, in the official layout of the style (`agent.cosmos.reasoning`). A
completion that never ended (cut off by the token budget) scores 0 on both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.cosmos.reasoning import Style, option_letter

_REASON1 = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_REASON2 = re.compile(r"\s*<think>(.*?)</think>(.*)", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


@dataclass(frozen=True)
class Reward:
    accuracy: float  # 1: exactly the label's letter
    format: float  # 1: the official layout, one block per tag

    @property
    def total(self) -> float:
        return self.accuracy + self.format


def answer_region(text: str, style: Style) -> str | None:
    """The answer of a well-formed completion (None: not in the official format)."""
    counts = {tag: text.count(tag) for tag in _TAGS}
    if style == "reason1":
        if any(n != 1 for n in counts.values()):
            return None
        match = _REASON1.fullmatch(text)
    else:
        if counts["<think>"] != 1 or counts["</think>"] != 1 or counts["<answer>"]:
            return None
        match = _REASON2.fullmatch(text)
    return None if match is None else match.group(2).strip()


def reward(text: str, style: Style, label: int, finished: bool = True) -> Reward:
    """The paper's two rewards for one completion of a question whose answer is option `label`."""
    if not finished:
        return Reward(0.0, 0.0)
    answer = answer_region(text, style)
    if answer is None:
        return Reward(0.0, 0.0)
    return Reward(float(answer == option_letter(label)), 1.0)
