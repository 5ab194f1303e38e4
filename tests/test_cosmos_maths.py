"""Cosmos-Reason post-training's pure parts: prompts, targets, rewards, GRPO's maths, examples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from agent.cosmos.reasoning import (
    HISTORY_PREFIX,
    PromptSpec,
    answer_text,
    format_question,
    history_line,
    parse_answer,
)
from agent.store import read_episode
from trainer.cosmos.data import Example, augment, examples_of, rationale_of
from trainer.cosmos.grpo import group_advantages, policy_loss
from trainer.cosmos.rewards import answer_region, reward

DATA = Path(__file__).parent / "data"
MENU = ["move above the red cube", "grasp", "open the gripper"]


def test_the_history_line_shows_the_most_recent_skill_first_and_can_be_left_out():
    assert history_line(["a", "b", "c"]) == f"{HISTORY_PREFIX} c; b; a."
    assert history_line([]) == f"{HISTORY_PREFIX} none."
    spec = PromptSpec("reason1", history=2)
    with_history = spec.question("put it there", MENU, ["a", "b", "c"])
    assert f"{HISTORY_PREFIX} c; b." in with_history  # only the last two
    assert HISTORY_PREFIX not in spec.question("put it there", MENU, None)
    assert HISTORY_PREFIX not in PromptSpec("reason1", history=0).question("x", MENU, ["a"])
    assert with_history.splitlines()[-1] == format_question("x", MENU).splitlines()[-1]
    assert PromptSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError):
        PromptSpec("reason3")
    with pytest.raises(ValueError):
        PromptSpec.from_json('{"style": "reason1", "colour": 1}')


@pytest.mark.parametrize("style", ["reason1", "reason2"])
def test_sft_targets_are_the_official_format_the_backend_parses_and_grpo_rewards(style):
    target = answer_text(style, 1, "The red cube is above, so grasp it.")
    parsed = parse_answer(target, style, len(MENU))
    assert parsed.choice == 1 and parsed.reasoning == "The red cube is above, so grasp it."
    assert reward(target, style, label=1).total == 2.0
    assert reward(target, style, label=0).accuracy == 0.0
    assert reward(answer_text(style, 2), style, label=2).accuracy == 1.0  # no rationale


def test_rewards_are_strict():
    ok = "<think>\nwhy\n</think>\n\n<answer>\nB\n</answer>"
    assert reward(ok, "reason1", 1).total == 2.0
    assert reward(ok, "reason1", 1, finished=False).total == 0.0  # cut off by the token budget
    for text in (
        "<think>why</think><answer>(B)</answer>",  # not exactly one letter
        "<think>why</think><answer>B or C</answer>",
        "<think>why</think><answer>The answer is B</answer>",
        "<think>why</think><answer></answer>",  # the empty-answer hack earns nothing
    ):
        assert reward(text, "reason1", 1).accuracy == 0.0, text
    assert answer_region("<think>a</think><think>b</think><answer>B</answer>", "reason1") is None
    assert answer_region("<think>a</think><answer>B</answer><answer>B</answer>", "reason1") is None
    assert answer_region("B", "reason1") is None  # no think block
    assert reward("<think>a</think>\n\nC", "reason2", 2).total == 2.0
    assert answer_region("<think>a</think><answer>C</answer>", "reason2") is None


def test_group_advantages_normalise_each_group_and_flag_the_flat_ones():
    rewards = torch.tensor([[2.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    advantages, flat = group_advantages(rewards)
    assert flat.tolist() == [False, True]
    assert torch.allclose(advantages[0].mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(advantages[0].std(unbiased=False), torch.tensor(1.0), atol=1e-5)
    assert advantages[0, 0] > 0 > advantages[0, 1] and (advantages[1] == 0).all()


def test_the_policy_loss_raises_what_earned_more_and_clips_far_ratios():
    logp = torch.zeros(2, 3, requires_grad=True)
    old = torch.zeros(2, 3)
    mask = torch.tensor([[0, 1, 1], [0, 1, 1]], dtype=torch.bool)
    loss, stats = policy_loss(logp, old, None, torch.tensor([1.0, -1.0]), mask)
    loss.backward()
    assert (logp.grad[0, 1:] < 0).all() and (logp.grad[1, 1:] > 0).all()  # descent raises row 0
    assert logp.grad[:, 0].abs().sum() == 0  # prompt tokens carry no loss
    assert stats.ratio == pytest.approx(1.0) and stats.clipped == 0.0
    far = torch.full((1, 3), 1.0, requires_grad=True)  # ratio e > 1 + clip: no gradient
    loss, stats = policy_loss(far, torch.zeros(1, 3), None, torch.tensor([1.0]), mask[:1])
    loss.backward()
    assert stats.clipped == 1.0 and far.grad.abs().sum() == 0
    far.grad = None  # the same ratio with a negative advantage is not clipped: it is pushed down
    loss, stats = policy_loss(far, torch.zeros(1, 3), None, torch.tensor([-1.0]), mask[:1])
    loss.backward()
    assert stats.clipped == 0.0 and (far.grad[0, 1:] > 0).all()
    near = torch.zeros(1, 3, requires_grad=True)
    ref = torch.full((1, 3), -1.0)
    _, stats = policy_loss(near, torch.zeros(1, 3), ref, torch.tensor([0.0]), mask[:1], beta=0.1)
    assert stats.kl == pytest.approx(np.exp(-1) + 1 - 1, rel=1e-5)  # k3: e^d - d - 1, d = -1


def test_examples_come_from_teacher_decisions_with_their_rationales():
    """A format-2 oracle episode a real server recorded: every step a label, its rationale the
    oracle's `reasoning`, the history as the server gave it."""
    episode = read_episode(DATA / "episode_v2.parquet")
    examples = examples_of(episode, "reason1", "image")
    steps = episode.steps()
    assert len(examples) == len(steps)
    for example, step in zip(examples, steps, strict=True):
        assert example.label == step.decision.skill_index
        assert example.rationale == step.decision.reasoning
        assert example.history == tuple(step.observation.history)
        assert example.image.shape == (224, 224, 3)
        assert example.task == "tabletop/PickPlace-v0"
    assert examples_of(episode, "reason1", None)[0].image is None  # the text-only baseline


def test_a_shuffled_menu_keeps_the_label_on_its_option():
    example = Example("do it", tuple(MENU), (), None, 1, "", "t", "e")
    rng = np.random.default_rng(0)
    for _ in range(20):
        moved = augment(example, rng, shuffle=1.0, drop_history=0.0)
        assert moved.options[moved.label] == "grasp" and sorted(moved.options) == sorted(MENU)
    assert augment(example, rng, 0.0, 1.0).history is None


def test_a_cosmos_completion_as_a_rationale_keeps_its_thinking_only():
    completion = "<think>\nthe cube is held\n</think>\n\n<answer>\nA\n</answer>"
    assert rationale_of(completion, "reason1") == "the cube is held"
    assert rationale_of("<think>never finished", "reason1") == ""
    assert rationale_of("plain sentence.", "reason1") == "plain sentence."
    assert rationale_of(None, "reason1") == ""
