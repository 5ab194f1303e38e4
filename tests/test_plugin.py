"""The simulator plugin against a real server: tabletop skills via the oracle, Pusher via actions."""

import gymnasium as gym
import numpy as np
import pytest
from runtime_fixtures import running_env_server

import envs
from agent.store import iter_episodes
from envs.plugin import RemotePolicy
from envs.rollout import observation_fields, run_episode

pytestmark = pytest.mark.timeout(120)


def test_observation_fields_for_dict_and_flat_observations():
    obs = {"image": np.zeros((4, 4, 3), np.uint8), "state": np.ones(3), "instruction": "stack"}
    req = observation_fields(obs, {"options": ["grasp"]})
    assert req["state"].dtype == np.float32 and set(req["images"]) == {"image"}
    assert req["instruction"] == "stack" and req["options"] == ["grasp"]
    flat = observation_fields(np.ones(23), {})
    assert flat["state"].shape == (23,) and flat["options"] == []


def test_tabletop_episode_through_the_oracle_backend(tmp_path):
    env = envs.make_skill_env("tabletop/PickPlace-v0")
    with running_env_server("tabletop/PickPlace-v0", "oracle", record_dir=tmp_path) as server:
        policy = RemotePolicy(server.endpoint, timeout_ms=30_000)
        try:
            result = run_episode(env, policy, seed=1)
        finally:
            policy.close()
            env.close()
    assert result.success and result.terminated and result.decisions >= 2
    (episode,) = list(iter_episodes(tmp_path))
    assert episode.meta["success"] is True and len(episode) == result.decisions
    assert (episode.meta["seed"], episode.meta["task"]) == (1, "tabletop/PickPlace-v0")
    assert episode.column("decided_by") == ["oracle"] * len(episode)
    assert episode.column("skill") == result.skills and result.decided_by == {
        "oracle": len(episode)
    }
    assert episode.images("image").shape == (result.decisions, 224, 224, 3)
    assert all(r for r in episode.column("reasoning"))
    assert np.nansum(episode.rewards()) == pytest.approx(result.total_reward, rel=1e-5)


@pytest.mark.parametrize("env_id", ["Pusher-v5", "Reacher-v5"])
def test_standard_mujoco_envs_run_on_low_level_actions(env_id):
    env = gym.make(env_id, max_episode_steps=20)
    with running_env_server(env_id, "zero") as server:
        policy = RemotePolicy(server.endpoint, timeout_ms=10_000)
        try:
            result = run_episode(env, policy, seed=0)
        finally:
            policy.close()
            env.close()
    assert result.truncated and result.decisions == 20
