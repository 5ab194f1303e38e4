"""The trainer: featuriser, labels, checkpoints, and real runs on episodes a real server recorded."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from agent import versions
from agent.files import sha256, weights_digest
from agent.launch import last_json, run, start, stop, trainer_command
from agent.messages import (
    DecideRequest,
    Decision,
    DecisionReply,
    EndEpisode,
    Observation,
    TeacherLabel,
)
from agent.recording import EpisodeBook, EpisodeWriter
from agent.store import iter_episodes, read_episode
from agent.student import checkpoint as ckpt
from agent.student.features import FeatureConfig, Featuriser, fit_config
from trainer.data import Dataset, samples

pytestmark = pytest.mark.timeout(300)
DATA = Path(__file__).parent / "data"


# --------------------------------------------------------------------------- featuriser


def test_featuriser_matches_its_saved_reference():
    """tests/data/featuriser_reference.npz: the arrays of recorded steps, saved once."""
    reference = np.load(DATA / "featuriser_reference.npz", allow_pickle=False)
    config = FeatureConfig.from_json(str(reference["config"]))
    observations = [s.observation for s in samples(read_episode(DATA / "episode_v1.parquet"))]
    observations[-1].history += ["move to the point (512, 300)", "an unseen word: zebra"]
    arrays = Featuriser(config)(observations)
    assert sorted(arrays) == sorted(k for k in reference.files if k != "config")
    for name, array in arrays.items():
        assert array.dtype == reference[name].dtype, name
        np.testing.assert_array_equal(array, reference[name], err_msg=name)


def test_featuriser_words_menus_and_clear_errors():
    obs = Observation(
        "r", "e", 0, "Put the RED cube on pad 3", {"image": np.zeros((20, 30, 3), np.uint8)},
        np.ones(2, np.float32), ["grasp", "lift"], history=["move above the red cube"],
    )  # fmt: skip
    config = fit_config([obs], image_size=8)
    f = Featuriser(config)
    row = f.one(obs)
    assert row["image"].shape == (8, 8, 3) and row["option_mask"].tolist()[:3] == [
        True,
        True,
        False,
    ]
    words = [config.vocabulary[i] for i in row["instruction"] if i]
    assert words == ["put", "the", "red", "cube", "on", "pad", "<num>"]
    unseen = f.word_id("zebra")
    assert unseen >= len(config.vocabulary) and unseen == Featuriser(config).word_id("zebra")
    assert config.token_count == len(config.vocabulary) + config.oov_buckets
    for bad, message in [
        (Observation("r", "e", 0, state=np.ones(3, np.float32)), "state of shape"),
        (Observation("r", "e", 0, state=np.ones(2, np.float32), options=["a"] * 9), "at most 8"),
        (Observation("r", "e", 0, state=np.ones(2, np.float32)), "needs camera 'image'"),
    ]:
        with pytest.raises(ValueError, match=message):
            f.one(bad)
    assert FeatureConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="unknown feature config fields"):
        FeatureConfig.from_json(json.dumps({**json.loads(config.to_json()), "future": 1}))


# --------------------------------------------------------------------------- labels


def write_episode(directory, episode_id, steps, backend="policy"):
    """A recorded episode through the server's recorder; `steps` are (decision, options)."""
    writer = EpisodeWriter(directory, {"backend": backend})
    book = EpisodeBook("test/Null-v0", writer, idle_timeout_s=30)
    for t, (decision, options) in enumerate(steps):
        obs = Observation(
            "robot", episode_id, t, "go", {"image": np.zeros((8, 8, 3), np.uint8)},
            np.full(3, t, np.float32), options,
        )  # fmt: skip
        book.record(DecideRequest(t, obs), DecisionReply(t, episode_id, t, decision, "m", "1"))
    book.end(EndEpisode(0, "robot", episode_id, 1.0, True, False, True))
    writer.close()


