"""Serving the student: hot reload under a real server, refused versions, DAgger labels, escalation."""

import shutil
import threading
import time

import numpy as np
import pytest
import torch

from agent import versions
from agent.backends import EnvInfo, load_backend
from agent.backends.teaching import Teaching, draw
from agent.client import AgentClient
from agent.launch import run_robots, serving
from agent.messages import Observation
from agent.store import iter_episodes
from agent.student import checkpoint as ckpt

pytestmark = pytest.mark.timeout(300)
ENV_ID = "tabletop/PickPlace-v0"
ENV = EnvInfo(ENV_ID, action_shape=(4,), has_skills=True)


def recorded_step(recorded):
    episode = next(iter_episodes(recorded / "PickPlace-v0"))
    return {
        "images": {"image": episode.images()[0]},
        "state": episode.states()[0],
        "instruction": episode.column("instruction")[0],
        "options": episode.column("options")[0],
    }


def publish_perturbed(root, scale=1e-2, seed=0, source=None):
    model, _ = ckpt.load(source or root)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return ckpt.publish(root, model, step=1, watermark={}, metrics={}).name


def corrupt_latest(root):
    """A version whose weights no longer match its manifest, put in place as publish would."""
    names = versions.version_names(root)
    name = f"v{int(names[-1][1:]) + 1:06d}"
    staging = root / ".tmp" / name
    shutil.copytree(root / names[-1], staging)
    weights = staging / ckpt.WEIGHTS
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    weights.write_bytes(bytes(blob))
    staging.rename(root / name)
    (root / ".tmp" / "LATEST").write_text(name + "\n")
    (root / ".tmp" / "LATEST").rename(root / "LATEST")
    return name


def test_new_versions_are_served_without_a_restart_and_corrupt_ones_never(
    recorded, trained, tmp_path
):
    root = tmp_path / "ckpt"
    shutil.copytree(trained, root)
    first = versions.latest_name(root)
    fields = recorded_step(recorded)
    served, errors, stop = [], [], threading.Event()
    with serving(
        ENV_ID, "--backend", "policy", "--model", str(root), "--reload-every-s", "0.1"
    ) as (
        endpoint,
        _,
    ):

        def robot():
            with AgentClient(endpoint, timeout_ms=10_000) as client:
                step = 0
                while not stop.is_set():
                    try:
                        served.append(
                            client.decide(episode_id="e", step=step, **fields).model_version
                        )
                    except Exception as exc:
                        errors.append(exc)
                    step += 1

        thread = threading.Thread(target=robot)
        thread.start()
        try:
            time.sleep(0.5)
            bad = corrupt_latest(root)
            time.sleep(1.0)
            good = publish_perturbed(root, seed=1, source=root / first)
            deadline = time.monotonic() + 30
            while good not in served and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            stop.set()
            thread.join(30)
        with AgentClient(endpoint, timeout_ms=5000) as client:
            stats = client.stats()
    assert not errors
    assert served[0] == first and served[-1] == good  # picked up, no restart
    assert bad not in served  # never served
    assert stats["versions_refused"] == 1 and stats["version_swaps"] == 1
    assert bad in stats["backend"]["refused"] and "sha256" in stats["backend"]["refused"][bad]


def test_a_loaded_version_is_handed_over_once_even_before_its_swap(trained, tmp_path):
    """The reloader polls faster than the loop swaps: the same version must not load twice."""
    root = tmp_path / "ckpt"
    shutil.copytree(trained, root)
    backend = load_backend("policy", ENV, str(root))
    assert backend.load_version() is None  # nothing new yet
    name = publish_perturbed(root)
    loaded = backend.load_version()
    assert loaded is not None and loaded.model_version == name
    assert backend.load_version() is None  # still waiting for its swap: not loaded again
    backend.swap(loaded)
    assert backend.model_version == name and backend.load_version() is None
    assert backend.stats()["versions_loaded"] == 2  # the first version and this one


