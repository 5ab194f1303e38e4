"""The tabletop suite against the shared contract: registration, obs, skills, SkillEnv."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import envs
from envs import oracle
from envs.oracle import OraclePolicy
from envs.rollout import run_episode
from envs.skill_env import check_skill_env

pytestmark = pytest.mark.timeout(120)


def test_import_registers_ids_without_mujoco():
    code = (
        "import sys, gymnasium, envs, envs.oracle\n"
        "ids = sorted(i for i in gymnasium.registry if i.startswith('tabletop/'))\n"
        "print(ids, 'mujoco' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.strip() == (
        "['tabletop/PickPlace-v0', 'tabletop/Push-v0', 'tabletop/Sort-v0', 'tabletop/Stack-v0'] False"
    )


def test_observation_matches_the_space():
    env = gym.make("tabletop/PickPlace-v0", image_size=(64, 96), wrist_camera=True)
    obs, info = env.reset(seed=3)
    assert env.observation_space.contains(obs)
    assert obs["image"].shape == (64, 96, 3) and obs["image"].dtype == np.uint8
    assert obs["wrist_image"].shape == (64, 96, 3)
    assert obs["image"].std() > 5  # a real rendered scene, not a blank frame
    assert obs["state"].dtype == np.float32
    assert obs["instruction"] == info["instruction"] and " cube" in obs["instruction"]
    assert info["is_success"] is False and info["options"]
    env.close()


def test_privileged_state_is_plain_json_data():
    env = gym.make("tabletop/Sort-v0", images=False)
    env.reset(seed=0)
    priv = env.unwrapped.privileged_state()
    assert json.loads(json.dumps(priv)) == priv  # str/float/list/dict only: msgpack-friendly
    assert priv["held"] == "" and len(priv["ee"]) == 3
    assert {o["kind"] for o in priv["objects"].values()} == {"cube", "bin"}
    assert len(priv["goal"]["pairs"]) == 3


def test_pick_place_oracle_episode_through_skill_env():
    env = envs.make_skill_env("tabletop/PickPlace-v0", images=False)
    log = run_episode(env, OraclePolicy(), seed=0)
    assert log.success
    assert log.skills[0].startswith("move above the ") and "grasp" in log.skills
    assert log.skills[-1].startswith("place on the ")
    assert 0 < log.low_level_steps <= 80 * len(log.skills)
    _, info = env.reset(seed=0)
    _, _, _, _, info = env.step(0)
    assert set(info) >= {"options", "instruction", "is_success", "skill", "low_level_steps"}
    assert info["skill"] == log.skills[0] and 0 < info["low_level_steps"] <= 80


class Wanderer:
    """Moves between cubes forever: a skill episode that never succeeds."""

    model_version = "0"

    def start_episode(self, env, episode_id, seed):
        pass

    def decide(self, env, obs, info, *, reward, history):
        from agent.messages import Decision

        moves = [i for i, o in enumerate(info["options"]) if o.startswith("move above")]
        last = history[-1] if history else None
        pick = next(i for i in moves if info["options"][i] != last)
        return Decision(skill_index=pick, skill=info["options"][pick])

    def end_episode(self, **_):
        pass


def test_a_skill_episode_ends_after_max_skills_not_at_the_low_level_time_limit():
    """Skills run on the unwrapped executor: the registered TimeLimit (300 low-level steps
    for PickPlace) never ends a skill episode; `max_skills` does, as truncation."""
    limit = gym.spec("tabletop/PickPlace-v0").max_episode_steps
    env = envs.make_skill_env("tabletop/PickPlace-v0", images=False)
    result = run_episode(env, Wanderer(), seed=0)
    assert result.truncated and not result.terminated and result.success is False
    assert result.decisions == 40 and result.low_level_steps > limit
    short = run_episode(envs.make_skill_env("tabletop/PickPlace-v0", max_skills=5, images=False),
                        Wanderer(), seed=0)  # fmt: skip
    assert short.truncated and short.decisions == 5


def test_skill_env_rejects_an_index_outside_the_menu():
    env = envs.make_skill_env("tabletop/PickPlace-v0", images=False)
    _, info = env.reset(seed=1)
    assert env.action_space == gym.spaces.Discrete(envs.MAX_OPTIONS)
    with pytest.raises(ValueError, match="out of range"):
        env.step(len(info["options"]))


def test_grasp_really_lifts_the_cube_by_friction():
    env = envs.make_skill_env("tabletop/PickPlace-v0", images=False)
    _, info = env.reset(seed=2)
    target = env.privileged_state()["goal"]["pairs"][0][0]
    for skill in (f"move above the {target}", "grasp", "lift"):
        _, _, _, _, info = env.step(info["options"].index(skill))
    priv = env.privileged_state()
    assert priv["held"] == target
    assert priv["objects"][target]["pos"][2] > 0.1  # off the table, held only by contact
    assert info["options"][0] == "lift" and "open the gripper" in info["options"]


def test_oracle_is_pure_and_gives_a_low_level_action():
    env = gym.make("tabletop/Push-v0", images=False)
    _, info = env.reset(seed=4)
    priv = env.unwrapped.privileged_state()
    first = oracle.decide(priv, info["options"])
    again = oracle.decide(json.loads(json.dumps(priv)), info["options"])
    assert first.skill == again.skill and np.array_equal(first.action, again.action)
    assert first.action.shape == (4,) and first.action.dtype == np.float32
    assert first.skill.startswith("move behind the ") and first.rationale.endswith(".")
    low_level = oracle.decide(priv, [])
    assert low_level.skill_index == -1 and low_level.skill == first.skill
    with pytest.raises(ValueError, match="not among the options"):
        oracle.decide(priv, ["lift"])
    with pytest.raises(ValueError, match="lacks"):
        oracle.decide({"ee": [0, 0, 0]}, [])


def test_unknown_skill_is_a_clear_error():
    env = gym.make("tabletop/Stack-v0", images=False)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="unknown skill"):
        env.unwrapped.execute_skill("dance")
    with pytest.raises(ValueError, match="no 'zzz cube' in this scene"):
        env.unwrapped.execute_skill("move above the zzz cube")


@pytest.mark.parametrize("action", [[np.nan, 0, 0, 0], [0.1, 0.2], [[0, 0, 0, 1]]])
def test_malformed_low_level_action_is_a_clear_error(action):
    env = gym.make("tabletop/Push-v0", images=False)
    env.reset(seed=0)
    state = env.unwrapped.data.qpos.copy()
    with pytest.raises(ValueError, match="4 finite numbers"):
        env.step(action)
    np.testing.assert_array_equal(env.unwrapped.data.qpos, state)  # nothing was simulated
    assert env.unwrapped.metadata["render_fps"] == 25  # 0.002 s x frame_skip 20


def test_readme_environments_snippet_runs():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Environments", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    proc = subprocess.run(
        [sys.executable, "-c", snippet],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("success: True")
    assert "grasp - " in proc.stdout


@pytest.mark.parametrize("env_id", sorted(envs.ENV_IDS))
def test_any_menu_choice_executes_safely(env_id):
    """A learning policy picks wrong skills: each must run, end and keep the env valid."""
    env = envs.make_skill_env(env_id, image_size=32)
    rng = np.random.default_rng(0)
    obs, info = env.reset(seed=11)
    for _ in range(12):
        choice = int(rng.integers(len(info["options"])))
        obs, reward, terminated, _, info = env.step(choice)
        assert env.observation_space.contains(obs)
        assert np.isfinite(reward) and 0 <= info["low_level_steps"] <= 80
        assert 1 <= len(info["options"]) <= envs.MAX_OPTIONS
        warnings = env.unwrapped.data.warning
        assert sum(w.number for w in warnings) == 0, "MuJoCo reported unstable physics"
        if terminated:
            obs, info = env.reset(seed=12)
    env.close()


@pytest.mark.parametrize("env_id", sorted(envs.ENV_IDS))
def test_every_task_keeps_the_skill_env_contract(env_id):
    env = envs.make_skill_env(env_id, image_size=32)
    check_skill_env(env, seed=3)
    env.close()


def test_the_checker_names_what_breaks_the_contract():
    env = gym.make("Pusher-v5")
    with pytest.raises(AssertionError, match="not a SkillChoiceEnv"):
        check_skill_env(env)
    env.close()
