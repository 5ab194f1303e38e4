"""Pinhole camera geometry for MuJoCo cameras (pure numpy).

Conventions: intrinsics `K` in pixels; extrinsics are the 4x4 world-to-camera
transform in the OpenCV frame (x right, y down, z forward). Image points for
Cosmos-Reason2 are normalised to 0..1000 in both axes (x right, y down).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_MJ_TO_CV = np.diag([1.0, -1.0, -1.0])  # MuJoCo cameras look along -z with y up


@dataclass(frozen=True)
class CameraModel:
    """A fixed camera: image size, vertical field of view, pose in the world."""

    width: int
    height: int
    fovy_deg: float
    position: np.ndarray  # (3,) world position
    rotation: np.ndarray  # (3, 3) MuJoCo camera frame -> world (columns are its axes)

    @property
    def intrinsics(self) -> np.ndarray:
        f = 0.5 * self.height / np.tan(np.deg2rad(self.fovy_deg) / 2)
        return np.array([[f, 0.0, self.width / 2], [0.0, f, self.height / 2], [0.0, 0.0, 1.0]])

    @property
    def extrinsics(self) -> np.ndarray:
        rot_cv = self.rotation @ _MJ_TO_CV  # OpenCV camera frame -> world
        out = np.eye(4)
        out[:3, :3] = rot_cv.T
        out[:3, 3] = -rot_cv.T @ self.position
        return out

    def project(self, points: np.ndarray) -> np.ndarray:
        """World points (..., 3) -> pixel coordinates (..., 2); NaN behind the camera."""
        pts = np.asarray(points, dtype=float)
        ext = self.extrinsics
        cam = pts @ ext[:3, :3].T + ext[:3, 3]
        with np.errstate(divide="ignore", invalid="ignore"):
            pix = (cam / cam[..., 2:3]) @ self.intrinsics.T
        return np.where(cam[..., 2:3] > 0, pix[..., :2], np.nan)

    def to_normalized(self, pixels: np.ndarray) -> np.ndarray:
        return np.asarray(pixels, dtype=float) * 1000.0 / np.array([self.width, self.height])

    def from_normalized(self, points: np.ndarray) -> np.ndarray:
        return np.asarray(points, dtype=float) * np.array([self.width, self.height]) / 1000.0

    def backproject_to_plane(self, pixel: np.ndarray, plane_z: float = 0.0) -> np.ndarray:
        """Pixel (2,) -> the world point (3,) where its ray meets the plane z = plane_z."""
        u, v = np.asarray(pixel, dtype=float)
        ray_cam = np.linalg.solve(self.intrinsics, np.array([u, v, 1.0]))
        ray = (self.rotation @ _MJ_TO_CV) @ ray_cam
        if abs(ray[2]) < 1e-9 or (plane_z - self.position[2]) / ray[2] <= 0:
            raise ValueError(f"pixel {u:.1f},{v:.1f} does not look at the plane z={plane_z}")
        return self.position + ray * (plane_z - self.position[2]) / ray[2]
