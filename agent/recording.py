"""Episodes on disk: one Parquet file per finished episode, written atomically.

The server appends steps to an `EpisodeBuffer` (cheap: it keeps references)
and hands finished episodes to an `EpisodeWriter`, whose background thread
turns them into Arrow tables and writes `DIR/<episode_id>.parquet` via a
temporary file in `DIR/.tmp/`, fsync and `os.replace`. A reader therefore sees
either a whole episode or none of it, even after SIGKILL. The trainer reads
episodes with `read_episode` / `iter_episodes`. Format: docs/episodes.md.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from agent.backends.base import Decision, Observation

FORMAT_VERSION = 1
METADATA_KEY = b"embodied_agent.episode"
TMP_DIRNAME = ".tmp"
log = logging.getLogger(__name__)

_IMAGE = pa.struct(
    [("name", pa.string()), ("height", pa.int32()), ("width", pa.int32()), ("data", pa.binary())]
)
SCHEMA = pa.schema(
    [
        ("episode_id", pa.string()),
        ("robot_id", pa.string()),
        ("step", pa.int32()),
        ("time", pa.float64()),
        ("instruction", pa.string()),
        ("options", pa.list_(pa.string())),
        ("state", pa.list_(pa.float32())),
        ("images", pa.list_(_IMAGE)),
        ("action", pa.list_(pa.float32())),
        ("skill_index", pa.int32()),
        ("skill", pa.string()),
        ("point", pa.list_(pa.float32())),
        ("reasoning", pa.string()),
        ("reward", pa.float64()),
        ("terminated", pa.bool_()),
        ("truncated", pa.bool_()),
        ("queue_ms", pa.float32()),
        ("inference_ms", pa.float32()),
        ("batch_size", pa.int32()),
        ("model_id", pa.string()),
        ("model_version", pa.string()),
    ]
)


@dataclass
class EpisodeBuffer:
    """Steps of one episode still in progress (server side, single-threaded)."""

    episode_id: str
    robot_id: str
    env_id: str
    started_at: float = field(default_factory=time.time)
    rows: dict[int, dict[str, Any]] = field(default_factory=dict)  # step -> row
    last_step: int | None = None

    def add_step(
        self,
        obs: Observation,
        decision: Decision,
        timing: dict[str, float],
        model_id: str,
        model_version: str,
    ) -> None:
        """Record a decision; a repeated step (client retry) replaces the earlier one."""
        self.rows[obs.step] = {
            "obs": obs,
            "decision": decision,
            "time": time.time(),
            "reward": None,
            "timing": timing,
            "model_id": model_id,
            "model_version": model_version,
        }
        self.last_step = obs.step

    def set_reward(self, step: int, reward: float | None) -> None:
        """Attach the reward a decision earned (reported with the robot's next message)."""
        if reward is not None and step in self.rows:
            self.rows[step]["reward"] = reward

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class EpisodeEnd:
    """How an episode finished."""

    reason: str  # "end" (robot said so), "idle_timeout", "shutdown", "too_long"
    terminated: bool = False
    truncated: bool = True
    success: bool | None = None


def episode_table(buf: EpisodeBuffer, end: EpisodeEnd, extra: dict[str, Any]) -> pa.Table:
    """Arrow table of a finished episode, its summary in the schema metadata."""
    steps = sorted(buf.rows)
    cols: dict[str, list] = {name: [] for name in SCHEMA.names}
    for i, step in enumerate(steps):
        row = buf.rows[step]
        obs: Observation = row["obs"]
        dec: Decision = row["decision"]
        last = i == len(steps) - 1
        values = {
            "episode_id": buf.episode_id,
            "robot_id": buf.robot_id,
            "step": step,
            "time": row["time"],
            "instruction": obs.instruction,
            "options": obs.options,
            "state": obs.state,
            "images": [
                {"name": k, "height": v.shape[0], "width": v.shape[1], "data": v.tobytes()}
                for k, v in obs.images.items()
            ],
            "action": None if dec.action is None else np.asarray(dec.action, np.float32),
            "skill_index": dec.skill_index,
            "skill": dec.skill,
            "point": None if dec.point is None else list(dec.point),
            "reasoning": dec.reasoning,
            "reward": row["reward"],
            "terminated": last and end.terminated,
            "truncated": last and end.truncated,
            "queue_ms": row["timing"].get("queue_ms"),
            "inference_ms": row["timing"].get("inference_ms"),
            "batch_size": row["timing"].get("batch_size"),
            "model_id": row["model_id"],
            "model_version": row["model_version"],
        }
        for name, value in values.items():
            cols[name].append(value)
    rewards = [r for r in cols["reward"] if r is not None]
    summary = {
        "format_version": FORMAT_VERSION,
        "episode_id": buf.episode_id,
        "robot_id": buf.robot_id,
        "env_id": buf.env_id,
        "steps": len(steps),
        "first_step": steps[0] if steps else None,
        "total_reward": float(sum(rewards)),
        "success": end.success,
        "terminated": end.terminated,
        "truncated": end.truncated,
        "end_reason": end.reason,
        "started_at": buf.started_at,
        "ended_at": time.time(),
        **extra,
    }
    table = pa.Table.from_pydict(cols, schema=SCHEMA)
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(summary).encode()})