def test_labels_come_from_teachers_only(tmp_path):
    label = TeacherLabel(Decision(skill_index=1, skill="b"), "oracle")
    write_episode(
        tmp_path,
        "mixed",
        [
            (Decision(skill_index=0, skill="a", decided_by="policy", teacher=label), ["a", "b"]),
            (Decision(skill_index=0, skill="a", decided_by="policy"), ["a", "b"]),  # no label
            (Decision(skill_index=1, skill="b", decided_by="teacher:oracle"), ["a", "b"]),
            (Decision(skill_index=0, skill="a", decided_by="fallback:first"), ["a", "b"]),
            (Decision(skill_index=0, skill="a", decided_by="escalated:cosmos"), ["a", "b"]),
        ],
    )
    (episode,) = list(iter_episodes(tmp_path))
    got = [(s.observation.step, s.skill) for s in samples(episode)]
    assert got == [(0, 1), (2, 1), (4, 0)]
    # the history is what was executed, labelled or not
    assert samples(episode)[-1].observation.history == ["a", "a", "b", "a"]


def test_format_1_episodes_label_by_their_backend():
    (labelled,) = [samples(read_episode(DATA / "episode_v1.parquet"))]
    episode = read_episode(DATA / "episode_v1.parquet")
    assert len(labelled) == len(episode) and episode.meta["backend"] == "oracle"
    assert [s.skill for s in labelled] == episode.column("skill_index")


def test_a_dataset_skips_episodes_that_do_not_fit(tmp_path):
    write_episode(
        tmp_path / "a", "fits", [(Decision(skill_index=0, skill="a", decided_by="oracle"), ["a"])]
    )
    write_episode(
        tmp_path / "b",
        "too-long-menu",
        [(Decision(skill_index=0, skill="a", decided_by="oracle"), ["a"] * 9)],
    )
    episodes = list(iter_episodes(tmp_path))
    dataset = Dataset(Featuriser(fit_config(s.observation for s in samples(episodes[0]))))
    assert dataset.add_all(episodes) == 1
    assert dataset.size == 1 and len(dataset.skipped) == 1 and "at most 8" in dataset.skipped[0]


# --------------------------------------------------------------------------- checkpoints


def tiny_student():
    from agent.student.config import ModelConfig
    from agent.student.modeling import Student

    obs = Observation(
        "r", "e", 0, "go", {"image": np.zeros((16, 16, 3), np.uint8)}, np.ones(3, np.float32), ["a"]
    )
    return Student(fit_config([obs], image_size=16), ModelConfig(width=16, word_dim=8, heads=2))


def test_published_versions_load_back_bit_identically_and_refuse_tampering(tmp_path):
    model = tiny_student()
    for step in (1, 2, 3):
        path = ckpt.publish(tmp_path, model, step=step, watermark={}, metrics={}, keep=2)
    assert path.name == "v000003" and versions.version_names(tmp_path) == ["v000002", "v000003"]
    assert (tmp_path / "LATEST").read_text().strip() == "v000003"
    loaded, version = ckpt.load(tmp_path)
    assert version.manifest["step"] == 3
    assert weights_digest(loaded.state_dict()) == weights_digest(model.state_dict())

    weights = path / ckpt.WEIGHTS
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(ckpt.CheckpointError, match="does not match its sha256"):
        ckpt.load(path)

    other = ckpt.publish(tmp_path / "other", tiny_student(), step=0, watermark={}, metrics={})
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(other / ckpt.WEIGHTS))
    tensors["surprise"] = tensors.pop("score.1.weight")
    save_file(tensors, str(other / ckpt.WEIGHTS))
    manifest = json.loads((other / versions.MANIFEST).read_text())
    manifest["files"][ckpt.WEIGHTS] = sha256(other / ckpt.WEIGHTS)
    (other / versions.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match="do not fit the model"):
        ckpt.load(other)

    config = json.loads((other / ckpt.CONFIG).read_text())
    config["format"] = "embodied-agent.student/99"
    (other / ckpt.CONFIG).write_text(json.dumps(config))
    manifest["files"][ckpt.CONFIG] = sha256(other / ckpt.CONFIG)
    (other / versions.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match="is not 'embodied-agent\\.student/1'"):
        ckpt.read(other)


