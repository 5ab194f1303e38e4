"""The scripted expert: next skill, a one-sentence rationale and the low-level action.

A pure, stateless function of the SIM-ONLY privileged state (numpy + stdlib
only, no mujoco): every bit of progress is read off the state, so the runtime
can call it on the server with the `sim` dict a simulated robot sent.
`as_decision` turns its answer into the runtime's `Decision` (used by the
`oracle` backend), and `OraclePolicy` runs it locally in the rollout loop.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.messages import Decision
from envs import skills, tasks

ABOVE_TOL = 0.012
REQUIRED_KEYS = frozenset({"ee", "gripper", "held", "objects", "goal"})
MAX_OBJECTS = 32
MAX_COORDINATE = 1e3  # metres; anything beyond is not a tabletop scene
_NAME = re.compile(r"[a-z0-9][a-z0-9 _-]{0,47}")


@dataclass
class OracleDecision:
    """The oracle's answer. `skill_index` is -1 when no option menu was given."""

    skill_index: int
    skill: str
    rationale: str
    action: np.ndarray  # shape (4,), float32


def decide(privileged: Mapping[str, Any], options: Sequence[str]) -> OracleDecision:
    """Pick the next skill from `options` (or just the action when `options` is empty)."""
    check_privileged(privileged)
    skill, rationale = next_skill(privileged)
    action, _ = skills.skill_action(skills.parse_skill(skill), privileged)
    if not options:
        return OracleDecision(-1, skill, rationale, action.astype(np.float32))
    menu = [o.strip().lower() for o in options]
    if skill not in menu:
        raise ValueError(
            f"the oracle's next skill {skill!r} is not among the options {list(options)}"
        )
    return OracleDecision(
        menu.index(skill), options[menu.index(skill)], rationale, action.astype(np.float32)
    )


def check_privileged(priv: Any) -> None:
    """Refuse a malformed privileged state with a clear ValueError, before any maths on it.

    The dict crosses the wire from a robot (`Observation.sim`), so every key,
    kind, shape, number and name the oracle reads is checked here; the
    messages name the field, never echo the value.
    """
    if not isinstance(priv, Mapping):
        raise ValueError(f"privileged state must be a map, got {type(priv).__name__}")
    missing = REQUIRED_KEYS - set(k for k in priv if isinstance(k, str))
    if missing:
        raise ValueError(f"privileged state lacks {sorted(missing)} (is it from a tabletop env?)")
    _vector(priv["ee"], "sim.ee")
    _number(priv["gripper"], "sim.gripper")
    objects = priv["objects"]
    if not isinstance(objects, Mapping) or not 0 < len(objects) <= MAX_OBJECTS:
        raise ValueError(f"sim.objects must be a map of 1..{MAX_OBJECTS} objects")
    for name, obj in objects.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError("sim.objects keys must be short lowercase names like 'red cube'")
        if not isinstance(obj, Mapping):
            raise ValueError(f"sim.objects[{name!r}] must be a map")
        kind = obj.get("kind")
        if not isinstance(kind, str) or kind not in tasks.HALF_SIZE:
            raise ValueError(f"sim.objects[{name!r}].kind must be one of {sorted(tasks.HALF_SIZE)}")
        _vector(obj.get("pos"), f"sim.objects[{name!r}].pos")
        _number(obj.get("half"), f"sim.objects[{name!r}].half")
    held = priv["held"]
    if held is not None and not (isinstance(held, str) and (held == "" or held in objects)):
        raise ValueError("sim.held must be empty or the name of an object in sim.objects")
    goal = priv["goal"]
    pairs = goal.get("pairs") if isinstance(goal, Mapping) else None
    if not isinstance(pairs, list) or len(pairs) > MAX_OBJECTS:
        raise ValueError(f"sim.goal must be a map with a list of <= {MAX_OBJECTS} pairs")
    for pair in pairs:
        if not (
            isinstance(pair, list | tuple)
            and len(pair) == 2
            and all(isinstance(n, str) and n in objects for n in pair)
        ):
            raise ValueError("sim.goal.pairs must be [object, destination] names of sim.objects")


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number, got {type(value).__name__}")
    if not abs(value) <= MAX_COORDINATE:  # also refuses NaN
        raise ValueError(f"{what} must be finite and within +-{MAX_COORDINATE}")
    return float(value)


def _vector(value: Any, what: str) -> None:
    vector = isinstance(value, list | tuple) or (isinstance(value, np.ndarray) and value.ndim == 1)
    if not vector or len(value) != 3:
        raise ValueError(f"{what} must be 3 numbers (x, y, z)")
    for v in value:
        _number(v.item() if isinstance(v, np.generic) else v, what)


