"""The cosmos backend with tiny random Qwen2.5-VL / Qwen3-VL checkpoints (no download).

Every test runs the real path: `from_pretrained` on a directory written by
`save_pretrained`, the real processor and chat template, one real padded
`generate`, the parser. "Scripted" checkpoints have weights set so that
decoding emits a fixed well-formed answer (see agent/cosmos/tiny.py);
plain random checkpoints produce garbage, which exercises retries and fallback.
"""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest

pytest.importorskip("transformers")

from runtime_fixtures import ROOT, serve_subprocess, stop_process, wait_ready

import envs
from agent.backends import BackendError, EnvInfo, load_backend
from agent.backends.base import parse_options
from agent.backends.cosmos import CosmosOptions, remember_frame
from agent.client import AgentClient
from agent.cosmos.loading import has_video_support
from agent.cosmos.tiny import save_tiny_vlm
from agent.envspec import describe_env
from agent.launch import free_port
from agent.messages import Observation
from agent.server import Server, ServerConfig
from agent.store import iter_episodes

pytestmark = pytest.mark.timeout(120)

ENV = EnvInfo("tabletop/PickPlace-v0", action_shape=(4,), has_skills=True)
OPTIONS = ["move above the red cube", "grasp", "open the gripper"]
REASON1_ANSWER = "<think>ok</think><answer>B</answer>"
REASON2_ANSWER = "<think>ok</think>C"
POINT_ANSWER = '<think>go</think>{"point_2d": [618, 347]}'
GREEDY = {"temperature": "0", "max_new_tokens": "24"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("cosmos")
    return {
        "r1": save_tiny_vlm(root / "r1", "qwen2_5_vl", scripted_answer=REASON1_ANSWER),
        "r2": save_tiny_vlm(root / "r2", "qwen3_vl", scripted_answer=REASON2_ANSWER),
        "r2_point": save_tiny_vlm(root / "r2p", "qwen3_vl", scripted_answer=POINT_ANSWER),
        "cut_off": save_tiny_vlm(root / "cut", "qwen2_5_vl", scripted_answer="<think>hmm"),
        "random": save_tiny_vlm(root / "random", "qwen2_5_vl"),
        "random_r2": save_tiny_vlm(root / "random_r2", "qwen3_vl"),
    }


def observations(n: int, sim: dict | None = None) -> list[Observation]:
    rng = np.random.default_rng(0)
    return [
        Observation(
            robot_id=f"robot{i}",
            episode_id=f"ep{i}",
            step=0,
            instruction="put the red cube on the green pad",
            images={"image": rng.integers(0, 255, (96 + 16 * i, 128, 3), np.uint8)},
            options=OPTIONS[: 2 + i % 2],
            sim=sim,
        )
        for i in range(n)
    ]


def test_reason1_batch_in_one_generate_maps_letter_to_skill(checkpoints):
    backend = load_backend("cosmos", ENV, str(checkpoints["r1"]), **GREEDY)
    assert backend.style == "reason1" and backend.model_type == "qwen2_5_vl"
    decisions = backend.decide(observations(3))
    assert [d.skill_index for d in decisions] == [1, 1, 1]
    assert [d.skill for d in decisions] == ["grasp"] * 3
    assert all(d.reasoning == REASON1_ANSWER for d in decisions)
    stats = backend.stats()
    assert stats["generate_calls"] == 1  # three robots, different image sizes, one padded batch
    assert stats["parsed"] == 3 and stats["fallbacks"] == 0 and stats["retried"] == 0
    assert stats["ms_per_decode_step"] > 0


def test_official_sampling_defaults_still_parse(checkpoints):
    backend = load_backend("cosmos", ENV, str(checkpoints["r1"]), seed="0")
    assert (backend.options.temperature, backend.options.top_p) == (0.6, 0.95)
    assert (backend.options.repetition_penalty, backend.options.max_new_tokens) == (1.05, 4096)
    assert [d.skill_index for d in backend.decide(observations(2))] == [1, 1]


def test_reason2_letter_after_think(checkpoints):
    backend = load_backend("cosmos", ENV, str(checkpoints["r2"]), **GREEDY)
    assert backend.style == "reason2" and backend.model_type == "qwen3_vl"
    decisions = backend.decide(observations(1)[0:1] + observations(2)[1:2])
    assert [d.skill_index for d in decisions] == [0, 2]  # robot 0 has only A and B: fallback
    assert decisions[0].reasoning.startswith("[cosmos fallback")
    assert decisions[1].skill == "open the gripper"


def test_reason2_point_answer_becomes_a_point(checkpoints):
    backend = load_backend("cosmos", ENV, str(checkpoints["r2_point"]), points="true", **GREEDY)
    (decision,) = backend.decide(observations(1))
    assert decision.point == (618.0, 347.0) and decision.skill_index is None
    assert backend.stats()["point_answers"] == 1
    strict = load_backend("cosmos", ENV, str(checkpoints["r2_point"]), fallback="first", **GREEDY)
    (decision,) = strict.decide(observations(1))  # points not offered: not accepted either
    assert decision.point is None and decision.skill_index == 0


def test_unparseable_answer_is_retried_with_more_tokens_then_falls_back(checkpoints):
    backend = load_backend(
        "cosmos", ENV, str(checkpoints["cut_off"]), fallback="first", retries="2", **GREEDY
    )
    decisions = backend.decide(observations(2))
    assert [d.skill_index for d in decisions] == [0, 0]
    assert all(
        d.reasoning.startswith("[cosmos fallback: unparseable answer] <think>hmm")
        for d in decisions
    )
    stats = backend.stats()
    assert stats["generate_calls"] == 3 and stats["retried"] == 4
    assert stats["fallbacks"] == 2 and stats["fallback_first"] == 2


def test_each_retry_gets_more_tokens_up_to_max_retry_tokens(checkpoints):
    backend = load_backend(
        "cosmos",
        ENV,
        str(checkpoints["cut_off"]),
        temperature="0",
        max_new_tokens="4",
        min_new_tokens="1000",  # end of turn suppressed: every attempt uses its whole budget
        retries="2",
        max_retry_tokens="12",
        fallback="first",
    )
    (decision,) = backend.decide(observations(1))
    assert decision.reasoning.startswith("[cosmos fallback: unparseable answer] <think>hmm")
    stats = backend.stats()
    # budgets 4, 8, then 12 (16 capped): a generate of N tokens takes N - 1 decode steps
    assert stats["generate_calls"] == 3 and stats["decode_steps"] == 3 + 7 + 11


def test_oracle_fallback_uses_the_privileged_state(checkpoints):
    env = envs.make_skill_env("tabletop/PickPlace-v0", images=False)
    _, info = env.reset(seed=0)
    sim = env.privileged_state()
    env.close()
    backend = load_backend("cosmos", ENV, str(checkpoints["cut_off"]), retries="0", **GREEDY)
    obs = Observation(
        "robot",
        "ep",
        0,
        info["instruction"],
        {"image": np.zeros((64, 64, 3), np.uint8)},
        options=info["options"],
        sim=sim,
    )
    no_sim = Observation("robot2", "ep2", 0, info["instruction"], options=info["options"])
    with_sim, without_sim = backend.decide([obs, no_sim])
    expected = envs.oracle.decide(sim, info["options"])
    assert with_sim.skill_index == expected.skill_index
    np.testing.assert_allclose(with_sim.action, expected.action)
    assert without_sim.skill_index == 0  # no sim state: the first option
    stats = backend.stats()
    assert stats["fallback_oracle"] == 1 and stats["fallback_first"] == 1


def test_random_model_never_crashes_and_counts_every_outcome(checkpoints):
    backend = load_backend(
        "cosmos",
        ENV,
        str(checkpoints["random"]),
        temperature="0",
        max_new_tokens="12",
        retries="1",
        fallback="noop",
    )
    decisions = backend.decide(observations(4))
    assert len(decisions) == 4
    stats = backend.stats()
    assert stats["parsed"] + stats["fallbacks"] == 4
    for decision in decisions:
        assert decision.skill_index is not None or decision.action is not None


def test_observation_without_options_is_not_asked(checkpoints):
    backend = load_backend("cosmos", ENV, str(checkpoints["r1"]), **GREEDY)
    (decision,) = backend.decide([Observation("robot", "ep", 0, "wave", options=[])])
    np.testing.assert_array_equal(decision.action, np.zeros(4, np.float32))  # no-op action
    assert decision.reasoning == "[cosmos fallback: no options to choose from]"
    assert backend.stats()["generate_calls"] == 0


@pytest.mark.parametrize("name", ["random", "random_r2"])
def test_left_padded_batch_decodes_each_robot_as_if_alone(checkpoints, name):
    backend = load_backend(
        "cosmos",
        ENV,
        str(checkpoints[name]),
        temperature="0",
        max_new_tokens="10",
        retries="0",
        fallback="first",
    )
    batch = observations(3)  # different image sizes and menus: different prompt lengths
    together = [d.reasoning for d in backend.decide(batch)]
    alone = [backend.decide([obs])[0].reasoning for obs in batch]
    assert together == alone


@pytest.mark.parametrize("name", ["random", "random_r2"])
def test_bucketed_static_cache_batch_decodes_like_the_plain_one(checkpoints, name):
    """compile=on is CUDA's default path; on CPU it is the same minus torch.compile."""
    options = dict(temperature="0", max_new_tokens="10", retries="0", fallback="first")
    plain = load_backend("cosmos", ENV, str(checkpoints[name]), compile="off", **options)
    bucketed = load_backend("cosmos", ENV, str(checkpoints[name]), compile="on", **options)
    assert bucketed.compiled and not plain.compiled
    batch = observations(3)  # padded to a batch of 4, prompts to a multiple of 64 tokens
    expected = [d.reasoning for d in plain.decide(batch)]
    assert [d.reasoning for d in bucketed.decide(batch)] == expected
    assert bucketed.stats()["generate_calls"] == 1 and bucketed.stats()["decisions"] == 3


def test_options_are_validated_and_converted():
    parsed = parse_options(
        CosmosOptions, "cosmos", {"temperature": "0.7", "points": "yes", "retries": 3}
    )
    assert (parsed.temperature, parsed.points, parsed.retries) == (0.7, True, 3)
    for bad in (
        {"temprature": 1},
        {"fallback": "guess"},
        {"retries": "x"},
        {"top_p": "0"},
        {"min_new_tokens": "-1"},
        {"fps": "0"},
        {"retry_token_factor": "0.5"},
    ):
        with pytest.raises(BackendError):
            parse_options(CosmosOptions, "cosmos", bad)


def test_bad_checkpoints_are_clear_errors(checkpoints, tmp_path):
    with pytest.raises(BackendError, match="needs --model"):
        load_backend("cosmos", ENV, None)
    with pytest.raises(BackendError, match="cannot load"):
        load_backend("cosmos", ENV, str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(BackendError, match="not supported"):
        load_backend("cosmos", ENV, str(tmp_path))
    no_weights = shutil.copytree(checkpoints["random"], tmp_path / "no-weights")
    for weights in no_weights.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(BackendError, match="cannot load"):
        load_backend("cosmos", ENV, str(no_weights))


@pytest.mark.skipif(has_video_support(), reason="torchvision present: video is supported")
def test_video_frames_without_torchvision_is_a_clear_error(checkpoints):
    with pytest.raises(BackendError, match="torchvision"):
        load_backend("cosmos", ENV, str(checkpoints["r1"]), frames="4")


def test_a_retried_step_replaces_its_video_frame_instead_of_adding_it_twice():
    frame = {s: np.full((2, 2, 3), s, np.uint8) for s in range(6)}
    history: dict = {}
    for step in (0, 1, 2, 2, 3):  # step 2 is retried
        history, video = remember_frame(history, step, frame[step], 3)
    assert [int(f[0, 0, 0]) for f in video] == [1, 2, 3]
    assert sorted(history) == [1, 2, 3]
    history, video = remember_frame(history, 2, frame[2], 3)  # a late retry of step 2
    assert [int(f[0, 0, 0]) for f in video] == [1, 2]


# ---------------------------------------------------------------- through the runtime


def _robot_episode(endpoint: str, steps: int, *, use_points: bool = False) -> list:
    """A simulated robot: SkillEnv <-> real client <-> server; returns the replies."""
    env = envs.make_skill_env("tabletop/PickPlace-v0")
    obs, info = env.reset(seed=0)
    replies = []
    with AgentClient(endpoint, timeout_ms=60_000) as client:
        for step in range(steps):
            reply = client.decide(
                episode_id="episode-0",
                step=step,
                images={"image": obs["image"]},
                state=obs["state"],
                instruction=info["instruction"],
                options=info["options"],
                sim=env.privileged_state(),
            )
            replies.append(reply)
            decision = reply.decision
            if use_points and decision.point is not None:
                obs, _, _, _, info = env.step_point(*decision.point)
            else:
                obs, _, _, _, info = env.step(decision.skill_index)
        client.end_episode("episode-0", success=bool(info["is_success"]))
    env.close()
    return replies


def test_in_process_server_drives_a_simulated_robot_and_records_reasoning(checkpoints, tmp_path):
    description = describe_env("tabletop/PickPlace-v0")
    backend = load_backend(
        "cosmos", description.info, str(checkpoints["r2_point"]), points="true", **GREEDY
    )
    server = Server(
        backend, ServerConfig(bind="tcp://127.0.0.1:0", record_dir=tmp_path), description
    )
    endpoint = server.bind()
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        replies = _robot_episode(endpoint, steps=2, use_points=True)
    finally:
        server.stop()
        thread.join(30)
    assert [r.decision.point for r in replies] == [(618.0, 347.0)] * 2
    assert all(r.model_id == str(checkpoints["r2_point"]) for r in replies)
    (episode,) = list(iter_episodes(tmp_path))
    assert episode.column("reasoning") == [POINT_ANSWER] * 2


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_agent_serve_cli_with_a_save_pretrained_directory(checkpoints):
    port = free_port()
    proc = serve_subprocess(
        port,
        "--env",
        "tabletop/PickPlace-v0",
        "--backend",
        "cosmos",
        "--model",
        str(checkpoints["r1"]),
        "--backend-opt",
        "retries=0",
        "--backend-opt",
        "fallback=noop",
    )
    try:
        metadata = wait_ready(f"tcp://127.0.0.1:{port}", attempts=240)
        assert metadata["backend"] == "cosmos"
        assert metadata["model_id"] == str(checkpoints["r1"])
        replies = _robot_episode(f"tcp://127.0.0.1:{port}", steps=2)
    finally:
        out = stop_process(proc)
    first = replies[0].decision
    assert first.skill_index == 1 and first.reasoning == REASON1_ANSWER, out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_benchmark_tiny_mode_prints_json_rows():
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "cosmos_decide.py"),
            "--tiny",
            "--json",
            "--robots",
            "4",
            "--tokens",
            "4",
            "--seconds",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert [(r["robots"], r["max_batch"]) for r in result["rows"]] == [(4, 1), (4, 4)]
    for row in result["rows"]:
        assert row["decisions"] > 0 and row["decisions_per_s"] > 0
        assert row["ms_per_decode_step"] > 0
