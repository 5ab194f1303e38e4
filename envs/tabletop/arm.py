"""Differential inverse kinematics for the tabletop arm.

Damped least squares on MuJoCo's site Jacobian: one 6x6 solve per control
step, all buffers preallocated, so control stays cheap next to the physics.
"""

from __future__ import annotations

import mujoco
import numpy as np

ARM_JOINTS = ("j1", "j2", "j3", "j4", "j5", "j6")
FINGER_JOINTS = ("finger_left", "finger_right")
GRIPPER_MAX = 0.045  # finger travel per side (m); the opening is twice this
DAMPING = 0.04  # DLS damping: trades tracking accuracy for robustness near singularities
ORIENTATION_GAIN = 0.5


class ArmIK:
    """Maps an end-effector position target to joint position targets.

    The hand keeps pointing straight down with the fingers opening along the
    world y axis (the hand frame aligned with the world frame).
    """

    def __init__(self, model: mujoco.MjModel) -> None:
        self.model = model
        self.site = model.site("ee").id
        self.dofs = np.array([model.joint(j).dofadr[0] for j in ARM_JOINTS])
        self.qadr = np.array([model.joint(j).qposadr[0] for j in ARM_JOINTS])
        # The arm's dofs are contiguous (first in the tree): slices avoid fancy-index copies.
        if not np.array_equal(self.dofs, np.arange(self.dofs[0], self.dofs[0] + 6)):
            raise ValueError("the arm joints must be consecutive single-dof joints")
        self._dof_slice = slice(int(self.dofs[0]), int(self.dofs[0]) + 6)
        self._jacp = np.zeros((3, model.nv))
        self._jacr = np.zeros((3, model.nv))
        self._jac = np.zeros((6, 6))
        self._err = np.zeros(6)
        self._damp = (DAMPING**2) * np.eye(6)
        self.low = model.jnt_range[[model.joint(j).id for j in ARM_JOINTS], 0]
        self.high = model.jnt_range[[model.joint(j).id for j in ARM_JOINTS], 1]

    def joint_targets(self, data: mujoco.MjData, target: np.ndarray) -> np.ndarray:
        """Joint positions one DLS step closer to `target` with the hand pointing down."""
        mujoco.mj_jacSite(self.model, data, self._jacp, self._jacr, self.site)
        jac, err = self._jac, self._err
        jac[:3] = self._jacp[:, self._dof_slice]
        jac[3:] = self._jacr[:, self._dof_slice]
        np.subtract(target, data.site_xpos[self.site], out=err[:3])
        # Orientation error towards the identity (hand frame = world frame); xmat is row-major.
        m = data.site_xmat[self.site]
        err[3] = ORIENTATION_GAIN * (m[5] - m[7])
        err[4] = ORIENTATION_GAIN * (m[6] - m[2])
        err[5] = ORIENTATION_GAIN * (m[1] - m[3])
        dq = jac.T @ np.linalg.solve(jac @ jac.T + self._damp, err)
        return np.clip(data.qpos[self.qadr] + dq, self.low, self.high)

    def solve(self, data: mujoco.MjData, target: np.ndarray, iters: int = 200) -> np.ndarray:
        """Kinematic IK by repeated DLS steps (no physics): for home poses."""
        for _ in range(iters):
            data.qpos[self.qadr] = self.joint_targets(data, target)
            mujoco.mj_kinematics(self.model, data)
            mujoco.mj_comPos(self.model, data)
        return data.qpos[self.qadr].copy()