def next_skill(priv: Mapping[str, Any]) -> tuple[str, str]:
    """(skill sentence, rationale) for the goal pair to work on (`current_goal`)."""
    todo = tasks.pending(priv)
    held = priv["held"]
    if not todo:
        if held:
            return skills.OPEN, f"The task is done, so release the {held}."
        return skills.LIFT, "The task is already done, so just move the gripper up and clear."
    obj, dest = current_goal(priv, todo)
    if priv["objects"][obj]["kind"] == "block":
        return _push_step(priv, obj, dest)
    return _pick_place_step(priv, obj, dest)


def current_goal(priv: Mapping[str, Any], todo: Sequence[tuple[str, str]]) -> tuple[str, str]:
    """The pending goal pair to work on now.

    The first pending pair, unless the gripper already holds, or hovers open
    right above, the object of another pair that can be done now (its
    destination is not itself waiting to be placed, nothing is on the object or
    in the way at the destination): then that one. On the oracle's own path
    the two agree (it only ever holds or hovers above its first pair's object),
    but where a student started on another cube the oracle carries on with it
    instead of undoing it, so its labels (DAgger's) depend on what a student
    can see rather than on the hidden order of the goal list.
    """
    held = priv["held"]
    started: set[str] = {held} if held else set()
    if not held and float(priv["gripper"]) >= skills.OPEN_WIDTH:
        ee = np.asarray(priv["ee"], dtype=float)[:2]
        started = {
            o
            for o, _ in todo
            if np.linalg.norm(np.asarray(priv["objects"][o]["pos"], dtype=float)[:2] - ee)
            < ABOVE_TOL
        }
    waiting = {o for o, _ in todo}
    for o, d in todo:
        if (
            o in started
            and priv["objects"][o]["kind"] == "cube"
            and d not in waiting
            and not tasks.cubes_above(priv, o)
            and not tasks.occupants(priv, d, o)
        ):
            return o, d
    return todo[0]


def _pick_place_step(priv: Mapping[str, Any], obj: str, dest: str) -> tuple[str, str]:
    held, ee = priv["held"], np.asarray(priv["ee"], dtype=float)
    blockers = tasks.cubes_above(priv, obj) + tasks.occupants(priv, dest, obj)
    if held and (held != obj or blockers):
        return skills.PLACE_ON_TABLE, f"The {held} is in the way, so set it down on a free spot."
    if held:
        dest_xy = np.asarray(priv["objects"][dest]["pos"], dtype=float)[:2]
        far = np.linalg.norm(dest_xy - ee[:2]) > ABOVE_TOL
        if far and ee[2] < skills.HOVER_Z - 0.03:
            return skills.LIFT, f"The {obj} is grasped, so lift it clear of the table first."
        return skills.place_sentence(dest), f"The {obj} is lifted, so put it at the {dest}."
    if float(priv["gripper"]) < skills.OPEN_WIDTH:
        return (
            skills.OPEN,
            f"The gripper is closed on nothing, so open it before going for the {obj}.",
        )
    target = blockers[0] if blockers else obj
    why = (
        f"the {target} is in the way of the {obj}"
        if blockers
        else f"the {obj} still has to go to the {dest}"
    )
    target_xy = np.asarray(priv["objects"][target]["pos"], dtype=float)[:2]
    if np.linalg.norm(target_xy - ee[:2]) < ABOVE_TOL:
        return skills.GRASP, f"The gripper is right above the {target} and {why}, so grasp it."
    return (
        f"move above the {target}",
        f"{why[0].upper()}{why[1:]}, so move above the {target} first.",
    )


def _push_step(priv: Mapping[str, Any], block: str, target: str) -> tuple[str, str]:
    if skills.push_aligned(priv, block, target):
        return (
            f"push the {block} to the {target}",
            f"The gripper is behind the {block}, so push it onto the {target}.",
        )
    return (
        f"move behind the {block} toward the {target}",
        f"The {block} is off the {target}, so get behind it on the line to the target.",
    )


def as_decision(answer: OracleDecision) -> Decision:
    """The runtime's `Decision` for an oracle answer (no skill when no menu was given)."""
    picked = answer.skill_index >= 0
    return Decision(
        action=np.asarray(answer.action, np.float32),
        skill_index=answer.skill_index if picked else None,
        skill=answer.skill if picked else None,
        reasoning=answer.rationale,
        decided_by="oracle",
    )


class OraclePolicy:
    """The oracle as a rollout-loop `Policy`, in process (reads the env's SIM-ONLY state)."""

    model_version = "0"

    def start_episode(self, env: Any, episode_id: str, seed: int | None) -> None:
        pass

    def decide(self, env: Any, obs: Any, info: dict[str, Any], **_: Any) -> Decision:
        return as_decision(decide(env.unwrapped.privileged_state(), info.get("options", [])))

    def end_episode(self, **_: Any) -> None:
        pass
