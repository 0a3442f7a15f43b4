"""Fourier shell correlation (FSC), soft spherical masks and FSC-threshold resolution (pure torch).

Shell convention (the same as the ``torch-fourier-shell-correlation`` package, so the two agree):

* Shells sit at integer radii ``k = 0 .. N // 2`` in Fourier voxels, ``N = min(d, h, w)``; shell ``k`` is the
  spatial frequency ``k / N`` cycles/voxel = ``k / (N * voxel_size_angstrom)`` 1/Angstrom.
* A Fourier voxel at radius ``r = |xi| * N`` (``xi`` in cycles/voxel) contributes to its two neighbouring
  shells ``floor(r)`` and ``floor(r) + 1`` with linear weights ``1 - (r - floor(r))`` and ``r - floor(r)``
  (voxels past the last shell feed it until ``r = N // 2 + 1``; beyond that, nothing).
* Sums run over the ``rfft`` half-spectrum. ``FSC_k = Re(sum w a conj(b)) / sqrt(sum w |a|^2 sum w |b|^2)``;
  shell 0 (DC) is 1 by definition; an empty or all-zero shell gives 0.
"""

from __future__ import annotations

import math

import torch

__all__ = ["fsc", "soft_spherical_mask", "shell_frequencies_per_angstrom", "resolution_at"]


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.ndim not in (3, 4) or a.shape != b.shape:
        raise ValueError(
            f"fsc needs two maps of one shape, (d, h, w) or (b, d, h, w); got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def _rfft_radius(shape: tuple[int, int, int], device, n_min: int) -> torch.Tensor:
    """Radius ``|xi| * n_min`` in Fourier voxels of each ``rfftn`` coefficient, ``(d, h, w // 2 + 1)``."""
    d, h, w = shape
    fz = torch.fft.fftfreq(d, device=device, dtype=torch.float64)
    fy = torch.fft.fftfreq(h, device=device, dtype=torch.float64)
    fx = torch.fft.rfftfreq(w, device=device, dtype=torch.float64)
    zz, yy, xx = torch.meshgrid(fz, fy, fx, indexing="ij")
    return torch.sqrt(zz**2 + yy**2 + xx**2) * n_min


def fsc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Fourier shell correlation of two real maps ``(d, h, w)`` -> ``(n_shells,)``, or ``(b, d, h, w)`` ->
    ``(b, n_shells)``, ``n_shells = min(d, h, w) // 2 + 1``; float64 on the input's device.

    Shell ``k`` is at radius ``k`` Fourier voxels (``k / N`` cycles/voxel); see the module docstring for the
    interpolation of voxels between shells (identical to ``torch_fourier_shell_correlation.fsc``).
    """
    _check_pair(a, b)
    shape = tuple(a.shape[-3:])
    n_min = min(shape)
    n_shells = n_min // 2 + 1
    fa = torch.fft.rfftn(a.to(torch.float64), dim=(-3, -2, -1)).flatten(-3)
    fb = torch.fft.rfftn(b.to(torch.float64), dim=(-3, -2, -1)).flatten(-3)
    radius = _rfft_radius(shape, a.device, n_min).flatten()
    lower = torch.floor(radius).long()
    frac = radius - lower
    cross = (fa * fb.conj()).real
    power_a = fa.abs() ** 2
    power_b = fb.abs() ** 2
    sums = [torch.zeros(*a.shape[:-3], n_shells + 2, dtype=torch.float64, device=a.device) for _ in range(3)]
    for index, weight in ((lower, 1.0 - frac), (lower + 1, frac)):
        index = index.clamp(max=n_shells + 1)
        for total, values in zip(sums, (cross, power_a, power_b), strict=True):
            total.index_add_(-1, index, values * weight)
    num, den_a, den_b = (s[..., :n_shells] for s in sums)
    denominator = torch.sqrt(den_a * den_b)
    curve = torch.where(denominator > 0, num / denominator.clamp_min(1e-300), torch.zeros_like(num))
    curve[..., 0] = 1.0
    return curve


def soft_spherical_mask(
    shape: tuple[int, int, int],
    radius_voxels: float,
    edge_voxels: float = 3.0,
    device=None,
    dtype=torch.float32,
) -> torch.Tensor:
    """Real-space sphere ``(d, h, w)`` about the box centre ``N // 2``: 1 for ``r <= radius_voxels``, a raised
    cosine falling to 0 at ``r = radius_voxels + edge_voxels``, 0 beyond. ``edge_voxels = 0`` gives a hard edge."""
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be (d, h, w) with positive sizes, got {shape}")
    if not radius_voxels > 0 or not edge_voxels >= 0:
        raise ValueError(f"need radius_voxels > 0 and edge_voxels >= 0, got {radius_voxels} and {edge_voxels}")
    from jimray.geometry.rigid import voxel_grid

    r = voxel_grid(tuple(shape), device=device, dtype=torch.float64).norm(dim=-1)
    if edge_voxels == 0:
        return (r <= radius_voxels).to(dtype)
    t = ((r - radius_voxels) / edge_voxels).clamp(0.0, 1.0)
    return (0.5 * (1.0 + torch.cos(math.pi * t))).to(dtype)


def shell_frequencies_per_angstrom(box_voxels: int, voxel_size_angstrom: float) -> torch.Tensor:
    """Spatial frequency of each FSC shell ``(box // 2 + 1,)`` in 1/Angstrom: ``k / (box * voxel size)``."""
    if box_voxels < 2 or not voxel_size_angstrom > 0:
        raise ValueError(f"need box_voxels >= 2 and voxel_size_angstrom > 0, got {box_voxels}, {voxel_size_angstrom}")
    k = torch.arange(box_voxels // 2 + 1, dtype=torch.float64)
    return k / (box_voxels * float(voxel_size_angstrom))


def resolution_at(
    fsc_curve: torch.Tensor, threshold: float = 0.143, *, voxel_size_angstrom: float, box_voxels: int
) -> float:
    """Resolution in Angstrom where ``fsc_curve`` (from :func:`fsc`, shell ``k`` at ``k / box`` cycles/voxel)
    first drops below ``threshold``.

    The crossing frequency is interpolated linearly between the last shell at or above the threshold and the
    first below it; the resolution is its inverse. If the curve never drops below the threshold the Nyquist
    resolution ``2 * voxel_size_angstrom`` is returned (the map is resolved as far as its sampling allows).
    """
    curve = torch.as_tensor(fsc_curve, dtype=torch.float64).detach().cpu().flatten()
    if curve.numel() < 2:
        raise ValueError(f"fsc_curve needs at least 2 shells, got {curve.numel()}")
    freq = shell_frequencies_per_angstrom(box_voxels, voxel_size_angstrom)
    if freq.numel() != curve.numel():
        raise ValueError(f"fsc_curve has {curve.numel()} shells but a box of {box_voxels} gives {freq.numel()}")
    below = torch.nonzero(curve[1:] < threshold).flatten()
    if below.numel() == 0:
        return 2.0 * float(voxel_size_angstrom)
    k = int(below[0]) + 1
    f0, f1, c0, c1 = float(freq[k - 1]), float(freq[k]), float(curve[k - 1]), float(curve[k])
    crossing = f0 + (c0 - threshold) / (c0 - c1) * (f1 - f0) if c0 != c1 else f1
    return 1.0 / crossing if crossing > 0 else math.inf
