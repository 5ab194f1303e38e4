"""The one version format (agent.versions) and VersionedBackend, on a model family of their own.

Nothing here is the student: a toy family whose versions are a JSON file in a
subfolder shows the format and the hot-reloading backend are generic (the
next family, Cosmos-Reason's `save_pretrained` folders, needs no change).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from agent import labels, versions
from agent.backends import BACKENDS, EnvInfo
from agent.backends.base import BackendError, BadObservation
from agent.backends.versioned import VersionedBackend
from agent.files import sha256, write_atomically
from agent.messages import Decision, Observation

ENV = EnvInfo("toy/Menu-v0", has_skills=True)


def write_toy(pick: int):
    def write(directory: Path, name: str) -> None:
        (directory / "weights").mkdir()
        (directory / "weights" / "pick.json").write_text(json.dumps({"pick": pick, "name": name}))
        (directory / "config.json").write_text("{}")

    return write


def test_a_version_holds_any_files_and_is_verified_before_use(tmp_path):
    first = versions.publish(tmp_path, write_toy(0), kind="toy", step=3, args={"lr": 0.1})
    assert first.name == "v000001" and versions.latest_name(tmp_path) == "v000001"
    version = versions.read(tmp_path, kind="toy")
    assert version.kind == "toy" and version.manifest["step"] == 3
    assert version.manifest["args"] == {"lr": 0.1}
    assert set(version.files) == {"weights/pick.json", "config.json"}  # subfolders too
    assert json.loads((version.path / "weights" / "pick.json").read_text())["name"] == "v000001"
    with pytest.raises(versions.VersionError, match="holds a 'toy' model, not a 'student'"):
        versions.read(tmp_path, kind="student")
    (first / "weights" / "pick.json").write_text('{"pick": 1}')
    with pytest.raises(versions.VersionError, match="does not match its sha256"):
        versions.read(first)
    for _ in range(3):
        versions.publish(tmp_path, write_toy(1), kind="toy", step=4, keep=2)
    assert versions.version_names(tmp_path) == ["v000003", "v000004"]
    assert not (tmp_path / versions.TMP).exists() or not list((tmp_path / versions.TMP).iterdir())


@pytest.mark.parametrize(
    "entry", ["../outside.json", "weights/../../outside.json", "/etc/passwd", "manifest.json", ""]
)
def test_a_manifest_that_names_a_path_outside_its_version_is_refused(tmp_path, entry):
    path = versions.publish(tmp_path, write_toy(0), kind="toy", step=0)
    (tmp_path / "outside.json").write_text("{}")
    manifest = json.loads((path / versions.MANIFEST).read_text())
    manifest["files"] = {entry: sha256(tmp_path / "outside.json")}
    (path / versions.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(versions.VersionError, match="not a file inside it"):
        versions.read(path)


def test_a_linked_file_is_refused(tmp_path):
    path = versions.publish(tmp_path, write_toy(0), kind="toy", step=0)
    target = path / "config.json"
    os.replace(target, tmp_path / "real.json")
    target.symlink_to(tmp_path / "real.json")  # same bytes, but from outside the version
    with pytest.raises(versions.VersionError, match="missing"):
        versions.read(path)


def test_versions_written_before_kinds_still_read(tmp_path):
    path = versions.publish(tmp_path, write_toy(0), kind="toy", step=0)
    manifest = json.loads((path / versions.MANIFEST).read_text())
    for key in ("kind", "format", "args"):
        del manifest[key]
    (path / versions.MANIFEST).write_text(json.dumps(manifest))
    assert versions.read(tmp_path, kind="toy").kind is None


def test_an_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.txt"
    write_atomically(target, lambda tmp: tmp.write_text("old"))

    def fails(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, fails)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


# --------------------------------------------------------------------------- a versioned backend


@dataclass
class ToyModel:
    """A loaded toy version: always picks option `pick`."""

    pick: int
    model_version: str

    def check(self, obs: Observation) -> None:
        if len(obs.options) <= self.pick:
            raise ValueError(f"needs more than {self.pick} options")

    def decide(self, observations):
        return [Decision(skill_index=self.pick, skill=o.options[self.pick]) for o in observations]


class ToyBackend(VersionedBackend):
    name = "toy"
    extra = "sim"  # installed here; the base checks the extra before anything is loaded
    model_help = "ROOT"

    def newest(self) -> str | None:
        return versions.latest_name(self.model)

    def load(self, key: str) -> ToyModel:
        version = versions.read(Path(self.model) / key, kind="toy")
        pick = json.loads((version.path / "weights" / "pick.json").read_text())["pick"]
        return ToyModel(pick, version.name)


def obs(episode: str, options=("a", "b", "c")) -> Observation:
    return Observation("r", episode, 0, "go", {}, np.zeros(2, np.float32), list(options))


def test_a_versioned_backend_serves_reloads_refuses_and_pins_any_family(tmp_path):
    versions.publish(tmp_path, write_toy(0), kind="toy", step=0)
    backend = ToyBackend(ENV, str(tmp_path), swap_at="episode")
    assert backend.model_version == "v000001" and backend.load_version() is None
    (first,) = backend.decide([obs("old")])
    assert first.skill_index == 0 and first.model_version == "v000001"

    versions.publish(tmp_path, write_toy(1), kind="toy", step=1)
    backend.swap(backend.load_version())
    old, new = backend.decide([obs("old"), obs("new")])  # "old" stays on its first version
    assert (old.skill_index, old.model_version) == (0, "v000001")
    assert (new.skill_index, new.model_version) == (1, "v000002")

    bad = versions.publish(tmp_path, write_toy(2), kind="toy", step=2)
    (bad / "config.json").write_text("tampered")
    with pytest.raises(BackendError, match=r"refused.*sha256"):
        backend.load_version()
    assert backend.load_version() is None  # refused once, never retried
    with pytest.raises(BadObservation, match="the model cannot take this observation"):
        backend.check(obs("short", options=("a",)))
    stats = backend.stats()
    assert stats["versions_loaded"] == 2 and stats["versions_refused"] == 1
    assert stats["version"] == "v000002" and "v000003" in stats["refused"]
    assert stats["pinned_episodes"] == 2 and stats["decisions"] == 3


def test_a_versioned_backend_with_nothing_to_serve_says_so(tmp_path):
    with pytest.raises(BackendError, match="holds no version to serve"):
        ToyBackend(ENV, str(tmp_path))
    with pytest.raises(BackendError, match="needs --model ROOT"):
        ToyBackend(ENV, None)


def test_every_teacher_named_in_the_label_contract_is_a_registered_backend():
    assert set(BACKENDS) >= labels.TEACHERS
    assert labels.is_teacher(labels.acted("cosmos", escalated=True), None)
    assert labels.is_teacher(labels.acted("oracle", escalated=False), "policy")
    assert labels.is_teacher("oracle", None) and not labels.is_teacher("policy", "oracle")
    assert labels.is_teacher(None, "oracle") and not labels.is_teacher(None, "policy")
