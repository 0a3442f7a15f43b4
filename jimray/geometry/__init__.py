"""Differentiable rigid geometry on batches of volumes (pure torch). Conventions: :mod:`jimray.conventions`."""

from jimray.geometry.rigid import rotate_fourier_masks, transform_volumes, voxel_grid

__all__ = ["rotate_fourier_masks", "transform_volumes", "voxel_grid"]
