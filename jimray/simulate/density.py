"""Atomic models -> density maps, Gaussian low-pass to a resolution, and resampling between voxel sizes.

Density model
-------------
Each atom contributes its atomic number ``Z`` (its electron count, a simple proxy for its scattering
potential) at its position; the sum is blurred by an isotropic Gaussian. Hydrogens are usually absent
from the models and ignored.

Resolution definition (as ChimeraX ``molmap``)
----------------------------------------------
A map "at resolution ``R``" is the atom sum convolved with a Gaussian of standard deviation
``sigma = R / (pi * sqrt(2))`` (~0.225 R) per axis. Its Fourier transform
``exp(-2 pi^2 sigma^2 |k|^2)`` falls to ``1/e`` at the spatial frequency ``|k| = 1/R``.

Maps are ``(d, h, w)`` = ``(z, y, x)``, centred on the box centre ``N // 2`` (see
:mod:`jimray.conventions`); values are electrons per voxel, so a map's sum is its total ``Z``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from jimray.conventions import box_center
from jimray.fourier.masks import frequency_grid
from jimray.geometry.rigid import voxel_grid


def gaussian_sigma_angstrom(resolution_angstrom: float) -> float:
    """Standard deviation (Angstrom) of the Gaussian blur that defines a map at ``resolution_angstrom``."""
    if not resolution_angstrom > 0 or not math.isfinite(resolution_angstrom):
        raise ValueError(f"resolution must be a positive number of Angstrom, got {resolution_angstrom}")
    return float(resolution_angstrom) / (math.pi * math.sqrt(2.0))


def _check_voxel_size(voxel_size_angstrom: float, name: str = "voxel_size_angstrom") -> float:
    if not voxel_size_angstrom > 0 or not math.isfinite(voxel_size_angstrom):
        raise ValueError(f"{name} must be a positive number of Angstrom, got {voxel_size_angstrom}")
    return float(voxel_size_angstrom)


def _gaussian_transfer(shape, voxel_size_angstrom: float, sigma_angstrom: float, device) -> torch.Tensor:
    """``fftshift``-ed Gaussian transfer function ``exp(-2 pi^2 sigma^2 |k|^2)``, ``(d, h, w)`` float64."""
    k = frequency_grid(tuple(shape), device=device, dtype=torch.float64) / voxel_size_angstrom
    return torch.exp(-2.0 * math.pi**2 * sigma_angstrom**2 * (k**2).sum(-1))


def gaussian_lowpass(
    volumes: torch.Tensor,
    voxel_size_angstrom: float,
    resolution_angstrom: float,
    from_resolution_angstrom: float | None = None,
) -> torch.Tensor:
    """Blur volumes ``(..., d, h, w)`` to ``resolution_angstrom`` (definition in the module docstring).

    With ``from_resolution_angstrom`` the volumes are taken to be at that resolution already and only the
    missing blur is added (Gaussian variances add); asking for a finer resolution than they have is an error.
    """
    voxel = _check_voxel_size(voxel_size_angstrom)
    sigma2 = gaussian_sigma_angstrom(resolution_angstrom) ** 2
    if from_resolution_angstrom is not None:
        if resolution_angstrom < from_resolution_angstrom - 1e-9:
            raise ValueError(
                f"cannot sharpen a map at {from_resolution_angstrom} A to {resolution_angstrom} A: "
                f"ask for a resolution >= {from_resolution_angstrom} A"
            )
        sigma2 -= gaussian_sigma_angstrom(from_resolution_angstrom) ** 2
    if sigma2 <= 0:
        return volumes.clone()
    shape = volumes.shape[-3:]
    transfer = torch.fft.ifftshift(_gaussian_transfer(shape, voxel, math.sqrt(sigma2), volumes.device))
    spectrum = torch.fft.fftn(volumes.to(torch.float64), dim=(-3, -2, -1)) * transfer
    return torch.fft.ifftn(spectrum, dim=(-3, -2, -1)).real.to(volumes.dtype)


def box_size_for_atoms(
    coords_angstrom: np.ndarray, atomic_numbers: np.ndarray, voxel_size_angstrom: float, resolution_angstrom: float
) -> int:
    """Smallest even box (voxels) holding every atom, in any orientation, about the Z-weighted centre, plus
    three Gaussian sigmas and one voxel of margin."""
    voxel = _check_voxel_size(voxel_size_angstrom)
    coords, z = _check_atoms(coords_angstrom, atomic_numbers)
    centre = (coords * z[:, None]).sum(0) / z.sum()
    radius = float(np.linalg.norm(coords - centre, axis=1).max())
    radius += 3.0 * gaussian_sigma_angstrom(resolution_angstrom) + voxel
    return int(2 * math.ceil(radius / voxel))


def _check_atoms(coords_angstrom, atomic_numbers) -> tuple[np.ndarray, np.ndarray]:
    coords = np.asarray(coords_angstrom, dtype=np.float64)
    z = np.asarray(atomic_numbers, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 3 or len(coords) == 0:
        raise ValueError(f"atom coordinates must be (n, 3) in Angstrom with n >= 1, got shape {coords.shape}")
    if z.shape != (len(coords),) or np.any(z <= 0):
        raise ValueError(f"atomic numbers must be (n,) = ({len(coords)},) positive integers, got shape {z.shape}")
    if not np.isfinite(coords).all():
        raise ValueError("atom coordinates contain NaN or infinity")
    return coords, z


def _splat_trilinear(positions: torch.Tensor, weights: torch.Tensor, size: int) -> torch.Tensor:
    """Deposit ``weights`` at voxel ``positions`` (n, 3) x y z (absolute indices) onto a ``size^3`` grid."""
    grid = torch.zeros(size**3, dtype=torch.float64, device=positions.device)
    base = torch.floor(positions)
    frac = positions - base
    base = base.long()
    for corner in range(8):
        offset = torch.tensor([(corner >> 0) & 1, (corner >> 1) & 1, (corner >> 2) & 1], device=positions.device)
        idx = base + offset
        w = weights * torch.where(offset.bool(), frac, 1.0 - frac).prod(-1)
        inside = ((idx >= 0) & (idx < size)).all(-1)
        idx, w = idx[inside], w[inside]
        flat = (idx[:, 2] * size + idx[:, 1]) * size + idx[:, 0]
        grid.index_add_(0, flat, w)
    return grid.view(size, size, size)


def atoms_to_density(
    coords_angstrom: np.ndarray,
    atomic_numbers: np.ndarray,
    voxel_size_angstrom: float,
    resolution_angstrom: float | None = None,
    box_size: int | None = None,
    oversample: int = 2,
    device=None,
) -> torch.Tensor:
    """Density map ``(box, box, box)`` float32 of atoms, centred (Z-weighted centre at voxel ``box // 2``).

    * ``resolution_angstrom``: Gaussian blur of the module's definition; default ``2 * voxel_size``.
    * ``box_size``: default from the extent (:func:`box_size_for_atoms`); atoms outside are dropped.
    * The atoms are deposited trilinearly on a grid ``oversample`` times finer, blurred there in Fourier
      space (minus the trilinear deposit's own variance ``h^2/6`` per axis, ``h`` the fine voxel), and the
      spectrum is cropped to the requested voxel size (Fourier binning: no aliasing from the fine grid).
    Values are electrons per voxel (the map's sum is the total Z inside the box).
    """
    voxel = _check_voxel_size(voxel_size_angstrom)
    coords, z = _check_atoms(coords_angstrom, atomic_numbers)
    resolution = 2.0 * voxel if resolution_angstrom is None else float(resolution_angstrom)
    if box_size is None:
        box_size = box_size_for_atoms(coords, z, voxel, resolution)
    if box_size < 2 or oversample < 1:
        raise ValueError(f"box_size must be >= 2 and oversample >= 1, got {box_size} and {oversample}")
    fine_voxel = voxel / oversample
    fine_size = box_size * oversample
    centre = (coords * z[:, None]).sum(0) / z.sum()
    pos = torch.as_tensor((coords - centre) / fine_voxel + box_center(box_size) * oversample, device=device)
    fine = _splat_trilinear(pos, torch.as_tensor(z, device=pos.device), fine_size)
    sigma2 = gaussian_sigma_angstrom(resolution) ** 2 - fine_voxel**2 / 6.0
    spectrum = torch.fft.fftshift(torch.fft.fftn(fine))
    if sigma2 > 0:
        spectrum = spectrum * _gaussian_transfer(fine.shape, fine_voxel, math.sqrt(sigma2), fine.device)
    lo = box_center(fine_size) - box_center(box_size)
    crop = spectrum[lo : lo + box_size, lo : lo + box_size, lo : lo + box_size]
    return torch.fft.ifftn(torch.fft.ifftshift(crop)).real.to(torch.float32)


def resample_map(
    volume: torch.Tensor, from_voxel_size_angstrom: float, to_voxel_size_angstrom: float, box_size: int
) -> torch.Tensor:
    """Resample a centred map ``(d, h, w)`` (or a batch ``(b, d, h, w)``) to another voxel size and a cubic box.

    Method: when the voxels grow, the spectrum is first cut at the new Nyquist frequency (raised-cosine
    edge from 0.9 to 1.0 of it) against aliasing; then the map is sampled trilinearly at the new voxel
    centres, about the box centres ``N // 2`` (zeros outside the input). Values are scaled by
    ``(to / from)^3`` so that a map's sum (its total mass) is kept.
    """
    src = _check_voxel_size(from_voxel_size_angstrom, "from_voxel_size_angstrom")
    dst = _check_voxel_size(to_voxel_size_angstrom, "to_voxel_size_angstrom")
    if volume.ndim not in (3, 4):
        raise ValueError(f"volume must be (d, h, w) or (b, d, h, w), got shape {tuple(volume.shape)}")
    if box_size < 1:
        raise ValueError(f"box_size must be positive, got {box_size}")
    batch = volume if volume.ndim == 4 else volume.unsqueeze(0)
    dtype = batch.dtype if batch.is_floating_point() else torch.float32
    batch = batch.to(dtype)
    if dst > src * (1 + 1e-9):
        batch = _antialias(batch, 0.5 * src / dst)
    d, h, w = batch.shape[-3:]
    pos = voxel_grid((box_size,) * 3, device=batch.device, dtype=dtype) * (dst / src)
    centre = pos.new_tensor([box_center(w), box_center(h), box_center(d)])
    size = pos.new_tensor([max(w - 1, 1), max(h - 1, 1), max(d - 1, 1)])
    grid = (2.0 * (pos + centre) / size - 1.0).unsqueeze(0).expand(batch.shape[0], -1, -1, -1, -1)
    out = F.grid_sample(batch.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    out = out.squeeze(1) * (dst / src) ** 3
    return out if volume.ndim == 4 else out[0]


def _antialias(volumes: torch.Tensor, cutoff_cycles_per_voxel: float) -> torch.Tensor:
    """Spherical low-pass of ``(b, d, h, w)`` at ``cutoff`` with a raised-cosine edge from 0.9 cutoff."""
    radius = frequency_grid(tuple(volumes.shape[-3:]), device=volumes.device, dtype=torch.float64).norm(dim=-1)
    t = ((radius / cutoff_cycles_per_voxel - 0.9) / 0.1).clamp(0.0, 1.0)
    transfer = torch.fft.ifftshift(0.5 * (1.0 + torch.cos(math.pi * t)))
    spectrum = torch.fft.fftn(volumes.to(torch.float64), dim=(-3, -2, -1)) * transfer
    return torch.fft.ifftn(spectrum, dim=(-3, -2, -1)).real.to(volumes.dtype)
