"""Cosmos-Reason prompt building and answer parsing on canned model outputs."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.cosmos.reasoning import (
    CHOICE_SUFFIX,
    REASON1_SYSTEM,
    REASON2_FORMAT,
    REASON2_SYSTEM,
    build_messages,
    format_question,
    parse_answer,
    style_for_model_type,
)

OPTIONS = ["pick up the red cube", "place it on the green pad", "open the gripper"]


def test_question_lists_options_with_letters_and_official_suffix():
    question = format_question("put the red cube on the pad", OPTIONS)
    lines = question.splitlines()
    assert lines[0] == "The robot's task: put the red cube on the pad"
    assert "(A) pick up the red cube" in lines
    assert "(C) open the gripper" in lines
    assert lines[-1] == CHOICE_SUFFIX


def test_question_point_hint_and_validation():
    assert "point_2d" in format_question("push", [], allow_point=True)
    with pytest.raises(ValueError, match="at least one option"):
        format_question("push", [])
    with pytest.raises(ValueError, match=r"A\.\.Z"):
        format_question("x", [f"o{i}" for i in range(27)])


def test_reason1_messages_system_format_and_text_before_media():
    messages = build_messages("reason1", "Q?", ["video"])
    assert messages[0]["content"][0]["text"] == REASON1_SYSTEM
    assert [item["type"] for item in messages[1]["content"]] == ["text", "video"]


def test_reason2_messages_media_first_and_format_in_user_turn():
    messages = build_messages("reason2", "Q?", ["image"])
    assert messages[0]["content"][0]["text"] == REASON2_SYSTEM
    user = messages[1]["content"]
    assert [item["type"] for item in user] == ["image", "text"]
    assert user[1]["text"].endswith(REASON2_FORMAT)


def test_unknown_style_and_media_are_rejected():
    with pytest.raises(ValueError, match="style"):
        build_messages("reason3", "Q", [])
    with pytest.raises(ValueError, match="media"):
        build_messages("reason1", "Q", ["audio"])


def test_style_from_model_type():
    assert style_for_model_type("qwen2_5_vl") == "reason1"
    assert style_for_model_type("qwen3_vl") == "reason2"
    with pytest.raises(ValueError, match="not a Cosmos-Reason"):
        style_for_model_type("llama")


@pytest.mark.parametrize(
    ("text", "choice", "reasoning"),
    [
        ("<think>\nThe cube is free.\n</think>\n\n<answer>\nA\n</answer>", 0, "The cube is free."),
        ("<think>hold it</think><answer>(B) place it on the green pad</answer>", 1, "hold it"),
        ("<think>x</think>\n<answer>Answer: C</answer>", 2, "x"),
        ("<think>x</think><answer>\nB", 1, "x"),  # answer tag never closed
        ("<answer>C</answer>", 2, ""),  # no reasoning at all
        ("B", 1, ""),  # bare letter
        ("The robot should B", 1, ""),  # standalone letter wins over the capital T
    ],
)
def test_reason1_well_formed_and_lenient(text, choice, reasoning):
    parsed = parse_answer(text, "reason1", len(OPTIONS))
    assert parsed.ok
    assert parsed.choice == choice
    assert parsed.reasoning == reasoning
    assert parsed.point is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "<think>I am still thinking and ran out of tok",  # cut off mid-thought
        "<think>x</think><answer>Z</answer>",  # letter outside the menu
        "<think>x</think><answer>no idea</answer>",
        "\x00\ufffd garbage \U0001f916",
        "</think></think><answer></answer>",
    ],
)
def test_reason1_malformed_is_unparseable_not_an_error(text):
    parsed = parse_answer(text, "reason1", len(OPTIONS))
    assert not parsed.ok
    assert parsed.choice is None and parsed.point is None


@pytest.mark.parametrize(
    ("text", "choice", "point"),
    [
        ("<think>\nThe cube is left.\n</think>\n\nA", 0, None),
        ("<think>\nok\n</think>\n\n(C) open the gripper", 2, None),
        ('<think>go there</think>\n{"point_2d": [618, 347]}', None, (618.0, 347.0)),
        (
            '<think>r</think>```json\n[{"point_2d": [12.5, 999], "label": "cube"}]\n```',
            None,
            (12.5, 999.0),
        ),
        ("</think>B", 1, None),  # template put <think> in the prompt
    ],
)
def test_reason2_answer_after_think_and_points(text, choice, point):
    parsed = parse_answer(text, "reason2", len(OPTIONS))
    assert parsed.ok
    assert parsed.choice == choice
    assert parsed.point == point


@pytest.mark.parametrize(
    "text",
    [
        '<think>r</think>{"point_2d": [1200, 40]}',  # outside 0..1000
        '<think>r</think>{"point_2d": [10]}',
        "<think>never finished",
        "<think>r</think>",
    ],
)
def test_reason2_malformed(text):
    assert not parse_answer(text, "reason2", len(OPTIONS)).ok


def test_reason1_ignores_points():
    assert parse_answer('<answer>{"point_2d": [1, 2]}</answer>', "reason1", 0).point is None


@given(st.text(max_size=300), st.integers(min_value=0, max_value=26))
def test_parser_never_raises(text, n_options):
    for style in ("reason1", "reason2"):
        parsed = parse_answer(text, style, n_options)
        assert parsed.choice is None or 0 <= parsed.choice < n_options
