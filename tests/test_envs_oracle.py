"""The oracle solves every task (the full 100-seed check is `python -m envs.evaluate`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import envs
from envs import evaluate, oracle, skills, tasks
from envs.rollout import run_episode

SEEDS = 20  # CI subset; `python -m envs.evaluate --seeds 100` is the full >= 95% check


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("env_id", sorted(envs.ENV_IDS))
def test_oracle_success_rate(env_id):
    result = evaluate.evaluate([env_id], SEEDS, progress=False)[env_id]
    assert result["success_rate"] >= 0.95, result


@pytest.mark.timeout(60)
def test_oracle_episode_log_and_skill_sequence():
    env = envs.make_skill_env("tabletop/Sort-v0", image_size=32)
    log = run_episode(env, oracle.OraclePolicy(), seed=1, keep_frames=True)
    assert log.success
    assert log.skills.count("grasp") == 3  # one pick per cube
    assert sum(s.startswith("place in the ") for s in log.skills) == 3
    assert len(log.frames) == len(log.skills) + 1 and log.frames[0].shape == (32, 32, 3)
    assert all(r.endswith(".") for r in log.reasoning)
    assert log.decided_by == {"oracle": len(log.skills)} and log.instruction


@pytest.mark.timeout(60)
def test_evaluate_cli_prints_json(capsys):
    assert evaluate.main(["--seeds", "2", "--env", "tabletop/Push-v0"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tabletop/Push-v0"]["episodes"] == 2
    assert out["tabletop/Push-v0"]["success_rate"] == 1.0


@pytest.mark.timeout(120)
def test_contact_sheet_png(tmp_path):
    from PIL import Image

    from envs import contact_sheet

    out = tmp_path / "sheet.png"
    args = [
        "--out",
        str(out),
        "--env",
        "tabletop/PickPlace-v0",
        "--env",
        "tabletop/Push-v0",
        "--size",
        "48",
        "--tile",
        "64",
        "--max-cols",
        "4",
    ]
    assert contact_sheet.main(args) == 0
    image = Image.open(out)
    assert image.format == "PNG" and image.width > 4 * 64 and image.height > 2 * 64
    pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 20  # frames and captions were drawn
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("env_id", sorted(envs.ENV_IDS))
def test_oracle_recovers_after_wrong_skills(env_id):
    """The oracle is stateless: after a student's random choices it still finishes the task
    (clearing cubes that ended up in the way onto a free spot of the table)."""
    env = envs.make_skill_env(env_id, images=False)
    successes = 0
    for seed in range(5):
        rng = np.random.default_rng(seed)
        _, info = env.reset(seed=seed)
        for _ in range(3):
            *_, info = env.step(int(rng.integers(len(info["options"]))))
        for _ in range(30):
            if info["is_success"]:
                break
            decision = oracle.decide(env.privileged_state(), info["options"])
            _, _, _, _, info = env.step(decision.skill_index)
        successes += info["is_success"]
    assert successes >= 4, f"{successes}/5 recovered"


@pytest.mark.timeout(60)
def test_oracle_carries_on_with_the_cube_a_student_started():
    """Its labels depend on what a student sees, not on the hidden order of the goal list:
    above, or holding, another cube than the first pending one, it finishes that cube."""
    env = envs.make_skill_env("tabletop/Sort-v0", images=False)
    _, info = env.reset(seed=1)
    first, (cube, bin_) = tasks.pending(env.privileged_state())[:2]
    _, _, _, _, info = env.step(info["options"].index(f"move above the {cube}"))
    assert oracle.decide(env.privileged_state(), info["options"]).skill == skills.GRASP
    _, _, _, _, info = env.step(info["options"].index(skills.GRASP))
    assert env.privileged_state()["held"] == cube
    while env.privileged_state()["held"] == cube:  # lift, place in its bin (which releases)
        decision = oracle.decide(env.privileged_state(), info["options"])
        assert decision.skill in (skills.LIFT, f"place in the {bin_}"), decision.rationale
        _, _, _, _, info = env.step(decision.skill_index)
    assert tasks.placed(env.privileged_state(), cube, bin_)
    after = oracle.decide(env.privileged_state(), info["options"])
    assert after.skill == f"move above the {first[0]}"  # then back to the list's order


@pytest.mark.timeout(120)
@pytest.mark.parametrize("env_id", sorted(envs.ENV_IDS))
def test_oracle_own_path_follows_the_goal_list(env_id):
    """Carrying on with a started cube never changes the oracle's own episodes (recorded
    behaviour-cloning data) on these seeds: there it always works on the first pending pair."""
    env = envs.make_skill_env(env_id, images=False)
    for seed in range(20):
        _, info = env.reset(seed=seed)
        while not info["is_success"]:
            priv = env.privileged_state()
            todo = tasks.pending(priv)
            if todo:
                assert oracle.current_goal(priv, todo) == todo[0], (seed, priv["held"])
            _, _, terminated, truncated, info = env.step(
                oracle.decide(priv, info["options"]).skill_index
            )
            if terminated or truncated:
                break
        assert info["is_success"], seed