def write_atomically(table: pa.Table, path: Path) -> None:
    """Write `table` to `path` so that readers never see a partial file."""
    tmp_dir = path.parent / TMP_DIRNAME
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        pq.write_table(table, tmp, compression="zstd")
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class EpisodeWriter:
    """Writes finished episodes in a background thread so the decision loop never blocks on disk.

    `submit` is cheap and thread-safe; `close` writes everything submitted, then returns.
    """

    def __init__(self, directory: str | Path, extra_metadata: dict[str, Any] | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_stale_tmp()
        self._extra = dict(extra_metadata or {})
        self._queue: queue.Queue[tuple[EpisodeBuffer, EpisodeEnd] | None] = queue.Queue()
        self.written = 0  # episodes written so far
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="episode-writer", daemon=True)
        self._thread.start()

    def _remove_stale_tmp(self) -> None:
        """Temporary files left by a killed server are never episodes; clear them."""
        for stale in (self.directory / TMP_DIRNAME).glob("*.tmp"):
            stale.unlink(missing_ok=True)

    def submit(self, buf: EpisodeBuffer, end: EpisodeEnd) -> None:
        if len(buf):
            self._queue.put((buf, end))

    def _path_for(self, episode_id: str) -> Path:
        """A free file name (only this thread creates files here, so checking is enough)."""
        name, n = f"{episode_id}.parquet", 1
        while (self.directory / name).exists():
            name, n = f"{episode_id}.{n}.parquet", n + 1
        return self.directory / name

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            buf, end = item
            try:
                path = self._path_for(buf.episode_id)
                write_atomically(episode_table(buf, end, self._extra), path)
                self.written += 1
            except Exception:
                self.failures += 1
                log.exception("could not record episode %s", buf.episode_id)

    def close(self, timeout: float | None = 60.0) -> None:
        """Flush every submitted episode and stop the thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)


# --------------------------------------------------------------------------- reading


@dataclass
class Episode:
    """One recorded episode: its summary (`meta`) and its steps (`table`)."""

    path: Path
    meta: dict[str, Any]
    table: pa.Table

    @property
    def episode_id(self) -> str:
        return self.meta["episode_id"]

    @property
    def success(self) -> bool | None:
        return self.meta.get("success")

    def __len__(self) -> int:
        return self.table.num_rows

    def column(self, name: str) -> list[Any]:
        return self.table.column(name).to_pylist()

    def states(self) -> np.ndarray:
        """(T, D) float32 states; raises ValueError if a step has none."""
        values = self.column("state")
        if any(v is None for v in values):
            raise ValueError(f"episode {self.episode_id} has steps without state")
        return np.asarray(values, dtype=np.float32).reshape(len(values), -1)

    def images(self, name: str = "image") -> np.ndarray:
        """(T, H, W, 3) uint8 frames of camera `name`; KeyError if a step lacks it."""
        frames = []
        for step_images in self.column("images"):
            match = next((im for im in step_images if im["name"] == name), None)
            if match is None:
                raise KeyError(f"episode {self.episode_id} has a step without image {name!r}")
            frames.append(
                np.frombuffer(match["data"], np.uint8).reshape(match["height"], match["width"], 3)
            )
        return np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8)

    def actions(self) -> np.ndarray:
        """(T, A) float32 low-level actions; raises ValueError if a step has none."""
        values = self.column("action")
        if any(v is None for v in values):
            raise ValueError(f"episode {self.episode_id} has steps without a low-level action")
        return np.asarray(values, dtype=np.float32).reshape(len(values), -1)

    def skill_indices(self) -> np.ndarray:
        """(T,) int64 chosen skill per step, -1 where the decision picked none."""
        return np.array([-1 if v is None else v for v in self.column("skill_index")], np.int64)

    def rewards(self) -> np.ndarray:
        """(T,) float32 rewards; NaN where the robot never reported one."""
        return np.array([np.nan if v is None else v for v in self.column("reward")], np.float32)


def read_episode(path: str | Path) -> Episode:
    """Load one episode file (never unpickles anything)."""
    path = Path(path)
    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"{path} is not an episode file (no {METADATA_KEY.decode()} metadata)")
    meta = json.loads(raw)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: episode format {meta.get('format_version')} is not "
            f"supported (expected {FORMAT_VERSION})"
        )
    return Episode(path, meta, table)


def episode_paths(directory: str | Path) -> list[Path]:
    """Finished episode files in `directory` (temporary files are never listed)."""
    return sorted(p for p in Path(directory).glob("*.parquet") if not p.name.startswith("."))


def iter_episodes(directory: str | Path) -> Iterator[Episode]:
    for path in episode_paths(directory):
        yield read_episode(path)
