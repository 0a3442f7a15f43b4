"""Differentiable rigid geometry on batches of volumes (pure torch). Conventions: :mod:`jimray.conventions`."""

from jimray.geometry.procrustes import fit_rigid, fit_rigid_soft, polar_rotation
from jimray.geometry.rigid import rotate_fourier_masks, transform_volumes, voxel_grid
from jimray.geometry.rotation_repr import quaternion_to_matrix, six_d_to_matrix

__all__ = [
    "fit_rigid",
    "fit_rigid_soft",
    "polar_rotation",
    "quaternion_to_matrix",
    "rotate_fourier_masks",
    "six_d_to_matrix",
    "transform_volumes",
    "voxel_grid",
]
