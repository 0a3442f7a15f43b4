"""Simulated (source, target) pairs of one structure with a known relative pose, for alignment benchmarks.

Each pair is two subtomograms of the same map, each under its own pose and noise, with the missing wedge
fixed in the tomogram frame (as :func:`jimray.simulate.subtomogram.simulate_subtomograms`). The source's
rotation is uniform on SO(3); the relative rotation ``R = R_target R_source^T`` is uniform on SO(3) too, or,
with ``max_relative_angle_degrees < 180``, drawn from the uniform (Haar) distribution restricted to rotation
angles up to that bound (a curriculum of small rotations first, or a local-alignment check). The true pose
carrying the source onto the target is ``compose(invert(pose_source), pose_target)`` in the convention of
:mod:`jimray.conventions`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from jimray.conventions import compose_poses, invert_pose
from jimray.fourier.masks import wedge_masks
from jimray.geometry.rigid import transform_volumes
from jimray.simulate.subtomogram import DEFAULT_MAX_SHIFT_VOXELS, add_noise, apply_fourier_filter


@dataclass
class PairBatch:
    """Pairs ``(b, d, h, w)`` each normalised to zero mean and unit variance, and the true pose carrying the
    source onto the target: ``rotations`` ``(b, 3, 3)``, ``shifts`` ``(b, 3)`` voxels ``(x, y, z)``."""

    source: torch.Tensor
    target: torch.Tensor
    rotations: torch.Tensor
    shifts: torch.Tensor

    def to(self, device) -> PairBatch:
        return PairBatch(*(x.to(device) for x in (self.source, self.target, self.rotations, self.shifts)))


def rotations_within(n: int, max_angle_degrees: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` rotation matrices ``(n, 3, 3)`` from the Haar measure restricted to angles ``<= max_angle_degrees``
    (uniform axis; angle density proportional to ``1 - cos(angle)``); 180 gives uniform SO(3)."""
    if not 0 < max_angle_degrees <= 180:
        raise ValueError(f"max_angle_degrees must lie in (0, 180], got {max_angle_degrees}")
    if max_angle_degrees >= 180:
        return Rotation.random(n, random_state=rng).as_matrix()
    top = math.radians(max_angle_degrees)
    angles = np.empty(0)
    while len(angles) < n:  # rejection sampling of 1 - cos(a) on [0, top]
        a = rng.uniform(0.0, top, 4 * n + 16)
        keep = rng.uniform(0.0, 1.0 - math.cos(top), a.shape) < 1.0 - np.cos(a)
        angles = np.concatenate([angles, a[keep]])
    axes = rng.standard_normal((n, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    return Rotation.from_rotvec(axes * angles[:n, None]).as_matrix()


def _normalise(volumes: torch.Tensor) -> torch.Tensor:
    dims = (-3, -2, -1)
    return (volumes - volumes.mean(dim=dims, keepdim=True)) / volumes.std(dim=dims, keepdim=True).clamp_min(1e-6)


def simulate_pairs(
    reference: torch.Tensor,
    n_pairs: int,
    snr: float,
    tilt_range_degrees: float,
    seed: int,
    max_relative_angle_degrees: float = 180.0,
    max_shift_voxels: float = DEFAULT_MAX_SHIFT_VOXELS,
) -> PairBatch:
    """``n_pairs`` pairs of the map ``reference`` ``(d, h, w)`` (see the module docstring); ``snr`` as
    ``var(signal) / var(noise)`` per subtomogram (inf = no noise), shifts uniform per axis in
    ``[-max_shift_voxels, max_shift_voxels]``. Deterministic for ``seed``."""
    if reference.ndim != 3:
        raise ValueError(f"reference must be one (d, h, w) map, got shape {tuple(reference.shape)}")
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")
    rng = np.random.default_rng(seed)
    source_rot = Rotation.random(n_pairs, random_state=rng).as_matrix()
    relative = rotations_within(n_pairs, max_relative_angle_degrees, rng)
    poses = []
    for rot in (source_rot, relative @ source_rot):
        shift = rng.uniform(-max_shift_voxels, max_shift_voxels, (n_pairs, 3))
        poses.append((torch.as_tensor(rot, dtype=torch.float32), torch.as_tensor(shift, dtype=torch.float32)))
    stack = reference.to(torch.float32)[None].expand(n_pairs, *reference.shape)
    wedge = wedge_masks(tuple(reference.shape), float(tilt_range_degrees), device=reference.device)[0]
    volumes = []
    for rotation, shift in poses:
        signal = transform_volumes(stack, rotation.to(reference.device), shift.to(reference.device))
        if tilt_range_degrees < 90:
            signal = apply_fourier_filter(signal, wedge)
        volumes.append(_normalise(add_noise(signal, float(snr), rng)))
    rotation, shift = compose_poses(*invert_pose(*poses[0]), *poses[1])
    return PairBatch(volumes[0], volumes[1], rotation.to(reference.device), shift.to(reference.device))