# --------------------------------------------------------------------------- real runs


def trainer(*args, ranks=1, timeout_s=240):
    return run(
        trainer_command(ranks, *args, "--json", "--quiet"), timeout_s=timeout_s, what="trainer"
    )


@pytest.mark.horovod
def test_two_ranks_with_shadowsync_publish_a_version_equal_to_every_replica(recorded, tmp_path):
    out = tmp_path / "ckpt"
    summary = trainer(
        "--episodes", str(recorded), "--out", str(out), "--sync", "ma", "--max-steps", "40",
        "--width", "32", "--publish-every-s", "1e9", ranks=2,
    )  # fmt: skip
    assert summary["ranks"] == 2 and summary["sync"] == "ma"
    assert summary["sync_stats"]["rounds"] > 0 and summary["versions_published"] >= 1
    model, version = ckpt.load(out)
    assert version.name == summary["latest"] and version.manifest["watermark"]["episodes"] == 16
    digests = summary["replica_digests"]
    assert len(digests) == 2 and len(set(digests)) == 1  # the final average made them equal
    assert weights_digest(model.state_dict()) == digests[0]  # bit-identical on reload
    png = out / version.name / "learning_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in lines) and any("validation_accuracy" in r for r in lines)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_follow_learns_from_episodes_written_while_it_runs(recorded, tmp_path):
    episodes, out = tmp_path / "episodes", tmp_path / "ckpt"
    first = sorted((recorded / "PickPlace-v0").glob("*.parquet"))
    later = sorted((recorded / "Push-v0").glob("*.parquet"))
    (episodes / "a").mkdir(parents=True)
    for path in first:
        os.link(path, episodes / "a" / path.name)
    cmd = trainer_command(
        1, "--episodes", str(episodes), "--out", str(out), "--follow", "--publish-every-s", "2",
        "--width", "32", "--json", "--quiet",
    )  # fmt: skip
    proc = start(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: versions.latest_name(out) is not None, 120), "no first version"
        (episodes / "b").mkdir()
        for path in later:  # new episodes land while it trains (a link appears atomically)
            os.link(path, episodes / "b" / path.name)

        def saw_all():
            name = versions.latest_name(out)
            manifest = json.loads((out / name / versions.MANIFEST).read_text()) if name else {}
            return manifest.get("watermark", {}).get("episodes") == len(first) + len(later)

        assert wait_for(saw_all, 120), "the new episodes never reached a published version"
        os.killpg(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        stop(proc, timeout_s=5)
    assert proc.returncode == 0, stderr[-2000:]
    summary = last_json(stdout)
    assert summary["stopped"] == "signal" and summary["episodes"] == len(first) + len(later)
    assert ckpt.read(out).name == summary["latest"]


def rank_pids(root: int) -> dict[int, int]:
    """HOROVOD_RANK -> pid of the trainer ranks that descend from process `root`."""
    parents, ranks = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    for pid in parents:
        ancestor = pid
        while ancestor not in (root, 0, 1) and ancestor in parents:
            ancestor = parents[ancestor]
        if ancestor != root:
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        rank = [e for e in env if e.startswith(b"HOROVOD_RANK=")]
        if rank and b"\0-m\0trainer\0" in cmdline and b"horovodrun" not in cmdline:
            ranks[int(rank[0].split(b"=")[1])] = pid
    return ranks


@pytest.mark.horovod
@pytest.mark.parametrize("sync", ["ma", "allreduce"])
def test_a_hung_rank_stops_a_following_trainer_with_an_error_within_the_timeout(
    recorded, tmp_path, sync
):
    """`--follow` never ends by itself; a rank that hangs (SIGSTOP) must end the job, not hang it."""
    timeout_s = 5.0
    cmd = trainer_command(
        2, "--episodes", str(recorded), "--out", str(tmp_path / "ckpt"), "--follow",
        "--sync", sync, "--sync-timeout-s", str(timeout_s), "--publish-every-s", "2",
        "--width", "32", "--quiet",
    )  # fmt: skip
    proc = start(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(lambda: versions.latest_name(tmp_path / "ckpt") is not None, 180)
        pids = rank_pids(proc.pid)
        assert set(pids) == {0, 1}, pids
        os.kill(pids[1], signal.SIGSTOP)
        hung_at = time.monotonic()
        assert wait_for(lambda: not Path(f"/proc/{pids[0]}").exists(), 90), "rank 0 hangs"
        waited = time.monotonic() - hung_at
        os.kill(pids[1], signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
    finally:
        stop(proc, timeout_s=5)
    assert proc.returncode != 0
    assert "rank 0: stopped, the job lost a rank" in out or "rank 0: no training step" in out, out
    assert waited < timeout_s + 30, waited  # the bound plus polling and scheduling slack


def wait_for(condition, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_a_sigkilled_trainer_leaves_latest_at_a_complete_version(recorded, tmp_path):
    out = tmp_path / "ckpt"
    cmd = trainer_command(
        1, "--episodes", str(recorded), "--out", str(out), "--max-steps", "100000",
        "--publish-every-steps", "2", "--publish-every-s", "0", "--width", "32", "--quiet",
    )  # fmt: skip
    proc = start(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: len(versions.version_names(out)) >= 3, 120)
        time.sleep(0.37)  # somewhere inside the next publication
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        stop(proc, timeout_s=5)
    version = ckpt.read(out)  # hashes and configs check out
    ckpt.load(version.path)
    assert version.name == versions.version_names(out)[-1]


def test_a_second_run_resumes_the_optimizer_and_the_step_and_records_its_arguments(
    recorded, tmp_path
):
    out = tmp_path / "ckpt"
    episodes = str(recorded / "PickPlace-v0")
    common = [
        "--episodes",
        episodes,
        "--out",
        str(out),
        "--width",
        "32",
        "--publish-every-s",
        "1e9",
    ]
    # one publication, at step 20 (a second, earlier one could be held back by the held-out
    # accuracy of a few decisions, which depends on the fixture's episode split)
    first = trainer(*common, "--max-steps", "20", "--publish-every-steps", "20")
    assert first["first_step"] == 0 and first["steps"] == 20 and first["versions_published"] == 1
    proc = subprocess.run(
        trainer_command(1, *common, "--max-steps", "30", "--json", "--quiet"),
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    second = last_json(proc.stdout)
    assert f"continuing from {out / first['latest']} at step 20" in proc.stderr
    assert second["first_step"] == 20 and second["steps"] == 30
    version = ckpt.read(out)
    assert version.manifest["step"] == 30 and version.manifest["args"]["max_steps"] == 30
    assert version.manifest["args"]["episodes"] == episodes
    runs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    started = [r for r in runs if "args" in r]
    assert [r["args"]["max_steps"] for r in started] == [20, 30]
    assert [r["step"] for r in started] == [0, 20]
    (out / "resume.safetensors").unlink()  # versions from a trainer that kept no resume state
    proc = subprocess.run(
        trainer_command(1, *common, "--max-steps", "5", "--json", "--quiet"),
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0 and "warm start" in proc.stderr
    assert last_json(proc.stdout)["first_step"] == 0


def test_resume_state_round_trips_the_optimizer_exactly(tmp_path):
    import torch

    from trainer import resume

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    for _ in range(3):
        model(torch.randn(5, 3)).square().sum().backward()
        optimizer.step()
    state = resume.snapshot(optimizer, "v000004", 3)
    resume.save(tmp_path, state)
    assert resume.load(tmp_path, "v000003") is None  # another version's state is never used
    loaded = resume.load(tmp_path, "v000004")
    fresh = torch.optim.AdamW(model.parameters(), lr=1.0)
    resume.apply(fresh, resume.ResumeState.zeros(loaded.layout()))  # what other ranks start from
    resume.apply(fresh, loaded)
    want, got = optimizer.state_dict(), fresh.state_dict()
    assert got["param_groups"] == want["param_groups"] and loaded.step == 3
    for index, entries in want["state"].items():
        for key, value in entries.items():
            assert torch.equal(got["state"][index][key], value), (index, key)


def test_bad_input_is_a_clear_message(recorded, tmp_path):
    episodes = tmp_path / "episodes"
    episodes.mkdir()
    for path in sorted((recorded / "PickPlace-v0").glob("*.parquet"))[:6]:
        os.link(path, episodes / path.name)
    (episodes / "broken.parquet").write_bytes(b"PAR1 not really")
    proc = subprocess.run(
        trainer_command(1, "--episodes", str(episodes), "--out", str(tmp_path / "ok"),
                        "--max-steps", "3", "--width", "32", "--quiet"),
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0 and "skipping" in proc.stderr and "broken.parquet" in proc.stderr
    missing = subprocess.run(
        trainer_command(1, "--episodes", str(tmp_path / "nope"), "--out", str(tmp_path / "x")),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert missing.returncode != 0 and "does not exist" in missing.stderr
    config = json.loads(
        (tmp_path / "ok" / versions.resolve(tmp_path / "ok").name / ckpt.CONFIG).read_text()
    )
    assert config["format"] == ckpt.FORMAT
    latest = versions.resolve(tmp_path / "ok")
    (latest / ckpt.CONFIG).write_text(json.dumps({**config, "format": "someone-else/3"}))
    incompatible = subprocess.run(
        trainer_command(1, "--episodes", str(episodes), "--out", str(tmp_path / "ok"), "--max-steps", "3"),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert incompatible.returncode != 0 and "cannot continue" in incompatible.stderr
    assert versions.version_names(tmp_path / "ok") == [latest.name]  # nothing published was lost


def test_the_regression_head_learns_low_level_actions(tmp_path):
    """Episodes with no menu and a teacher's actions (as a low-level env records them)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 2)).astype(np.float32)
    for e in range(12):
        writer = EpisodeWriter(tmp_path, {"backend": "oracle"})
        book = EpisodeBook("test/Reach-v0", writer, idle_timeout_s=30)
        for t in range(20):
            state = rng.normal(size=3).astype(np.float32)
            obs = Observation("robot", f"ep{e}", t, "reach", state=state)
            decision = Decision(action=np.tanh(state @ w), decided_by="oracle")
            book.record(DecideRequest(t, obs), DecisionReply(t, f"ep{e}", t, decision, "o", "0"))
        book.end(EndEpisode(0, "robot", f"ep{e}", 0.0, False, True, None))
        writer.close()
    summary = trainer(
        "--episodes", str(tmp_path), "--out", str(tmp_path / "ckpt"), "--no-image",
        "--max-steps", "300", "--width", "32", "--lr", "3e-3",
    )  # fmt: skip
    model, version = ckpt.load(tmp_path / "ckpt")
    assert version.features.action_dim == 2 and summary["steps"] == 300
    from agent.student.inference import TorchStudent

    states = rng.normal(size=(64, 3)).astype(np.float32)
    obs = [Observation("r", "e", 0, "reach", state=s) for s in states]
    predicted = np.stack([d.action for d in TorchStudent(model, version.name).decide(obs)])
    target = np.tanh(states @ w)
    assert np.mean((predicted - target) ** 2) < 0.25 * np.mean(target**2)


def test_the_trainer_runs_as_a_module_with_help():
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "--follow" in proc.stdout and "--sync" in proc.stdout
