"""Held-out decisions, answered by generating: what the trainer validates and publishes by.

Greedy decoding, the serving parser (`agent.cosmos.reasoning.parse_answer`,
what the `cosmos` backend would execute) for accuracy, and the strict
format rule of GRPO's reward for the format rate.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from agent.cosmos.inference import CosmosModel
from agent.cosmos.reasoning import parse_answer
from trainer.cosmos.data import Example
from trainer.cosmos.rewards import answer_region


@dataclass
class Evaluation:
    decisions: int
    parse_rate: float  # answers the backend can execute
    format_rate: float  # answers in the official layout, one block per tag
    accuracy: float  # the executed option is the teacher's
    per_task: dict[str, float] = field(default_factory=dict)  # accuracy per env
    completion_tokens: float = 0.0  # mean tokens generated per decision
    ms_per_decision: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(
    cosmos: CosmosModel,
    examples: Sequence[Example],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 32,
) -> Evaluation | None:
    """Answer every example greedily (None: no examples)."""
    if not examples:
        return None
    model = cosmos.model
    training = model.training
    model.eval()
    parsed = formatted = correct = tokens = 0
    per_task: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    start = time.perf_counter()
    try:
        for first in range(0, len(examples), batch_size):
            part = examples[first : first + batch_size]
            out = cosmos.generate([e.prompt(cosmos) for e in part], max_new_tokens)
            for example, text, ids in zip(part, out.texts, out.tokens, strict=True):
                answer = parse_answer(text, cosmos.spec.style, len(example.options))
                hit = answer.choice == example.label
                parsed += answer.ok
                formatted += answer_region(text, cosmos.spec.style) is not None
                correct += hit
                tokens += len(ids)
                per_task[example.task][0] += hit
                per_task[example.task][1] += 1
    finally:
        model.train(training)
    n = len(examples)
    return Evaluation(
        n,
        parsed / n,
        formatted / n,
        correct / n,
        {task: hits / count for task, (hits, count) in sorted(per_task.items())},
        tokens / n,
        1e3 * (time.perf_counter() - start) / n,
    )
