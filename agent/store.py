"""Episode files: one Parquet file per finished episode; the format, atomic writes, readers.

A leaf module (pyarrow, numpy, the wire types and `agent.files`), shared by
the server's recorder (`agent.recording`, which writes with `episode_table`)
and the learners and exporter (which read with `iter_episodes` or, as
episodes keep arriving, `follow`, and get the recorded steps back with
`Episode.steps()`, the inverse of `episode_table`). Files are written to
`DIR/.tmp/`, fsynced and renamed into `DIR`, so a reader sees a whole
episode or none of it, even after SIGKILL. Never pickled. Format:
docs/episodes.md.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from agent.files import write_atomically
from agent.messages import Decision, Observation, TeacherLabel

FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
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
        # format 2: who acted, and the teacher's label for the step
        ("decided_by", pa.string()),
        ("confidence", pa.float32()),
        ("teacher_skill_index", pa.int32()),
        ("teacher_skill", pa.string()),
        ("teacher_action", pa.list_(pa.float32())),
        ("teacher_model", pa.string()),
        # format 3: the teacher's rationale (what the Cosmos-Reason post-trainer thinks in <think>)
        ("teacher_reasoning", pa.string()),
    ]
)
V2_COLUMNS = SCHEMA.names[
    SCHEMA.get_field_index("decided_by") : SCHEMA.get_field_index("teacher_model") + 1
]
V3_COLUMNS = ("teacher_reasoning",)
ADDED_IN = {2: V2_COLUMNS, 3: V3_COLUMNS}  # columns a file of an older format lacks
SUMMARY_DEFAULTS = {"seed": None, "task": None}  # format-2 summary fields a v1 file lacks


class EpisodeError(ValueError):
    """A file that is not a readable episode (corrupt, truncated, foreign, or too new)."""


@dataclass
class Step:
    """One decision as it is recorded."""

    observation: Observation
    decision: Decision
    time: float
    reward: float | None = None  # earned by this decision (reported later by the robot)
    timing: dict[str, float] | None = None
    model_id: str = ""
    model_version: str = ""


def _floats(values: Any) -> np.ndarray | None:
    return None if values is None else np.asarray(values, np.float32).reshape(-1)


def _row(step: Step) -> dict[str, Any]:
    obs, dec, timing = step.observation, step.decision, step.timing or {}
    teacher = dec.teacher.decision if dec.teacher else None
    return {
        "episode_id": obs.episode_id,
        "robot_id": obs.robot_id,
        "step": obs.step,
        "time": step.time,
        "instruction": obs.instruction,
        "options": obs.options,
        "state": obs.state,
        "images": [
            {"name": k, "height": v.shape[0], "width": v.shape[1], "data": v.tobytes()}
            for k, v in obs.images.items()
        ],
        "action": _floats(dec.action),
        "skill_index": dec.skill_index,
        "skill": dec.skill,
        "point": None if dec.point is None else list(dec.point),
        "reasoning": dec.reasoning,
        "reward": step.reward,
        "terminated": False,
        "truncated": False,
        "queue_ms": timing.get("queue_ms"),
        "inference_ms": timing.get("inference_ms"),
        "batch_size": timing.get("batch_size"),
        "model_id": step.model_id,
        "model_version": step.model_version,
        "decided_by": dec.decided_by,
        "confidence": dec.confidence,
        "teacher_skill_index": None if teacher is None else teacher.skill_index,
        "teacher_skill": None if teacher is None else teacher.skill,
        "teacher_action": None if teacher is None else _floats(teacher.action),
        "teacher_model": dec.teacher.model if dec.teacher else None,
        "teacher_reasoning": None if teacher is None else teacher.reasoning,
    }


def episode_table(steps: Sequence[Step], summary: dict[str, Any]) -> pa.Table:
    """Arrow table of a finished episode (steps in order); `summary` goes into the metadata.

    `summary` holds what the recorder knows (ids, env, end reason, success,
    `terminated`/`truncated`, seed, task, ...); the step counts, the total
    reward and the format version are added here. `terminated`/`truncated`
    are set on the last row only.
    """
    rows = [_row(step) for step in steps]
    if rows:
        rows[-1]["terminated"] = bool(summary.get("terminated"))
        rows[-1]["truncated"] = bool(summary.get("truncated"))
    cols = {name: [row[name] for row in rows] for name in SCHEMA.names}
    rewards = [r for r in cols["reward"] if r is not None]
    meta = {
        **SUMMARY_DEFAULTS,
        **summary,
        "format_version": FORMAT_VERSION,
        "steps": len(rows),
        "first_step": cols["step"][0] if rows else None,
        "total_reward": float(sum(rewards)),
    }
    table = pa.Table.from_pydict(cols, schema=SCHEMA)
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})


def write_episode(table: pa.Table, path: Path) -> None:
    """Write `table` to `path` (through `DIR/.tmp/`) so that readers never see a partial file."""
    write_atomically(
        path,
        lambda tmp: pq.write_table(table, tmp, compression="zstd"),
        tmp_dir=path.parent / TMP_DIRNAME,
    )


def remove_stale_tmp(directory: Path) -> None:
    """Temporary files left by a killed writer are never episodes; clear them."""
    for stale in (directory / TMP_DIRNAME).glob("*.tmp"):
        stale.unlink(missing_ok=True)


def free_path(directory: Path, episode_id: str) -> Path:
    """`DIR/<episode_id>.parquet`, or `<episode_id>.<n>.parquet` if that name is taken.

    Only safe with one writer per directory (the recorder's thread).
    """
    name, n = f"{episode_id}.parquet", 1
    while (directory / name).exists():
        name, n = f"{episode_id}.{n}.parquet", n + 1
    return directory / name


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
            frames.append(_image(match, self.path))
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

    def steps(self) -> list[Step]:
        """The recorded steps as they were written (the inverse of `episode_table`).

        Each observation's `history` is rebuilt as the server filled it: the
        skills executed before it in this episode (a point decision's skill is
        its `move_to_pixel` sentence). The robot's SIM-ONLY state is never
        recorded, so `sim` is None. EpisodeError for a row that cannot be one.
        """
        cols = self.table.to_pydict()
        history: list[str] = []
        steps = []
        for t in range(len(self)):
            row = {name: values[t] for name, values in cols.items()}
            state = row["state"]
            obs = Observation(
                row["robot_id"] or "",
                row["episode_id"] or self.episode_id,
                row["step"] if row["step"] is not None else t,
                row["instruction"] or "",
                {im["name"]: _image(im, self.path) for im in row["images"] or []},
                None if state is None else np.asarray(state, np.float32),
                list(row["options"] or []),
                history=list(history),
            )
            decision = _decision(row)
            steps.append(
                Step(
                    obs,
                    decision,
                    row["time"],
                    row["reward"],
                    {
                        k: row[k]
                        for k in ("queue_ms", "inference_ms", "batch_size")
                        if row[k] is not None
                    },
                    row["model_id"] or "",
                    row["model_version"] or "",
                )
            )
            if decision.sentence is not None:
                history.append(decision.sentence)
        return steps


def _image(struct: dict[str, Any], path: Path) -> np.ndarray:
    """A recorded frame (its Arrow struct) as an (H, W, 3) uint8 array: the one image decoder."""
    data, height, width = struct.get("data"), struct.get("height"), struct.get("width")
    if not isinstance(data, bytes) or not isinstance(height, int) or not isinstance(width, int):
        raise EpisodeError(f"{path}: an image of the episode is incomplete")
    if height <= 0 or width <= 0 or len(data) != height * width * 3:
        raise EpisodeError(
            f"{path}: image {struct.get('name')!r} claims {height}x{width}x3 but holds "
            f"{len(data)} bytes"
        )
    return np.frombuffer(data, np.uint8).reshape(height, width, 3)


def _floats_or_none(values: Any) -> np.ndarray | None:
    return None if values is None else np.asarray(values, np.float32)


def _decision(row: dict[str, Any]) -> Decision:
    """A recorded row's decision, with its teacher label where the row has one."""
    teacher = None
    if row["teacher_skill_index"] is not None or row["teacher_action"] is not None:
        label = Decision(
            action=_floats_or_none(row["teacher_action"]),
            skill_index=row["teacher_skill_index"],
            skill=row["teacher_skill"],
            reasoning=row["teacher_reasoning"],
        )
        teacher = TeacherLabel(label, row["teacher_model"] or "")
    point = row["point"]
    return Decision(
        action=_floats_or_none(row["action"]),
        skill_index=row["skill_index"],
        skill=row["skill"],
        point=None if point is None else (float(point[0]), float(point[1])),
        reasoning=row["reasoning"],
        decided_by=row["decided_by"],
        confidence=row["confidence"],
        teacher=teacher,
        model_version=row["model_version"],
    )


def read_episode(path: str | Path) -> Episode:
    """Load one episode file (never unpickles anything); EpisodeError if it is not one.

    Files of older formats read too: the columns added since come back as nulls.
    """
    path = Path(path)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise EpisodeError(f"{path}: not a readable Parquet file ({exc})") from exc
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise EpisodeError(f"{path} is not an episode file (no {METADATA_KEY.decode()} metadata)")
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise EpisodeError(f"{path}: episode summary is not JSON ({exc})") from exc
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version not in READABLE_VERSIONS:
        raise EpisodeError(
            f"{path}: episode format {version!r} is not supported (this reader "
            f"reads {list(READABLE_VERSIONS)}); upgrade embodied-agent to read it"
        )
    for added, names in ADDED_IN.items():
        if version < added:
            for name in names:
                field = SCHEMA.field(name)
                table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    meta = {**SUMMARY_DEFAULTS, **meta}
    missing = [name for name in SCHEMA.names if name not in table.column_names]
    if missing:
        raise EpisodeError(f"{path}: episode file lacks the columns {missing}")
    return Episode(path, meta, table)


def read_summary(path: str | Path) -> dict[str, Any]:
    """An episode's summary only (the file's footer, no rows); EpisodeError if it has none."""
    path = Path(path)
    try:
        metadata = pq.read_schema(path).metadata or {}
        meta = json.loads(metadata[METADATA_KEY])
    except (OSError, pa.ArrowException, KeyError, ValueError) as exc:
        raise EpisodeError(f"{path}: no readable episode summary ({exc})") from exc
    return {**SUMMARY_DEFAULTS, **meta}


def episode_paths(directory: str | Path) -> list[Path]:
    """Finished episode files under `directory`, subdirectories included (e.g. one per env).

    Hidden names (the writers' `.tmp/`) are skipped, so temporary files are never listed.
    """
    root = Path(directory)
    return sorted(
        p
        for p in root.rglob("*.parquet")
        if not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


OnError = Callable[[Path, EpisodeError], None]


def iter_episodes(directory: str | Path, on_error: OnError | None = None) -> Iterator[Episode]:
    """Every episode in `directory`, by file name; a bad file raises, or goes to `on_error`."""
    for path in episode_paths(directory):
        try:
            yield read_episode(path)
        except EpisodeError as exc:
            if on_error is None:
                raise
            on_error(path, exc)


def follow(
    directory: str | Path,
    *,
    poll_s: float = 0.5,
    stop: threading.Event | None = None,
    idle_timeout_s: float | None = None,
    on_error: OnError | None = None,
) -> Iterator[Episode]:
    """Yield each finished episode under `directory` once, as it appears, until told to stop.

    Episodes already there come first. A directory that does not exist yet is
    waited for. Files appear only by an atomic rename, so a partial episode
    (a writer killed mid-write) is never seen. Stops when `stop` is set, or
    after `idle_timeout_s` without a new episode; runs forever otherwise.
    A bad file is reported to `on_error` (or logged) once and skipped.
    """
    seen: set[Path] = set()
    last_new = time.monotonic()
    while True:
        fresh = [p for p in episode_paths(directory) if p not in seen]
        for path in fresh:
            if stop is not None and stop.is_set():
                return
            seen.add(path)
            try:
                episode = read_episode(path)
            except EpisodeError as exc:
                if on_error is None:
                    log.warning("skipping %s", exc)
                else:
                    on_error(path, exc)
                continue
            last_new = time.monotonic()
            yield episode
        if stop is not None and stop.is_set():
            return
        if idle_timeout_s is not None and time.monotonic() - last_new >= idle_timeout_s:
            return
        if stop is not None:
            stop.wait(poll_s)
        else:
            time.sleep(poll_s)
