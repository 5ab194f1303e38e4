"""Pure task definitions: layouts, instructions and goal checks.

Every task is a list of (object, destination) pairs, e.g. ("red cube",
"green pad"). Goal checks read only the privileged-state dict, so the env,
the skill layer and the oracle agree on what "done" means. numpy + stdlib only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from envs.skills import WORKSPACE_X, WORKSPACE_Y
from envs.tabletop.scene import (
    BIN_FLOOR,
    BIN_HALF,
    BLOCK_HALF,
    CUBE_HALF,
    PAD_HALF,
    TARGET_RADIUS,
    SceneSpec,
)

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.1),
    "green": (0.1, 0.7, 0.2),
    "blue": (0.12, 0.3, 0.9),
    "yellow": (0.95, 0.85, 0.1),
    "purple": (0.55, 0.2, 0.75),
    "orange": (1.0, 0.5, 0.05),
}
HALF_SIZE = {
    "cube": CUBE_HALF,
    "block": BLOCK_HALF,
    "pad": PAD_HALF,
    "bin": BIN_HALF + 0.005,
    "target": TARGET_RADIUS,
}
PUSH_TOLERANCE = 0.03
REACH = 0.62  # horizontal reach of the gripper at push height, from the arm base

INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "pick_place": (
        "put the {o0} on the {d0}",
        "place the {o0} onto the {d0}",
        "pick up the {o0} and put it on the {d0}",
        "move the {o0} to the {d0}",
    ),
    "stack": (
        "stack the {o0} on the {d0}, then the {o1} on the {o0}",
        "build a tower: the {d0} at the bottom, then the {o0}, then the {o1} on top",
        "put the {o0} on the {d0} and the {o1} on top of the {o0}",
    ),
    "sort": (
        "sort the cubes into the bins of the same colour",
        "put each cube into the bin with its colour",
        "place every cube in the matching coloured bin",
    ),
    "push": (
        "push the {o0} to the {d0}",
        "slide the {o0} onto the {d0}",
        "move the {o0} to the {d0} by pushing it",
    ),
}


@dataclass(frozen=True)
class Task:
    """What a task needs from the scene."""

    name: str
    scene: SceneSpec


TASKS: dict[str, Task] = {
    "pick_place": Task("pick_place", SceneSpec(cubes=3, pads=3)),
    "stack": Task("stack", SceneSpec(cubes=3)),
    "sort": Task("sort", SceneSpec(cubes=3, bins=3)),
    "push": Task("push", SceneSpec(blocks=1, targets=2)),
}


@dataclass
class Layout:
    """One episode's randomised scene: colours, xy positions, goal and wording."""

    colors: dict[str, str]  # body name -> colour name
    positions: dict[str, tuple[float, float]]  # body name -> table xy
    pairs: list[tuple[str, str]]  # (object body, destination body), in order
    instruction: str


def display_name(kind: str, color: str) -> str:
    return f"{color} {kind}"


def sample_layout(task: str, names: Mapping[str, list[str]], rng: np.random.Generator) -> Layout:
    """Colours, non-overlapping positions, goal pairs and instruction for one seed."""
    palette = list(COLORS)
    colors: dict[str, str] = {}
    for kind in ("cube", "block"):
        picked = rng.choice(palette, size=len(names[kind]), replace=False)
        colors.update(zip(names[kind], map(str, picked), strict=True))
    if task == "sort":
        bin_colors = rng.permutation([colors[c] for c in names["cube"]])
        colors.update(zip(names["bin"], map(str, bin_colors), strict=True))
    for kind in ("pad", "target"):
        picked = rng.choice(palette, size=len(names[kind]), replace=False)
        colors.update(zip(names[kind], map(str, picked), strict=True))

    if task == "sort":
        pairs = [
            (c, next(b for b in names["bin"] if colors[b] == colors[c])) for c in names["cube"]
        ]
    elif task == "stack":
        bottom, middle, top = names["cube"]
        pairs = [(middle, bottom), (top, middle)]
    elif task == "push":
        pairs = [(names["block"][0], names["target"][0])]
    else:
        pairs = [(names["cube"][0], names["pad"][0])]

    positions = _sample_positions(task, names, rng)
    label = {n: display_name(kind, colors[n]) for kind, ns in names.items() for n in ns}
    fields = {f"o{i}": label[o] for i, (o, _) in enumerate(pairs)}
    fields.update({f"d{i}": label[d] for i, (_, d) in enumerate(pairs)})
    template = INSTRUCTIONS[task][int(rng.integers(len(INSTRUCTIONS[task])))]
    return Layout(colors, positions, pairs, template.format(**fields))


