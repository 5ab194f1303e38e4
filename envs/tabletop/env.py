"""The tabletop robot env: a low-level gymnasium env with a language skill executor.

Low-level action: Box(4) = end-effector delta xyz (x MAX_DELTA metres) + gripper
(+1 open, -1 close). Cameras render only when an observation is built, and
the skill executor renders once per skill, not per physics step.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, ClassVar

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium import spaces

from envs import skills, tasks
from envs.camera import CameraModel
from envs.tabletop.arm import FINGER_JOINTS, GRIPPER_MAX, ArmIK
from envs.tabletop.scene import CUBE_HALF, object_names, scene_xml

HOME = np.array([0.4, 0.0, skills.HOVER_Z])
EE_LOW = np.array([0.15, -0.42, 0.012])
EE_HIGH = np.array([0.75, 0.42, 0.4])
STATE_DIM = 16  # arm qpos (6), arm qvel (6), gripper site xyz (3), gripper opening (1)
STATE_BOUND = 10.0  # loose finite bound; joint speeds are clipped to it
SUCCESS_BONUS = 10.0
MAX_IMAGE = 1024  # the MJCF's offscreen buffer size
SKILL_TIMEOUT = 80  # low-level steps before a skill gives up
INSTRUCTION_CHARSET = string.ascii_letters + string.digits + " ,.:;'-()"
STATIC_KINDS = ("pad", "bin", "target")


@dataclass
class SkillResult:
    """What executing one skill did."""

    reward: float
    terminated: bool
    steps: int
    completed: bool  # False when the skill timed out


class TabletopEnv(gym.Env):
    """One tabletop task (pick_place, stack, sort, push) with a 6-joint arm."""

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self,
        task: str = "pick_place",
        image_size: int | tuple[int, int] = 224,
        wrist_camera: bool = False,
        images: bool = True,
        frame_skip: int = 20,
        render_mode: str | None = None,
    ) -> None:
        if task not in tasks.TASKS:
            raise ValueError(f"unknown task {task!r}; choose from {sorted(tasks.TASKS)}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.task = task
        self.height, self.width = (
            (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        )
        if not (1 <= self.height <= MAX_IMAGE and 1 <= self.width <= MAX_IMAGE):
            raise ValueError(f"image_size must be within 1..{MAX_IMAGE}, got {image_size!r}")
        if frame_skip < 1:
            raise ValueError(f"frame_skip must be >= 1, got {frame_skip}")
        self.cameras = (("image", "scene"), ("wrist_image", "wrist"))[: 1 + wrist_camera]
        self.images = images
        self.frame_skip = frame_skip
        self.render_mode = render_mode
        self._names = object_names(tasks.TASKS[task].scene)
        self.model = mujoco.MjModel.from_xml_string(scene_xml(tasks.TASKS[task].scene))
        control_hz = 1.0 / (self.model.opt.timestep * frame_skip)
        self.metadata = {**self.metadata, "render_fps": round(control_hz)}  # one frame a step
        self.data = mujoco.MjData(self.model)
        self.arm = ArmIK(self.model)
        self._home_q = self._solve_home()
        self._site = self.arm.site
        self._finger_q = self.model.joint(FINGER_JOINTS[0]).qposadr[0]
        self._body_id = {n: self.model.body(n).id for ns in self._names.values() for n in ns}
        self._graspable = {self._body_id[n]: n for n in self._names["cube"]}
        self._renderer: mujoco.Renderer | None = None
        self._labels: dict[str, str] = {}
        self._pairs: list[list[str]] = []
        self.instruction = ""
        mujoco.mj_forward(self.model, self.data)
        self._priv = self.privileged_state()  # replaced by every reset
        self._success = False

        obs: dict[str, spaces.Space] = {}
        if images:
            for key, _ in self.cameras:
                obs[key] = spaces.Box(0, 255, (self.height, self.width, 3), np.uint8)
        obs["state"] = spaces.Box(-STATE_BOUND, STATE_BOUND, (STATE_DIM,), np.float32)
        obs["instruction"] = spaces.Text(max_length=200, charset=INSTRUCTION_CHARSET)
        self.observation_space = spaces.Dict(obs)
        self.action_space = spaces.Box(-1.0, 1.0, (4,), np.float32)

    # --- gymnasium API ------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        layout = tasks.sample_layout(self.task, self._names, self.np_random)
        model, data = self.model, self.data
        mujoco.mj_resetData(model, data)
        self._labels = {}
        for kind, names in self._names.items():
            for name in names:
                color = layout.colors[name]
                self._labels[name] = tasks.display_name(kind, color)
                body = self._body_id[name]
                start, count = model.body_geomadr[body], model.body_geomnum[body]
                model.geom_rgba[start : start + count] = (*tasks.COLORS[color], 1.0)
                x, y = layout.positions[name]
                if kind in STATIC_KINDS:
                    model.body_pos[body, :2] = (x, y)
                else:
                    adr = model.jnt_qposadr[model.body_jntadr[body]]
                    data.qpos[adr : adr + 2] = (x, y)
        self._pairs = [[self._labels[o], self._labels[d]] for o, d in layout.pairs]
        self.instruction = layout.instruction
        data.qpos[self.arm.qadr] = self._home_q
        data.ctrl[:6] = self._home_q
        data.qpos[self._finger_q : self._finger_q + 2] = GRIPPER_MAX
        data.ctrl[6] = GRIPPER_MAX
        mujoco.mj_forward(model, data)
        self._priv = self.privileged_state()
        self._success = tasks.is_success(self._priv)
        return self.observation(), self.info()

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (4,) or not np.all(np.isfinite(action)):
            raise ValueError(
                f"action must be 4 finite numbers (dx, dy, dz, gripper), got {action.tolist()!r}"
            )
        reward, success = self._advance(action)
        return self.observation(), reward, success, False, self.info()

    def render(self):
        if self.render_mode == "rgb_array":
            return self._render("scene")
        return None

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

    # --- contract extras ----------------------------------------------------

    def skill_options(self) -> list[str]:
        """The currently sensible next skills as short sentences."""
        return skills.options(self._priv)

    def privileged_state(self) -> dict[str, Any]:
        """SIM-ONLY ground truth for the oracle (msgpack-friendly: lists, floats, str)."""
        data = self.data
        objects = {}
        for kind, names in self._names.items():
            for name in names:
                label = self._labels.get(name, name)
                objects[label] = {
                    "kind": kind,
                    "color": label.split(" ")[0],
                    "pos": data.xpos[self._body_id[name]].tolist(),
                    "half": tasks.HALF_SIZE[kind],
                }
        return {
            "task": self.task,
            "ee": data.site_xpos[self._site].tolist(),
            "gripper": float(2 * data.qpos[self._finger_q]),
            "held": self._held(),
            "objects": objects,
            "goal": {"pairs": [list(p) for p in self._pairs]},
        }

    def camera_model(self, camera: str = "scene") -> CameraModel:
        """Intrinsics/extrinsics of a camera at the configured image size."""
        cam = self.model.camera(camera).id
        return CameraModel(
            self.width,
            self.height,
            float(self.model.cam_fovy[cam]),
            self.data.cam_xpos[cam].copy(),
            self.data.cam_xmat[cam].reshape(3, 3).copy(),
        )

    def point_to_table(self, x: float, y: float) -> np.ndarray:
        """A scene-camera point normalised to 0..1000 -> the world point on the table."""
        if not (0 <= x <= 1000 and 0 <= y <= 1000):
            raise ValueError(f"point ({x}, {y}) is outside the 0..1000 image range")
        cam = self.camera_model("scene")
        return cam.backproject_to_plane(cam.from_normalized(np.array([x, y])), plane_z=0.0)

    def execute_skill(self, skill: str, point: tuple[float, float] | None = None) -> SkillResult:
        """Run a skill sentence (or move_to_pixel for `point`) until done or timeout."""
        parsed = skills.parse_skill(skills.point_skill(*point) if point is not None else skill)
        objects = self._priv["objects"]
        for name in (parsed.target, parsed.goal):
            if name and name != skills.TABLE and name not in objects:
                raise ValueError(f"no {name!r} in this scene; it has {sorted(objects)}")
        target = self.point_to_table(*parsed.point) if parsed.verb == "move_to" else None
        total, success = 0.0, False
        for n in range(SKILL_TIMEOUT + 1):
            action, done = skills.skill_action(parsed, self._priv, target)
            if done or success or n == SKILL_TIMEOUT:
                return SkillResult(total, success, n, done or success)
            reward, success = self._advance(action)
            total += reward
        raise AssertionError("unreachable")

    def observation(self) -> dict[str, Any]:
        """The current observation (renders the cameras)."""
        obs: dict[str, Any] = {}
        if self.images:
            for key, camera in self.cameras:
                obs[key] = self._render(camera)
        obs["state"] = self._state()
        obs["instruction"] = self.instruction
        return obs

    def info(self) -> dict[str, Any]:
        return {
            "is_success": self._success,
            "instruction": self.instruction,
            "options": skills.options(self._priv),
        }

    # --- internals ----------------------------------------------------------

    def _advance(self, action: np.ndarray) -> tuple[float, bool]:
        action = np.clip(action, -1.0, 1.0)
        data = self.data
        target = np.clip(
            data.site_xpos[self._site] + action[:3] * skills.MAX_DELTA, EE_LOW, EE_HIGH
        )
        data.ctrl[:6] = self.arm.joint_targets(data, target)
        data.ctrl[6] = (action[3] + 1.0) * 0.5 * GRIPPER_MAX
        mujoco.mj_step(self.model, data, nstep=self.frame_skip)
        self._priv = priv = self.privileged_state()
        self._success, distance = tasks.progress(priv)
        return -distance + (SUCCESS_BONUS if self._success else 0.0), self._success

    def _held(self) -> str:
        """The cube between the closing fingers, if any.

        Geometric rather than contact-based: contacts flicker while the arm
        moves, the cube's place between the fingers does not.
        """
        data = self.data
        if data.ctrl[6] > 0.5 * GRIPPER_MAX:  # commanded open: holds nothing
            return ""
        width = 2 * data.qpos[self._finger_q]
        ee = data.site_xpos[self._site]
        for body, name in self._graspable.items():
            offset = np.abs(data.xpos[body] - ee)
            if (
                offset[0] < 0.02
                and offset[1] < 0.015
                and offset[2] < 0.025
                and (0.02 < width < 2 * CUBE_HALF + 0.002)
            ):
                return self._labels.get(name, "")
        return ""

    def _state(self) -> np.ndarray:
        d = self.data
        state = np.concatenate(
            [
                d.qpos[self.arm.qadr],
                d.qvel[self.arm.dofs],
                d.site_xpos[self._site],
                [2 * d.qpos[self._finger_q]],
            ],
            dtype=np.float32,
        )
        return np.clip(state, -STATE_BOUND, STATE_BOUND, out=state)

    def _render(self, camera: str) -> np.ndarray:
        if self._renderer is None:
            self._renderer = mujoco.Renderer(self.model, self.height, self.width)
        self._renderer.update_scene(self.data, camera=camera)
        return self._renderer.render()

    def _solve_home(self) -> np.ndarray:
        scratch = mujoco.MjData(self.model)
        scratch.qpos[self.arm.qadr] = (0.0, 0.3, 1.0, 0.0, -1.3, 0.0)
        mujoco.mj_kinematics(self.model, scratch)
        mujoco.mj_comPos(self.model, scratch)
        return self.arm.solve(scratch, HOME)
