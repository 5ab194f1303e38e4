"""Builds the MJCF of a task scene: the shipped arm and table plus task objects.

Object placement and colours are not baked in: the env moves bodies and
recolours geoms at reset, so one compiled model serves every seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

CUBE_HALF = 0.02
BLOCK_HALF = 0.025
PAD_HALF = 0.045
BIN_HALF = 0.06  # inner half width
BIN_FLOOR = 0.004  # floor thickness (its top is the resting height)
BIN_WALL = 0.028  # wall height above the table
TARGET_RADIUS = 0.035


@dataclass(frozen=True)
class SceneSpec:
    """How many of each object kind a task needs."""

    cubes: int = 0
    pads: int = 0
    bins: int = 0
    blocks: int = 0
    targets: int = 0


def _cube(name: str) -> str:
    return (
        f'<body name="{name}" pos="0.4 0 {CUBE_HALF}"><freejoint name="{name}"/>'
        f'<geom name="{name}" class="object" type="box" size="{CUBE_HALF} {CUBE_HALF} {CUBE_HALF}"'
        ' mass="0.05"/></body>'
    )


def _block(name: str) -> str:
    return (
        f'<body name="{name}" pos="0.4 0 {BLOCK_HALF}"><freejoint name="{name}"/>'
        f'<geom name="{name}" class="object" type="box" friction="0.5 0.02 0.001"'
        f' size="{BLOCK_HALF} {BLOCK_HALF} {BLOCK_HALF}" mass="0.1"/></body>'
    )


def _pad(name: str) -> str:
    return (
        f'<body name="{name}" pos="0.4 0 0"><geom name="{name}" type="box"'
        f' size="{PAD_HALF} {PAD_HALF} 0.0015" pos="0 0 0.0015"/></body>'
    )


def _target(name: str) -> str:
    return (
        f'<body name="{name}" pos="0.4 0 0"><geom name="{name}" type="cylinder"'
        f' size="{TARGET_RADIUS} 0.0015" pos="0 0 0.0015"/></body>'
    )


def _bin(name: str) -> str:
    out = BIN_HALF + 0.005
    wall = 'class="object" type="box" contype="1" conaffinity="1"'
    half_h = BIN_WALL / 2
    return (
        f'<body name="{name}" pos="0.4 0 0">'
        f'<geom name="{name}" {wall} size="{out} {out} {BIN_FLOOR / 2}" pos="0 0 {BIN_FLOOR / 2}"/>'
        f'<geom name="{name}_n" {wall} size="{out} 0.005 {half_h}" pos="0 {out} {half_h}"/>'
        f'<geom name="{name}_s" {wall} size="{out} 0.005 {half_h}" pos="0 {-out} {half_h}"/>'
        f'<geom name="{name}_e" {wall} size="0.005 {out} {half_h}" pos="{out} 0 {half_h}"/>'
        f'<geom name="{name}_w" {wall} size="0.005 {out} {half_h}" pos="{-out} 0 {half_h}"/>'
        "</body>"
    )


def object_names(spec: SceneSpec) -> dict[str, list[str]]:
    """Body names per kind, e.g. {"cube": ["cube0", "cube1"], ...}."""
    counts = {
        "cube": spec.cubes,
        "pad": spec.pads,
        "bin": spec.bins,
        "block": spec.blocks,
        "target": spec.targets,
    }
    return {kind: [f"{kind}{i}" for i in range(n)] for kind, n in counts.items()}


def scene_xml(spec: SceneSpec) -> str:
    """The arm asset with the task's objects appended to the world."""
    base = resources.files("envs").joinpath("assets/tabletop.xml").read_text()
    builders = {"cube": _cube, "pad": _pad, "bin": _bin, "block": _block, "target": _target}
    bodies = [builders[kind](name) for kind, names in object_names(spec).items() for name in names]
    return base.replace("</worldbody>", "\n".join(bodies) + "\n</worldbody>", 1)
