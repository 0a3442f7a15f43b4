"""Every convention of jimray, written down once. All other modules import from here.

Arrays and coordinates
----------------------
* A volume is an array indexed ``(z, y, x)``; a batch of volumes is ``(b, d, h, w)`` = ``(b, z, y, x)``.
* A point or vector is written in ``(x, y, z)`` order, in voxels unless its name says ``_angstrom``.
* The centre of a box of size ``N`` is voxel index ``N // 2`` on every axis (RELION, teamtomo; for an
  even box the centre is *not* ``(N - 1) / 2``). The DC term of an ``fftshift``-ed spectrum sits there too.

Poses (RELION)
--------------
* Euler angles are ZYZ ``(rot, tilt, psi)`` in degrees and *rotate the reference into the particle*.
  RELION's matrix is ``A = scipy Rotation.from_euler('ZYZ', [rot, tilt, psi], degrees=True).inv()``
  acting on ``(x, y, z)`` column vectors.
* A pose is ``(R, t)``: ``R`` (3, 3) the matrix above, ``t`` (3,) a shift in voxels, ``(x, y, z)``. The
  particle is the reference rotated by ``R`` about the box centre ``c`` and then moved by ``t``::

      particle(x) = reference(R^T (x - c - t) + c)

  so a feature at ``r`` in the reference appears at ``R (r - c) + c + t`` in the particle.
* RELION 3.1+ stores shifts as ``rlnOriginX/Y/ZAngst``: the particle centre is the picked coordinate
  *minus* the origin. Inside the box the particle centre is at ``c + t``, hence
  ``origin_angstrom = -t * voxel_size_angstrom``.
* Jim-Net predicts, for a pair (source, target), the transform ``(R, t)`` that carries the source onto
  the target: ``target ~ transform(source, R, t)`` with the same formula as above.

Missing wedge
-------------
* Single-axis tilt about ``y``, beam along ``z``. ``tilt_range_degrees`` is the largest tilt angle
  ``theta`` (data collected over ``-theta .. +theta``). The sampled part of Fourier space is
  ``|xi_z| <= |xi_x| tan(theta)``; ``theta = 90`` means no wedge. The paper's "30-degree missing wedge"
  is ``tilt_range_degrees = 60``.

Metrics (the paper's, kept exactly)
-----------------------------------
* Rotation error ``||R_true - R_pred||_F`` (0 .. 2*sqrt(2) = 2.83).
* Translation error: L2 distance of the shifts, in voxels.
* Clustering accuracy: fraction of particles whose predicted cluster, after the Hungarian matching of
  predicted to true labels that maximises agreement, equals the true class (computed with the rest of the
  label matching in :mod:`jimray.cluster.labels`; re-exported here).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from jimray.cluster.labels import clustering_accuracy  # noqa: F401  (the paper's metric, defined with the matching)
from jimray.precision import float32_region

MAX_ROTATION_ERROR = float(2.0 * np.sqrt(2.0))


def box_center(size: int) -> int:
    """Index of the centre voxel of a box of ``size`` voxels along one axis (``size // 2``)."""
    if size < 1:
        raise ValueError(f"box size must be positive, got {size}")
    return size // 2


def euler_to_matrix(angles_degrees: np.ndarray) -> np.ndarray:
    """RELION ZYZ Euler angles ``(..., 3)`` = (rot, tilt, psi) in degrees -> rotation matrices ``(..., 3, 3)``.

    The matrix rotates the reference into the particle and acts on ``(x, y, z)`` column vectors.
    """
    angles = np.asarray(angles_degrees, dtype=np.float64)
    if angles.shape[-1] != 3:
        raise ValueError(f"Euler angles need a last axis of 3 (rot, tilt, psi), got shape {angles.shape}")
    flat = angles.reshape(-1, 3)
    mats = Rotation.from_euler("ZYZ", flat, degrees=True).inv().as_matrix()
    return mats.reshape(*angles.shape[:-1], 3, 3)


def matrix_to_euler(matrices: np.ndarray) -> np.ndarray:
    """Rotation matrices ``(..., 3, 3)`` -> RELION ZYZ Euler angles ``(..., 3)`` in degrees (inverse of
    :func:`euler_to_matrix`)."""
    mats = np.asarray(matrices, dtype=np.float64)
    if mats.shape[-2:] != (3, 3):
        raise ValueError(f"rotation matrices need trailing shape (3, 3), got {mats.shape}")
    flat = mats.reshape(-1, 3, 3)
    angles = Rotation.from_matrix(flat).inv().as_euler("ZYZ", degrees=True)
    return angles.reshape(*mats.shape[:-2], 3)


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` rotation matrices ``(n, 3, 3)`` drawn uniformly (Haar measure) on SO(3), reproducibly from ``rng``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n == 0:
        return np.zeros((0, 3, 3))
    return Rotation.random(n, random_state=rng).as_matrix()


def shift_to_origin_angstrom(shift_voxels: np.ndarray, voxel_size_angstrom: float) -> np.ndarray:
    """Internal shift ``t`` (voxels, x y z) -> RELION ``rlnOriginX/Y/ZAngst`` (``-t * voxel size``)."""
    return -np.asarray(shift_voxels, dtype=np.float64) * float(voxel_size_angstrom)


def origin_angstrom_to_shift(origin_angstrom: np.ndarray, voxel_size_angstrom: float) -> np.ndarray:
    """RELION ``rlnOriginX/Y/ZAngst`` -> internal shift ``t`` in voxels (x y z)."""
    if voxel_size_angstrom <= 0:
        raise ValueError(f"voxel size must be positive, got {voxel_size_angstrom}")
    return -np.asarray(origin_angstrom, dtype=np.float64) / float(voxel_size_angstrom)


@float32_region
def compose_poses(
    first_rotation: torch.Tensor, first_shift: torch.Tensor, then_rotation: torch.Tensor, then_shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pose of applying ``(R1, t1)`` and then ``(R2, t2)``, as one pose ``(R2 R1, R2 t1 + t2)``.

    Shapes ``(b, 3, 3)`` and ``(b, 3)``; about the box centre, in the convention of this module.
    """
    rotation = then_rotation @ first_rotation
    shift = (then_rotation @ first_shift.unsqueeze(-1)).squeeze(-1) + then_shift
    return rotation, shift


@float32_region
def invert_pose(rotation: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of a pose ``(R, t)``: ``(R^T, -R^T t)``. Shapes ``(b, 3, 3)`` and ``(b, 3)``."""
    inv = rotation.transpose(-1, -2)
    return inv, -(inv @ shift.unsqueeze(-1)).squeeze(-1)


def rotation_error(rotation_true, rotation_pred) -> np.ndarray:
    """Paper's rotation error ``||R_true - R_pred||_F`` per pair; inputs ``(..., 3, 3)`` (numpy or torch)."""
    a = np.asarray(rotation_true.detach().cpu() if torch.is_tensor(rotation_true) else rotation_true, float)
    b = np.asarray(rotation_pred.detach().cpu() if torch.is_tensor(rotation_pred) else rotation_pred, float)
    if a.shape != b.shape or a.shape[-2:] != (3, 3):
        raise ValueError(f"rotation_error needs two (..., 3, 3) arrays of one shape, got {a.shape} and {b.shape}")
    return np.sqrt(((a - b) ** 2).sum(axis=(-1, -2)))


def translation_error(shift_true, shift_pred) -> np.ndarray:
    """Paper's translation error: L2 distance of shifts ``(..., 3)`` in voxels."""
    a = np.asarray(shift_true.detach().cpu() if torch.is_tensor(shift_true) else shift_true, float)
    b = np.asarray(shift_pred.detach().cpu() if torch.is_tensor(shift_pred) else shift_pred, float)
    if a.shape != b.shape or a.shape[-1] != 3:
        raise ValueError(f"translation_error needs two (..., 3) arrays of one shape, got {a.shape} and {b.shape}")
    return np.sqrt(((a - b) ** 2).sum(axis=-1))
