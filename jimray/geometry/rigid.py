"""Rigid transforms of volume batches with ``grid_sample``.

``grid_sample`` reads its grid's last axis as ``(x, y, z)`` = ``(W, H, D)``; volumes are ``(b, d, h, w)``
= ``(b, z, y, x)``. Positions are handled in voxel units about the box centre ``N // 2`` and only
normalised to ``[-1, 1]`` (``align_corners=True``) at the last moment, so that even boxes rotate about
the same centre as RELION and ``fftshift``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jimray.conventions import box_center
from jimray.precision import float32_region


def _check_batch(volumes: torch.Tensor, rotations: torch.Tensor, shifts: torch.Tensor | None) -> None:
    if volumes.ndim != 4:
        raise ValueError(f"volumes must be (b, d, h, w), got shape {tuple(volumes.shape)}")
    b = volumes.shape[0]
    if rotations.shape != (b, 3, 3):
        raise ValueError(f"rotations must be (b, 3, 3) with b={b}, got {tuple(rotations.shape)}")
    if shifts is not None and shifts.shape != (b, 3):
        raise ValueError(f"shifts must be (b, 3) with b={b} (voxels, x y z), got {tuple(shifts.shape)}")


def voxel_grid(shape: tuple[int, int, int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel positions relative to the box centre, ``(d, h, w, 3)`` in ``(x, y, z)`` order, in voxels."""
    d, h, w = shape
    z = torch.arange(d, device=device, dtype=dtype) - box_center(d)
    y = torch.arange(h, device=device, dtype=dtype) - box_center(h)
    x = torch.arange(w, device=device, dtype=dtype) - box_center(w)
    zz, yy, xx = torch.meshgrid(z, y, x, indexing="ij")
    return torch.stack([xx, yy, zz], dim=-1)


def _sample(volumes: torch.Tensor, positions: torch.Tensor, padding_mode: str, mode: str) -> torch.Tensor:
    """Sample ``volumes`` (b, d, h, w) at centred voxel ``positions`` (b, d, h, w, 3), x y z."""
    d, h, w = volumes.shape[-3:]
    centre = positions.new_tensor([box_center(w), box_center(h), box_center(d)])
    size = positions.new_tensor([max(w - 1, 1), max(h - 1, 1), max(d - 1, 1)])
    grid = 2.0 * (positions + centre) / size - 1.0
    out = F.grid_sample(volumes.unsqueeze(1), grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    return out.squeeze(1)


@float32_region
def transform_volumes(
    volumes: torch.Tensor,
    rotations: torch.Tensor,
    shifts: torch.Tensor | None = None,
    *,
    padding_mode: str = "zeros",
    mode: str = "bilinear",
) -> torch.Tensor:
    """Rotate each volume by ``R`` about the box centre, then move it by ``t`` (voxels, x y z).

    ``out(x) = volume(R^T (x - c - t) + c)``: the RELION sense, see :mod:`jimray.conventions`.
    Shapes: volumes ``(b, d, h, w)``, rotations ``(b, 3, 3)``, shifts ``(b, 3)`` or ``None``.
    Differentiable in volumes, rotations and shifts (trilinear interpolation).
    """
    _check_batch(volumes, rotations, shifts)
    grid = voxel_grid(tuple(volumes.shape[-3:]), device=volumes.device, dtype=volumes.dtype)
    rel = grid.unsqueeze(0)
    if shifts is not None:
        rel = rel - shifts.to(volumes.dtype)[:, None, None, None, :]
    # R^T v for row vectors v is v @ R.
    positions = torch.einsum("bzyxj,bjk->bzyxk", rel, rotations.to(volumes.dtype))
    return _sample(volumes, positions, padding_mode, mode)


def rotate_fourier_masks(masks: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate ``fftshift``-ed Fourier-space masks ``(b, d, h, w)`` by ``R`` about the DC voxel.

    A real-space rotation by ``R`` rotates the spectrum by the same ``R``; shifts only change phases, so
    the mask of ``transform_volumes(v, R, t)`` is ``rotate_fourier_masks(mask(v), R)``.
    """
    return transform_volumes(masks, rotations, None, padding_mode="zeros", mode="bilinear")
