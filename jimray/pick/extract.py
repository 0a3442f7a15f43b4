"""Cutting subtomograms out of a tomogram at particle coordinates (kernel: pure torch/numpy).

A coordinate ``(x, y, z)`` (voxels, RELION pixels) is rounded to the nearest voxel ``p``; the box of edge
``box`` holds tomogram voxels ``p - box // 2 .. p - box // 2 + box - 1`` per axis, so ``p`` sits at the box
centre ``box // 2`` (:mod:`jimray.conventions`) and the particle centre at ``box // 2 + (coord - p)``: the
sub-voxel part ``coord - p`` is the shift ``t`` of the particle in its box. A box that would reach outside
the tomogram is not cut (no padding): its particle is reported as outside.
"""

from __future__ import annotations

import numpy as np
import torch

from jimray.conventions import box_center


def box_corners(coords_xyz: np.ndarray, box: int) -> np.ndarray:
    """Integer ``(x, y, z)`` of voxel 0 of each box, ``(n, 3)``: ``rint(coord) - box // 2``."""
    coords = np.asarray(coords_xyz, dtype=np.float64).reshape(-1, 3)
    if not np.isfinite(coords).all():
        raise ValueError("coordinates hold non-finite values (NaN/Inf)")
    return np.rint(coords).astype(np.int64) - box_center(box)


def boxes_inside(coords_xyz: np.ndarray, box: int, shape: tuple[int, int, int]) -> np.ndarray:
    """``(n,)`` bool: the box around each coordinate lies inside a tomogram of ``shape`` (z, y, x)."""
    corners = box_corners(coords_xyz, box)
    limits = np.array([shape[2], shape[1], shape[0]]) - box
    return np.all((corners >= 0) & (corners <= limits), axis=1)


def cut_boxes(tomogram: torch.Tensor, coords_xyz: np.ndarray, box: int) -> tuple[torch.Tensor, np.ndarray]:
    """Boxes ``(k, box, box, box)`` around the coordinates whose box lies inside ``tomogram`` (z, y, x), in input
    order, and the ``(n,)`` bool mask of those coordinates. Same device and dtype as ``tomogram``."""
    if tomogram.ndim != 3:
        raise ValueError(f"a tomogram must be a (z, y, x) volume, got shape {tuple(tomogram.shape)}")
    if box < 1 or box > min(tomogram.shape):
        raise ValueError(f"box must lie in [1, {min(tomogram.shape)}] (the tomogram's smallest size), got {box}")
    inside = boxes_inside(coords_xyz, box, tuple(tomogram.shape))
    corners = box_corners(coords_xyz, box)[inside]
    out = tomogram.new_empty((len(corners), box, box, box))
    for k, (x0, y0, z0) in enumerate(corners):
        out[k] = tomogram[z0 : z0 + box, y0 : y0 + box, x0 : x0 + box]
    return out, inside


def sub_voxel_shifts(coords_xyz: np.ndarray) -> np.ndarray:
    """``coord - rint(coord)``, ``(n, 3)`` voxels (x, y, z): the particle's shift ``t`` inside its cut box."""
    coords = np.asarray(coords_xyz, dtype=np.float64).reshape(-1, 3)
    return coords - np.rint(coords)
