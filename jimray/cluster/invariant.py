"""Rotation-invariant features of subtomograms: what a mixture can cluster before any alignment.

Two shell averages, both unchanged by a rotation of the particle about the box centre (up to interpolation and
the missing wedge, which stays in the lab frame):

* the real-space radial profile: the mean density in spherical shells about the box centre, after the volume
  is normalised (zero mean, unit variance);
* the radially averaged power spectrum, ``log`` of the mean ``|F(k)|^2`` over the *measured* Fourier voxels
  of each shell (the wedge mask of :func:`jimray.fourier.masks.wedge_masks`), so the missing wedge does not
  bias it; the power spectrum is also unchanged by a shift of the particle.

Batch-first: volumes ``(n, d, h, w)`` -> features ``(n, f)``; pure torch.
"""

from __future__ import annotations

import torch

from jimray.fourier.masks import frequency_grid, wedge_masks
from jimray.geometry.rigid import voxel_grid

_DIMS = (-3, -2, -1)

__all__ = ["radial_profile_features", "power_spectrum_features", "invariant_features"]


def _shell_index(radius: torch.Tensor, n_shells: int, r_max: float) -> torch.Tensor:
    return (radius / r_max * n_shells).floor().clamp(max=n_shells).long()  # n_shells = outside


def _shell_means(values: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, n_shells: int) -> torch.Tensor:
    """Weighted means ``(b, n_shells)`` of ``values (b, ...)`` grouped by ``index (...)`` (``n_shells`` = drop);
    ``weights`` ``(..)`` or ``(b, ...)``."""
    b = values.shape[0]
    flat_i = index.reshape(-1)
    w = weights.expand_as(values).reshape(b, -1)
    sums = values.new_zeros(b, n_shells + 1).index_add_(1, flat_i, values.reshape(b, -1) * w)
    counts = values.new_zeros(b, n_shells + 1).index_add_(1, flat_i, w)
    return (sums / counts.clamp_min(1e-12))[:, :n_shells]


def _normalised(volumes: torch.Tensor) -> torch.Tensor:
    mean = volumes.mean(dim=_DIMS, keepdim=True)
    std = volumes.std(dim=_DIMS, keepdim=True).clamp_min(1e-12)
    return (volumes - mean) / std


def radial_profile_features(volumes: torch.Tensor, n_shells: int | None = None) -> torch.Tensor:
    """Mean of each normalised volume ``(n, d, h, w)`` in ``n_shells`` spherical shells (default: half the
    smallest side) out to the inscribed sphere -> ``(n, n_shells)``."""
    shape = tuple(volumes.shape[-3:])
    n_shells = n_shells or min(shape) // 2
    radius = voxel_grid(shape, device=volumes.device, dtype=volumes.dtype).norm(dim=-1)
    index = _shell_index(radius, n_shells, min(shape) / 2.0)
    return _shell_means(_normalised(volumes), index, torch.ones_like(radius), n_shells)


def power_spectrum_features(volumes: torch.Tensor, tilt_range_degrees, n_shells: int | None = None) -> torch.Tensor:
    """``log`` mean power of each normalised volume in ``n_shells`` Fourier shells up to Nyquist, over the
    measured voxels only (tilt ranges: a number or ``(n,)`` degrees) -> ``(n, n_shells)``; the DC term is left
    out."""
    shape = tuple(volumes.shape[-3:])
    n_shells = n_shells or min(shape) // 2
    spectrum = torch.fft.fftshift(torch.fft.fftn(_normalised(volumes), dim=_DIMS), dim=_DIMS)
    power = spectrum.abs().square() / float(volumes[0].numel())
    radius = frequency_grid(shape, device=volumes.device, dtype=volumes.dtype).norm(dim=-1)
    index = _shell_index(radius, n_shells, 0.5)
    index[tuple(s // 2 for s in shape)] = n_shells  # no DC
    tilts = torch.as_tensor(tilt_range_degrees, dtype=torch.float64).reshape(-1)
    masks = wedge_masks(shape, tilts, device=volumes.device, dtype=volumes.dtype)
    if masks.shape[0] not in (1, volumes.shape[0]):
        raise ValueError(f"tilt_range_degrees must be a number or have one value per volume ({volumes.shape[0]}), "
                         f"got {tilts.numel()}")
    return torch.log(_shell_means(power, index, masks, n_shells).clamp_min(1e-12))


def invariant_features(volumes: torch.Tensor, tilt_range_degrees, n_shells: int | None = None) -> torch.Tensor:
    """Radial profile and radially averaged power spectrum side by side, ``(n, 2 * n_shells)``."""
    if volumes.ndim != 4:
        raise ValueError(f"volumes must be (n, d, h, w), got shape {tuple(volumes.shape)}")
    if not torch.isfinite(volumes).all():
        raise ValueError("volumes contain NaN or infinite voxels; clean the input volumes first")
    return torch.cat([radial_profile_features(volumes, n_shells),
                      power_spectrum_features(volumes, tilt_range_degrees, n_shells)], dim=1)