def _sample_positions(
    task: str, names: Mapping[str, list[str]], rng: np.random.Generator
) -> dict[str, tuple[float, float]]:
    """Rejection-sample xy positions with clearance between all objects."""
    order = [n for kind in ("bin", "pad", "target", "block", "cube") for n in names[kind]]
    kinds = {n: kind for kind, ns in names.items() for n in ns}
    for _ in range(1000):
        placed: dict[str, tuple[float, float]] = {}
        for name in order:
            for _ in range(200):
                xy = (float(rng.uniform(*WORKSPACE_X)), float(rng.uniform(*WORKSPACE_Y)))
                if all(
                    np.hypot(xy[0] - p[0], xy[1] - p[1]) > _clearance(kinds[name], kinds[other])
                    for other, p in placed.items()
                ):
                    placed[name] = xy
                    break
            else:
                break
        if len(placed) == len(order) and (task != "push" or _push_ok(placed, names)):
            return placed
    raise RuntimeError(f"could not place the objects of task {task!r}")


def _clearance(a: str, b: str) -> float:
    # Room for the open gripper between objects (cubes stacked on bins never start there).
    return HALF_SIZE[a] * 1.42 + HALF_SIZE[b] * 1.42 + 0.05


def _push_ok(placed: Mapping[str, tuple[float, float]], names: Mapping[str, list[str]]) -> bool:
    """The goal target is a short push away, and the distractor is off the push line."""
    block = np.array(placed[names["block"][0]])
    goal = np.array(placed[names["target"][0]])
    dist = float(np.linalg.norm(goal - block))
    if not 0.1 <= dist <= 0.22:
        return False
    behind = block - (goal - block) / dist * (BLOCK_HALF + 0.04)
    in_reach = max(np.hypot(*block), np.hypot(*goal)) <= REACH - 0.04
    return bool(in_reach and behind[0] >= 0.28 and np.hypot(*behind) <= REACH)


# --- goal checks on the privileged state -------------------------------------


def placed(priv: Mapping[str, Any], obj: str, dest: str) -> bool:
    """Whether object `obj` (display name) rests at destination `dest`."""
    objects = priv["objects"]
    (ox, oy, oz), (dx, dy, dz) = objects[obj]["pos"], objects[dest]["pos"]
    kind, half = objects[dest]["kind"], objects[obj]["half"]
    ex, ey = abs(ox - dx), abs(oy - dy)
    if kind == "pad":
        return max(ex, ey) < PAD_HALF - 0.01 and oz < half + 0.01
    if kind == "cube":
        on_top = abs(oz - (dz + objects[dest]["half"] + half)) < 0.01
        return math.hypot(ex, ey) < 0.02 and on_top
    if kind == "bin":
        return max(ex, ey) < BIN_HALF and oz < BIN_FLOOR + half + 0.015
    if kind == "target":
        return math.hypot(ex, ey) < PUSH_TOLERANCE
    raise ValueError(f"unknown destination kind {kind!r}")


def cubes_above(priv: Mapping[str, Any], name: str) -> list[str]:
    """Cubes stacked on top of object `name`, topmost first."""
    objects = priv["objects"]
    x, y, z = objects[name]["pos"]
    above = [
        (c, o["pos"][2])
        for c, o in objects.items()
        if o["kind"] == "cube"
        and c != name
        and math.hypot(o["pos"][0] - x, o["pos"][1] - y) < 0.03
        and o["pos"][2] > z + 0.01
    ]
    return [c for c, _ in sorted(above, key=lambda item: -item[1])]


def occupants(priv: Mapping[str, Any], dest: str, obj: str) -> list[str]:
    """Cubes other than `obj` that are in the way at destination `dest`, topmost first."""
    objects = priv["objects"]
    if objects[dest]["kind"] == "cube":
        return cubes_above(priv, dest)
    if objects[dest]["kind"] not in ("pad", "bin"):
        return []
    x, y, _ = objects[dest]["pos"]
    reach = HALF_SIZE[objects[dest]["kind"]] + CUBE_HALF
    welcome = {o for o, d in priv["goal"]["pairs"] if d == dest and placed(priv, o, dest)}
    inside = [
        (c, o["pos"][2])
        for c, o in objects.items()
        if o["kind"] == "cube"
        and c != obj
        and c not in welcome
        and max(abs(o["pos"][0] - x), abs(o["pos"][1] - y)) < reach
    ]
    return [c for c, _ in sorted(inside, key=lambda item: -item[1])]


def pending(priv: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Goal pairs not yet achieved, in the order they should be done."""
    return [(o, d) for o, d in priv["goal"]["pairs"] if not placed(priv, o, d)]


def is_success(priv: Mapping[str, Any]) -> bool:
    return not priv["held"] and not pending(priv)


def progress(priv: Mapping[str, Any]) -> tuple[bool, float]:
    """(success, dense shaping distance): gripper-to-object plus object-to-destination."""
    todo = pending(priv)
    objects, total = priv["objects"], 0.0
    for i, (o, d) in enumerate(todo):
        op = objects[o]["pos"]
        total += math.dist(op[:2], objects[d]["pos"][:2])
        if i == 0 and priv["held"] != o:
            total += math.dist(priv["ee"], op)
    return not todo and not priv["held"], total
