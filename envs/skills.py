"""The language skill layer: skill sentences, the option menu and the executor's controller.

Pure functions of the privileged-state dict (numpy + stdlib only), shared by
the simulator's skill executor and the oracle, so the oracle's low-level
action is exactly what the executor would do next.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.messages import point_sentence
from envs.tabletop.scene import BIN_FLOOR

WORKSPACE_X = (0.33, 0.62)  # where objects start; also where cubes are set down
WORKSPACE_Y = (-0.24, 0.24)

MAX_OPTIONS = 8
MAX_DELTA = 0.05  # metres of end-effector motion per unit low-level action
HOVER_Z = 0.15  # travel height of the gripper site above the table
PUSH_Z = 0.022  # gripper site height while pushing
REACH_TOL = 0.008
OPEN_WIDTH = 0.08  # gripper opening counted as "open"
BEHIND_GAP = 0.035  # clearance between the gripper and a block before a push
PUSH_SPEED = 0.3  # fraction of MAX_DELTA per step while pushing

_SPOTS = np.stack(
    np.meshgrid(np.linspace(*WORKSPACE_X, 10), np.linspace(*WORKSPACE_Y, 17)), axis=-1
).reshape(-1, 2)

GRASP, LIFT, OPEN = "grasp", "lift", "open the gripper"
TABLE = "table"
PLACE_ON_TABLE = "place on the table"  # set the held cube down on a free spot
_PATTERNS = {
    "move_above": re.compile(r"move above the (\w+ \w+)"),
    "place": re.compile(r"place (?:on|in) the (\w+ \w+)"),
    "move_behind": re.compile(r"move behind the (\w+ \w+) toward the (\w+ \w+)"),
    "push": re.compile(r"push the (\w+ \w+) to the (\w+ \w+)"),
    "move_to": re.compile(r"move to the point \((-?[\d.]+), (-?[\d.]+)\)"),
}


@dataclass(frozen=True)
class Skill:
    """A parsed skill sentence."""

    verb: str  # move_above | grasp | lift | place | open | move_behind | push | move_to
    target: str = ""  # object display name, e.g. "red cube"
    goal: str = ""  # push destination, e.g. "green target"
    point: tuple[float, float] = (0.0, 0.0)  # move_to: normalised image point (0..1000)


def parse_skill(text: str) -> Skill:
    """Skill sentence -> Skill; ValueError for anything the executor cannot run."""
    text = text.strip().lower()
    if text in (GRASP, LIFT):
        return Skill(text)
    if text == OPEN:
        return Skill("open")
    if text == PLACE_ON_TABLE:
        return Skill("place", TABLE)
    for verb, pattern in _PATTERNS.items():
        m = pattern.fullmatch(text)
        if m is None:
            continue
        if verb == "move_to":
            return Skill(verb, point=(float(m[1]), float(m[2])))
        return Skill(verb, m[1], m[2] if verb in ("move_behind", "push") else "")
    raise ValueError(f"unknown skill {text!r}")


point_skill = point_sentence  # the wire's sentence for a point decision, parsed below


def place_sentence(dest: str) -> str:
    return f"place in the {dest}" if dest.endswith(" bin") else f"place on the {dest}"


def options(priv: Mapping[str, Any]) -> list[str]:
    """The currently sensible next skills (at most MAX_OPTIONS), right or wrong."""
    objects, held = priv["objects"], priv["held"]
    names = {
        kind: [n for n, o in objects.items() if o["kind"] == kind]
        for kind in ("cube", "pad", "bin", "block", "target")
    }
    if names["block"]:
        menu = [
            f"move behind the {b} toward the {t}" for b in names["block"] for t in names["target"]
        ]
        menu += [f"push the {b} to the {t}" for b in names["block"] for t in names["target"]]
        return [*menu, LIFT][:MAX_OPTIONS]
    if held:
        dests = names["pad"] + names["bin"] + [c for c in names["cube"] if c != held]
        return [LIFT, *(place_sentence(d) for d in dests), PLACE_ON_TABLE, OPEN][:MAX_OPTIONS]
    return [*(f"move above the {c}" for c in names["cube"]), GRASP, OPEN][:MAX_OPTIONS]


# --- the controller ------------------------------------------------------------


def _toward(ee: np.ndarray, target: np.ndarray, grip: float, speed: float = 1.0) -> np.ndarray:
    step = np.clip((target - ee) / MAX_DELTA, -speed, speed)
    return np.array([*step, grip], dtype=np.float32)


def _travel(ee: np.ndarray, xy: np.ndarray, z: float, grip: float) -> tuple[np.ndarray, bool]:
    """Go to (xy, z) via the hover height: up, across, then down."""
    target = np.array([xy[0], xy[1], z])
    far = np.linalg.norm(xy - ee[:2]) > REACH_TOL
    if far and ee[2] < HOVER_Z - 0.03:
        return _toward(ee, np.array([ee[0], ee[1], HOVER_Z]), grip), False
    if far:
        return _toward(ee, np.array([xy[0], xy[1], max(z, HOVER_Z)]), grip), False
    return _toward(ee, target, grip), bool(np.linalg.norm(target - ee) < REACH_TOL)


def behind_point(priv: Mapping[str, Any], block: str, goal: str) -> np.ndarray:
    """Where the gripper waits before pushing `block` toward `goal` (xy)."""
    objects = priv["objects"]
    b = np.asarray(objects[block]["pos"], dtype=float)[:2]
    g = np.asarray(objects[goal]["pos"], dtype=float)[:2]
    u = (g - b) / max(np.linalg.norm(g - b), 1e-6)
    return b - u * (float(objects[block]["half"]) + BEHIND_GAP)


def push_aligned(priv: Mapping[str, Any], block: str, goal: str, tol: float = 0.02) -> bool:
    """Whether the gripper sits low behind the block on the block-goal line."""
    objects = priv["objects"]
    ee = np.asarray(priv["ee"], dtype=float)
    b = np.asarray(objects[block]["pos"], dtype=float)[:2]
    g = np.asarray(objects[goal]["pos"], dtype=float)[:2]
    u = (g - b) / max(np.linalg.norm(g - b), 1e-6)
    rel = ee[:2] - b
    along = float(rel @ u)
    lateral = float(np.linalg.norm(rel - along * u))
    half = float(objects[block]["half"])
    return lateral < tol and -(half + BEHIND_GAP + tol) < along < 0 and ee[2] < PUSH_Z + tol


def skill_action(
    skill: Skill, priv: Mapping[str, Any], point_xyz: np.ndarray | None = None
) -> tuple[np.ndarray, bool]:
    """Next low-level action (Box(4)) for `skill` and whether the skill has finished.

    Stateless: every phase (approach, descend, close, release, retreat) is read
    off the privileged state, so the oracle can call it for any state.
    `point_xyz` is the world target of a `move_to` skill (the env back-projects it).
    """
    ee = np.asarray(priv["ee"], dtype=float)
    held, width, objects = priv["held"], float(priv["gripper"]), priv["objects"]
    carry = -1.0 if held else 1.0
    if skill.verb == "move_to":
        if point_xyz is None:
            raise ValueError("move_to needs the back-projected world point")
        return _travel(ee, np.asarray(point_xyz, dtype=float)[:2], HOVER_Z, carry)
    if skill.verb == "open":
        return _toward(ee, ee, 1.0), width >= OPEN_WIDTH
    if skill.verb == LIFT:
        target = np.array([ee[0], ee[1], HOVER_Z])
        return _toward(ee, target, carry), abs(HOVER_Z - ee[2]) < REACH_TOL
    if skill.verb == "move_above":
        pos = np.asarray(objects[skill.target]["pos"], dtype=float)
        return _travel(ee, pos[:2], HOVER_Z, carry)
    if skill.verb == GRASP:
        return _grasp(ee, held, width, objects)
    if skill.verb == "place":
        return _place(ee, priv, skill.target)
    if skill.verb == "move_behind":
        return _travel(ee, behind_point(priv, skill.target, skill.goal), PUSH_Z, -1.0)
    if skill.verb == "push":
        return _push(ee, priv, skill.target, skill.goal)
    raise ValueError(f"unknown skill verb {skill.verb!r}")


def _grasp(
    ee: np.ndarray, held: str, width: float, objects: Mapping[str, Any]
) -> tuple[np.ndarray, bool]:
    if held:
        return _toward(ee, ee, -1.0), True
    graspable = [o for o in objects.values() if o["kind"] == "cube"]
    # The cube under the gripper; in a stack only the top one can be taken.
    obj = min(graspable, key=lambda o: (round(_xy_dist(o, ee) / 0.03), -float(o["pos"][2])))
    pos = np.asarray(obj["pos"], dtype=float)
    low = abs(ee[2] - pos[2]) < REACH_TOL and float(np.linalg.norm(pos[:2] - ee[:2])) < 0.015
    if not low:  # open, over the cube via the hover height, then straight down
        return _travel(ee, pos[:2], pos[2], 1.0)[0], False
    closed_empty = width < 2 * float(obj["half"]) - 0.006
    return _toward(ee, pos, -1.0), closed_empty


def _xy_dist(obj: Mapping[str, Any], ee: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(obj["pos"], dtype=float)[:2] - ee[:2]))


def _place(ee: np.ndarray, priv: Mapping[str, Any], dest: str) -> tuple[np.ndarray, bool]:
    objects, held, width = priv["objects"], priv["held"], float(priv["gripper"])
    if not held:  # released (or nothing to place): open fully, then retreat upwards
        if width < OPEN_WIDTH - 0.01:
            return _toward(ee, ee, 1.0), False
        target = np.array([ee[0], ee[1], HOVER_Z])
        return _toward(ee, target, 1.0), abs(HOVER_Z - ee[2]) < REACH_TOL
    o = objects[held]
    half = float(o["half"])
    table = {"kind": TABLE, "pos": [*free_spot(priv, held), 0.0]} if dest == TABLE else None
    d = table or objects[dest]
    dpos = np.asarray(d["pos"], dtype=float)
    if d["kind"] == "cube":
        rest = dpos[2] + float(d["half"]) + half + 0.004
    elif d["kind"] == "bin":
        rest = BIN_FLOOR + half + 0.02
    else:
        rest = half + 0.004
    offset = ee[2] - float(np.asarray(o["pos"])[2])  # gripper site above the held centre
    action, arrived = _travel(ee, dpos[:2], rest + offset, -1.0)
    if arrived:
        action[3] = 1.0
    return action, False


def free_spot(priv: Mapping[str, Any], held: str) -> np.ndarray:
    """The workspace point with the most room around it (xy), ignoring the held cube."""
    others = [o for name, o in priv["objects"].items() if name != held]
    centres = np.array([np.asarray(o["pos"], dtype=float)[:2] for o in others])
    radii = np.array([float(o["half"]) * 1.42 for o in others])
    gap = np.linalg.norm(_SPOTS[:, None, :] - centres[None], axis=-1) - radii[None]
    return _SPOTS[int(np.argmax(gap.min(axis=1)))]


def _push(
    ee: np.ndarray, priv: Mapping[str, Any], block: str, goal: str
) -> tuple[np.ndarray, bool]:
    objects = priv["objects"]
    b = np.asarray(objects[block]["pos"], dtype=float)[:2]
    g = np.asarray(objects[goal]["pos"], dtype=float)[:2]
    if np.linalg.norm(g - b) < 0.01 or not push_aligned(priv, block, goal, tol=0.03):
        return _toward(ee, ee, -1.0), True
    u = (g - b) / np.linalg.norm(g - b)
    # Aim just inside the block's back face on the current block-goal line,
    # over-correcting sideways drift so the push goes through the block's centre.
    rel = ee[:2] - b
    lateral = rel - (rel @ u) * u
    aim = b - u * (float(objects[block]["half"]) + 0.005) - lateral
    target = np.array([aim[0], aim[1], PUSH_Z])
    return _toward(ee, target, -1.0, speed=PUSH_SPEED), False
