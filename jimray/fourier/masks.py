"""Frequency grids and masks. All spectra are ``fftshift``-ed (DC at ``N // 2``), shape ``(d, h, w)``.

Frequencies are in cycles per voxel, ``(x, y, z)`` in the last axis, each in ``[-0.5, 0.5)``.
"""

from __future__ import annotations

import math

import torch


def frequency_grid(shape: tuple[int, int, int], device=None, dtype=torch.float32) -> torch.Tensor:
    """``fftshift``-ed frequencies ``(d, h, w, 3)`` in cycles/voxel, last axis ``(xi_x, xi_y, xi_z)``."""
    d, h, w = shape
    fz = torch.fft.fftshift(torch.fft.fftfreq(d, device=device, dtype=dtype))
    fy = torch.fft.fftshift(torch.fft.fftfreq(h, device=device, dtype=dtype))
    fx = torch.fft.fftshift(torch.fft.fftfreq(w, device=device, dtype=dtype))
    zz, yy, xx = torch.meshgrid(fz, fy, fx, indexing="ij")
    return torch.stack([xx, yy, zz], dim=-1)


def wedge_masks(
    shape: tuple[int, int, int], tilt_range_degrees: torch.Tensor | float, device=None, dtype=torch.float32
) -> torch.Tensor:
    """Single-axis-tilt (axis y) sampling masks ``(b, d, h, w)``: ``1{|xi_z| <= |xi_x| tan(theta)}``.

    ``tilt_range_degrees`` (scalar or ``(b,)``) is the largest tilt angle; 90 gives no wedge. The DC
    voxel is always kept. See :mod:`jimray.conventions`.
    """
    theta = torch.as_tensor(tilt_range_degrees, dtype=torch.float64, device=device).reshape(-1)
    if torch.any((theta <= 0) | (theta > 90)) or not torch.isfinite(theta).all():
        raise ValueError(f"tilt_range_degrees must lie in (0, 90], got {theta.tolist()}")
    freq = frequency_grid(shape, device=device, dtype=torch.float64)
    ax = freq[..., 0].abs().unsqueeze(0)
    az = freq[..., 2].abs().unsqueeze(0)
    tan = torch.tan(torch.deg2rad(theta)).view(-1, 1, 1, 1)
    full = (theta >= 90.0 - 1e-9).view(-1, 1, 1, 1)
    mask = (az <= ax * tan) | full | ((az == 0) & (ax == 0))
    return mask.to(dtype)


def lowpass_mask(
    shape: tuple[int, int, int], cutoff_cycles_per_voxel: float, device=None, dtype=torch.float32
) -> torch.Tensor:
    """Cubic low-pass ``1{||xi||_inf <= t}`` of the paper, ``(d, h, w)``; ``t`` in cycles/voxel (<= 0.5)."""
    if not 0 < cutoff_cycles_per_voxel <= 0.5 + 1e-9 or math.isnan(cutoff_cycles_per_voxel):
        raise ValueError(f"low-pass cutoff must be in (0, 0.5] cycles/voxel, got {cutoff_cycles_per_voxel}")
    freq = frequency_grid(shape, device=device, dtype=torch.float64)
    return (freq.abs().amax(dim=-1) <= cutoff_cycles_per_voxel + 1e-12).to(dtype)