def test_swap_at_episode_keeps_each_episode_on_one_version(recorded, trained, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(trained, root)
    backend = load_backend("policy", ENV, str(root), swap_at="episode")
    fields = recorded_step(recorded)
    old = Observation("r", "old", 0, **fields)
    (decision,) = backend.decide([old])
    first = decision.model_version
    publish_perturbed(root)
    backend.swap(backend.load_version())
    old_again = Observation("r", "old", 1, **fields)
    new = Observation("r", "new", 0, **fields)
    decisions = backend.decide([old_again, new])
    assert decisions[0].model_version == first != decisions[1].model_version


def test_teacher_labels_every_row_and_beta_mixes_who_acts(recorded, trained, tmp_path):
    args = ["--backend", "policy", "--model", str(trained), "--teacher", "oracle", "--beta", "0.5"]
    with serving(ENV_ID, *args, "--record", str(tmp_path)) as (endpoint, _):
        summary = run_robots(endpoint, ENV_ID, 6, seed=100, robots=2)
    rows = [row for e in iter_episodes(tmp_path) for row in e.table.to_pylist()]
    assert len(rows) == summary["decisions"] > 0
    assert all(
        r["teacher_skill_index"] is not None and r["teacher_model"] == "oracle" for r in rows
    )
    who = {r["decided_by"] for r in rows}
    assert who == {"policy", "teacher:oracle"}, who
    for r in rows:  # the teacher's rows execute the teacher's choice
        if r["decided_by"] == "teacher:oracle":
            assert r["skill_index"] == r["teacher_skill_index"]
    assert summary["decided_by"] == {w: sum(r["decided_by"] == w for r in rows) for w in who}


def test_escalation_counts_match_the_recorded_rows(recorded, trained, tmp_path):
    args = [
        "--backend", "policy", "--model", str(trained), "--teacher", "oracle",
        "--escalate-below", "0.9", "--label", "escalated",
    ]  # fmt: skip
    with serving(ENV_ID, *args, "--record", str(tmp_path)) as (endpoint, _):
        summary = run_robots(endpoint, ENV_ID, 6, seed=200, robots=2)
        with AgentClient(endpoint, timeout_ms=5000) as client:
            stats = client.stats()["backend"]
    rows = [row for e in iter_episodes(tmp_path) for row in e.table.to_pylist()]
    escalated = [r for r in rows if r["decided_by"] == "escalated:oracle"]
    assert (
        len(escalated)
        == stats["escalated"]
        == round(summary["escalation_rate"] * summary["decisions"])
    )
    assert all(r["confidence"] < 0.9 for r in escalated)
    assert all(r["confidence"] >= 0.9 for r in rows if r["decided_by"] == "policy")
    # asked only where it acts: the other rows carry no label
    assert all((r["teacher_skill_index"] is not None) == (r in escalated) for r in rows)
    assert stats["teacher_decisions"] == len(escalated)


def test_mixing_draws_are_seeded_per_robot_and_step(recorded, trained):
    assert draw(0, "r", "e", 3) == draw(0, "r", "e", 3) != draw(1, "r", "e", 3)
    draws = [draw(7, "r", "e", t) for t in range(4000)]
    assert 0.47 < np.mean(np.array(draws) < 0.5) < 0.53
    student = load_backend("policy", ENV, str(trained))
    teacher = load_backend("zero", ENV)
    always = Teaching(student, teacher, beta=1.0)
    obs = Observation("r", "e", 0, **recorded_step(recorded))
    (decision,) = always.decide([obs])
    assert decision.decided_by == "teacher:zero" and decision.skill_index == 0
    with pytest.raises(Exception, match="beta must be in"):
        Teaching(student, teacher, beta=1.5)


def test_a_teacher_asked_only_when_unsure_does_not_refuse_robots_it_cannot_teach(recorded, trained):
    """The oracle needs `sim`; a robot without it is refused only when every step needs a label."""
    from agent.backends.base import BadObservation

    obs = Observation("r", "e", 0, **recorded_step(recorded))  # a real robot: no sim
    student = load_backend("policy", ENV, str(trained))
    oracle = load_backend("oracle", ENV)
    with pytest.raises(BadObservation, match="privileged state"):
        Teaching(student, oracle).check(obs)
    (alone,) = student.decide([obs])
    assert alone.confidence < 1.0  # so below 1.0 it is unsure
    unsure = Teaching(student, oracle, escalate_below=1.0, label="escalated")
    unsure.check(obs)
    (decision,) = unsure.decide([obs])  # the teacher was to act and could not: that step fails
    assert "the teacher could not decide" in str(decision)
    assert unsure.stats()["teacher_failed"] == 1
