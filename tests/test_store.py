"""Episode files: the previous format still reads, bad files are clear errors, `follow`."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from agent.messages import Decision, Observation
from agent.store import (
    FORMAT_VERSION,
    V2_COLUMNS,
    V3_COLUMNS,
    EpisodeError,
    Step,
    episode_table,
    follow,
    iter_episodes,
    read_episode,
    write_episode,
)

pytestmark = pytest.mark.timeout(120)
DATA = Path(__file__).parent / "data"


def table(episode_id: str, steps: int, image_side: int = 8) -> pa.Table:
    rows = [
        Step(
            Observation(
                "robot",
                episode_id,
                t,
                "go",
                {"image": np.full((image_side, image_side, 3), t % 256, np.uint8)},
                np.full(3, t, np.float32),
                ["a"],
            ),
            Decision(skill_index=0, skill="a"),
            time.time(),
        )
        for t in range(steps)
    ]
    return episode_table(rows, {"episode_id": episode_id, "env_id": "test/Null-v0"})


def test_format_1_episodes_still_read():
    """tests/data/episode_v1.parquet was recorded by a real server before format 2."""
    episode = read_episode(DATA / "episode_v1.parquet")
    assert episode.meta["format_version"] == 1 and FORMAT_VERSION == 3
    assert episode.meta["env_id"] == "tabletop/PickPlace-v0" and episode.success
    assert episode.images().shape == (len(episode), 224, 224, 3)
    assert episode.skill_indices().min() >= 0
    for name in (*V2_COLUMNS, *V3_COLUMNS):  # the new columns read as nulls
        assert episode.column(name) == [None] * len(episode)
    assert episode.meta["seed"] is None and episode.meta["task"] is None


def test_format_2_episodes_still_read():
    """tests/data/episode_v2.parquet: an oracle episode recorded by a real server of format 2."""
    episode = read_episode(DATA / "episode_v2.parquet")
    assert episode.meta["format_version"] == 2 and episode.meta["seed"] == 70
    assert episode.column("teacher_reasoning") == [None] * len(episode)
    steps = episode.steps()
    assert [s.decision.decided_by for s in steps] == ["oracle"] * len(episode)
    assert all(s.decision.reasoning for s in steps)  # the oracle's rationale, in `reasoning`
    assert steps[-1].observation.history == [s.decision.skill for s in steps[:-1]]


def test_bad_files_are_clear_errors(tmp_path):
    pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
    with pytest.raises(EpisodeError, match="not an episode file"):
        read_episode(tmp_path / "other.parquet")
    good = tmp_path / "good.parquet"
    write_episode(table("good", 5), good)
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(EpisodeError, match="not a readable Parquet file"):
        read_episode(truncated)
    future = table("future", 2)
    meta = dict(future.schema.metadata)
    meta[b"embodied_agent.episode"] = b'{"format_version": 99, "episode_id": "future"}'
    pq.write_table(future.replace_schema_metadata(meta), tmp_path / "future.parquet")
    with pytest.raises(EpisodeError, match="format 99 is not supported"):
        read_episode(tmp_path / "future.parquet")
    skipped = []
    episodes = list(iter_episodes(tmp_path, on_error=lambda path, exc: skipped.append(path.name)))
    assert [e.episode_id for e in episodes] == ["good"]
    assert sorted(skipped) == ["future.parquet", "other.parquet", "truncated.parquet"]


def test_follow_waits_for_the_directory_and_yields_each_episode_once(tmp_path):
    directory = tmp_path / "not-yet"
    stop = threading.Event()

    def writer():
        time.sleep(0.3)
        directory.mkdir()
        for i in range(6):
            write_episode(table(f"ep{i}", 3 + i), directory / f"ep{i}.parquet")
            time.sleep(0.05)

    thread = threading.Thread(target=writer)
    thread.start()
    seen = []
    for episode in follow(directory, poll_s=0.05, stop=stop, idle_timeout_s=5):
        seen.append(episode.episode_id)
        assert len(episode) == episode.meta["steps"]
        if len(seen) == 6:
            stop.set()
    thread.join(10)
    assert sorted(seen) == [f"ep{i}" for i in range(6)]


def test_follow_never_yields_part_of_an_episode_from_a_killed_writer(tmp_path):
    """A writer process is SIGKILLed while writing large episodes; follow sees only whole ones."""
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from test_store import table
        from agent.store import write_episode
        out = Path({str(tmp_path)!r})
        for i in range(10_000):
            write_episode(table(f"ep{{i:05d}}", 40, image_side=96), out / f"ep{{i:05d}}.parquet")
            print(i, flush=True)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    seen = []
    try:
        stop = threading.Event()
        for episode in follow(tmp_path, poll_s=0.01, stop=stop, idle_timeout_s=30):
            seen.append(episode)
            if len(seen) == 5:
                os.killpg(proc.pid, signal.SIGKILL)  # mid-write of a later episode
                stop.set()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    names = [e.episode_id for e in seen]
    assert len(names) == len(set(names)) == 5  # each episode once
    # whatever the kill left behind (a temp file in .tmp/) is never read as an episode
    after = list(follow(tmp_path, poll_s=0.01, idle_timeout_s=0.2))
    assert set(names) <= {e.episode_id for e in after}
    for episode in seen + after:
        assert len(episode) == episode.meta["steps"] == 40
        assert episode.images().shape == (40, 96, 96, 3)
