"""Difference-of-Gaussian (DoG) particle picking in a tomogram ``(z, y, x)``. Pure torch (+ scipy KD-tree).

Filter
------
``DoG = G(sigma1) * v - G(sigma2) * v`` with Gaussians of standard deviation (voxels, isotropic)::

    r      = particle_diameter_angstrom / 2 / voxel_size_angstrom     # particle radius in voxels
    sigma1 = sigma_factor * r        (default sigma_factor = 0.5)
    sigma2 = sigma_ratio * sigma1    (default sigma_ratio  = 1.6)

``sigma1`` averages the noise over the particle, ``sigma2`` estimates the local background that is taken
away. A DoG with ratio ``k`` approximates a Laplacian of Gaussian of scale
``sigma1 * k * sqrt(2 ln k / (k^2 - 1))`` (1.24 ``sigma1`` for ``k = 1.6``), whose response to a uniform
ball of radius ``r`` peaks at its centre for scale ``r / sqrt(3)`` (3D blob detection); the defaults give
``0.62 r``, a little wider than that for more noise averaging. They were tuned on simulated tomograms
(``jimray bench pick``, see BENCHMARKS.md). The filter is applied in Fourier space (``rfftn``) after
reflect-padding each side by ``ceil(3 sigma2)`` voxels (at most the axis length - 1), so the borders see
no wrap-around.

Scores and peaks
----------------
* Bright particles (positive density, as jimray simulates) give DoG maxima; pass ``invert=True`` for
  dark ones (raw cryo-ET contrast).
* The DoG map is put in noise units: ``score = (DoG - median) / (1.4826 * MAD)``, robust against the
  particles themselves (median absolute deviation over the whole map, or over a regular subsample of
  at most 1M voxels for big maps).
* A peak is a voxel that is the maximum of the cube of half-width ``ceil(min_distance)`` around it,
  scores at least ``threshold``, lies at least ``edge_margin`` voxels inside every face of the tomogram,
  and survives a greedy non-maximum suppression (highest score first) that removes every other peak
  closer than ``min_distance`` (default: the particle radius; the NMS only settles ties on plateaus).
  The cube rule matters for big particles with inner structure: a secondary maximum inside the particle
  is dropped when any higher voxel lies within the cube, not only a higher peak within a sphere.
* Coordinates are voxel indices ``(x, y, z)`` (RELION's pixel coordinates, no sub-voxel refinement);
  results are sorted by decreasing score.

Slabs
-----
A big tomogram is processed as z-slabs with a halo (:func:`slab_bounds`, :func:`halo_voxels`): each slab
is filtered with its halo and keeps only the peaks of its core, so the union over slabs equals the picks
of the whole tomogram when the score statistics are shared (``noise=`` of :func:`pick_slab`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree

DEFAULT_SIGMA_FACTOR = 0.5
DEFAULT_SIGMA_RATIO = 1.6
MAD_TO_STD = 1.4826
_MAX_STAT_SAMPLES = 1 << 20


@dataclass
class PickResult:
    """Picks of one tomogram: ``coords_xyz`` (n, 3) float64 voxels (x, y, z), ``scores`` (n,) float64
    (DoG in noise-std units), sorted by decreasing score."""

    coords_xyz: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def _positive(value: float, name: str, hint: str) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number {hint}, got {value}")
    return value


def dog_sigmas(
    particle_diameter_angstrom: float,
    voxel_size_angstrom: float,
    sigma_factor: float = DEFAULT_SIGMA_FACTOR,
    sigma_ratio: float = DEFAULT_SIGMA_RATIO,
) -> tuple[float, float]:
    """``(sigma1, sigma2)`` in voxels for a particle diameter (rule in the module docstring)."""
    diameter = _positive(particle_diameter_angstrom, "particle_diameter_angstrom", "of Angstrom (e.g. 250)")
    voxel = _positive(voxel_size_angstrom, "voxel_size_angstrom", "of Angstrom (e.g. 10)")
    _positive(sigma_factor, "sigma_factor", "(e.g. 0.5)")
    if not sigma_ratio > 1:
        raise ValueError(f"sigma_ratio must be > 1 (sigma2 = sigma_ratio * sigma1), got {sigma_ratio}")
    sigma1 = sigma_factor * diameter / 2.0 / voxel
    return sigma1, sigma_ratio * sigma1


def _gaussian_rfft(shape: tuple[int, int, int], sigma: float, device) -> torch.Tensor:
    """Gaussian transfer ``exp(-2 pi^2 sigma^2 |f|^2)`` on the ``rfftn`` grid of ``shape`` (f in cycles/voxel)."""
    d, h, w = shape
    fz = torch.fft.fftfreq(d, device=device, dtype=torch.float32)
    fy = torch.fft.fftfreq(h, device=device, dtype=torch.float32)
    fx = torch.fft.rfftfreq(w, device=device, dtype=torch.float32)
    f2 = fz.view(-1, 1, 1) ** 2 + fy.view(1, -1, 1) ** 2 + fx.view(1, 1, -1) ** 2
    return torch.exp(-2.0 * math.pi**2 * sigma**2 * f2)


def dog_filter(volumes: torch.Tensor, sigma1: float, sigma2: float) -> torch.Tensor:
    """``G(sigma1) * v - G(sigma2) * v`` of ``(d, h, w)`` or ``(b, d, h, w)`` volumes (sigmas in voxels).

    Reflect padding of ``ceil(3 sigma2)`` per side (capped at the axis length - 1) keeps the borders free of
    wrap-around. Same shape and device as the input; float32 (float64 stays float64).
    """
    if volumes.ndim not in (3, 4):
        raise ValueError(f"dog_filter needs a (d, h, w) or (b, d, h, w) volume, got shape {tuple(volumes.shape)}")
    _positive(sigma1, "sigma1", "of voxels")
    if not sigma2 > sigma1:
        raise ValueError(f"sigma2 must be larger than sigma1, got sigma1={sigma1}, sigma2={sigma2}")
    x = volumes if volumes.ndim == 4 else volumes.unsqueeze(0)
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    d, h, w = x.shape[-3:]
    pz, py, px = (min(math.ceil(3.0 * sigma2), n - 1) for n in (d, h, w))
    padded = F.pad(x.unsqueeze(1), (px, px, py, py, pz, pz), mode="reflect").squeeze(1)
    shape = tuple(padded.shape[-3:])
    transfer = _gaussian_rfft(shape, sigma1, x.device) - _gaussian_rfft(shape, sigma2, x.device)
    spectrum = torch.fft.rfftn(padded, dim=(-3, -2, -1)) * transfer.to(padded.dtype)
    out = torch.fft.irfftn(spectrum, s=shape, dim=(-3, -2, -1))[..., pz : pz + d, py : py + h, px : px + w]
    return out if volumes.ndim == 4 else out[0]


def noise_statistics(dog_map: torch.Tensor) -> tuple[float, float]:
    """Robust ``(median, sigma)`` of a DoG map: ``sigma = 1.4826 * MAD`` (on a regular subsample of at most
    1M voxels for big maps). Raises if the map is constant."""
    flat = dog_map.reshape(-1)
    if flat.numel() > _MAX_STAT_SAMPLES:
        flat = flat[:: math.ceil(flat.numel() / _MAX_STAT_SAMPLES)]
    flat = flat.double()
    median = flat.median()
    sigma = MAD_TO_STD * (flat - median).abs().median()
    if not sigma > 0:
        raise ValueError("the filtered tomogram is constant (zero spread); is the tomogram empty or all equal?")
    return float(median), float(sigma)


def normalise_scores(dog_map: torch.Tensor, noise: tuple[float, float] | None = None) -> torch.Tensor:
    """DoG map in noise-std units, ``(dog - median) / sigma``; ``noise`` defaults to :func:`noise_statistics`."""
    median, sigma = noise if noise is not None else noise_statistics(dog_map)
    return (dog_map - median) / sigma


def find_peaks(
    score_map: torch.Tensor,
    threshold: float,
    min_distance_voxels: float,
    edge_margin_voxels: float = 0.0,
    *,
    z_offset: int = 0,
    z_core: tuple[int, int] | None = None,
    full_depth: int | None = None,
) -> PickResult:
    """Peaks of a score map ``(d, h, w)`` (rules in the module docstring).

    For a slab of a taller tomogram: ``z_offset`` is the global z of the slab's first plane, ``z_core`` the
    global ``[start, stop)`` z range whose peaks are kept, ``full_depth`` the tomogram depth (for the edge
    margin in z). Returned coordinates are global, ``(x, y, z)`` voxels.
    """
    if score_map.ndim != 3:
        raise ValueError(f"find_peaks needs a (d, h, w) score map, got shape {tuple(score_map.shape)}")
    _positive(min_distance_voxels, "min_distance_voxels", "of voxels (e.g. the particle radius)")
    if edge_margin_voxels < 0:
        raise ValueError(f"edge_margin_voxels must be >= 0, got {edge_margin_voxels}")
    d, h, w = score_map.shape
    full_depth = d + z_offset if full_depth is None else int(full_depth)
    candidate = (score_map >= _cube_max(score_map, max(1, math.ceil(min_distance_voxels)))) & (score_map >= threshold)
    idx = torch.nonzero(candidate)  # (n, 3) local z, y, x
    zyx = idx.cpu().numpy().astype(np.int64)
    zyx[:, 0] += int(z_offset)
    scores = score_map[candidate].double().cpu().numpy()
    m = float(edge_margin_voxels)
    keep = (
        (zyx[:, 2] >= m) & (zyx[:, 2] <= w - 1 - m)
        & (zyx[:, 1] >= m) & (zyx[:, 1] <= h - 1 - m)
        & (zyx[:, 0] >= m) & (zyx[:, 0] <= full_depth - 1 - m)
    )
    zyx, scores = zyx[keep], scores[keep]
    order = np.argsort(-scores, kind="stable")
    zyx, scores = zyx[order], scores[order]
    survivors = _greedy_nms(zyx.astype(np.float64), min_distance_voxels)
    zyx, scores = zyx[survivors], scores[survivors]
    if z_core is not None:
        inside = (zyx[:, 0] >= z_core[0]) & (zyx[:, 0] < z_core[1])
        zyx, scores = zyx[inside], scores[inside]
    return PickResult(coords_xyz=zyx[:, ::-1].astype(np.float64).copy(), scores=scores)


def _cube_max(volume: torch.Tensor, half: int) -> torch.Tensor:
    """Maximum over the cube of half-width ``half`` around each voxel of ``(d, h, w)``: three 1-D max pools
    (a cube maximum is separable; 1-D pools are much faster than one 3-D pool on CPU)."""
    out = volume
    for dim in range(3):
        moved = out.movedim(dim, -1)
        shape = moved.shape
        pooled = F.max_pool1d(moved.reshape(-1, 1, shape[-1]), 2 * half + 1, stride=1, padding=half)
        out = pooled.reshape(shape).movedim(-1, dim)
    return out


def suppress_close(picks: PickResult, min_distance_voxels: float) -> PickResult:
    """Greedy non-maximum suppression of merged picks (e.g. from several slabs): sorted by decreasing score,
    a pick closer than ``min_distance_voxels`` to a better one is dropped."""
    order = np.argsort(-picks.scores, kind="stable")
    coords, scores = picks.coords_xyz[order], picks.scores[order]
    keep = _greedy_nms(coords, float(min_distance_voxels))
    return PickResult(coords_xyz=coords[keep], scores=scores[keep])


def _greedy_nms(points: np.ndarray, min_distance: float) -> np.ndarray:
    """Indices of ``points`` (sorted by decreasing score) kept by greedy NMS at ``min_distance``."""
    if len(points) < 2:
        return np.arange(len(points))
    tree = cKDTree(points)
    pairs = tree.query_pairs(r=min_distance - 1e-9, output_type="ndarray")
    if len(pairs) == 0:
        return np.arange(len(points))
    neighbours: dict[int, list[int]] = {}
    for a, b in pairs:
        neighbours.setdefault(int(a), []).append(int(b))
        neighbours.setdefault(int(b), []).append(int(a))
    removed = np.zeros(len(points), dtype=bool)
    for i in range(len(points)):
        if removed[i]:
            continue
        for j in neighbours.get(i, ()):
            if j > i:
                removed[j] = True
    return np.flatnonzero(~removed)


def _prepare(tomogram: torch.Tensor, invert: bool) -> torch.Tensor:
    if tomogram.ndim != 3:
        raise ValueError(f"a tomogram must be a (z, y, x) volume, got shape {tuple(tomogram.shape)}")
    if not torch.isfinite(tomogram).all():
        raise ValueError("the tomogram holds non-finite values (NaN/Inf); fix or mask them before picking")
    x = tomogram.float() if tomogram.dtype not in (torch.float32, torch.float64) else tomogram
    return -x if invert else x


def pick_particles(
    tomogram: torch.Tensor,
    particle_diameter_angstrom: float,
    voxel_size_angstrom: float,
    threshold: float = 3.0,
    edge_margin_voxels: float = 0.0,
    min_distance_voxels: float | None = None,
    *,
    sigma_factor: float = DEFAULT_SIGMA_FACTOR,
    sigma_ratio: float = DEFAULT_SIGMA_RATIO,
    invert: bool = False,
) -> PickResult:
    """Pick particles in a whole tomogram ``(z, y, x)``: DoG filter, noise-unit scores, peaks.

    ``threshold`` is in noise-std units of the DoG map; ``min_distance_voxels`` defaults to the particle
    radius in voxels. Runs on the tomogram's device.
    """
    return pick_slab(
        tomogram, 0, None, None, particle_diameter_angstrom, voxel_size_angstrom, threshold, edge_margin_voxels,
        min_distance_voxels, sigma_factor=sigma_factor, sigma_ratio=sigma_ratio, invert=invert,
    )


def pick_slab(
    slab: torch.Tensor,
    z_start: int,
    z_core: tuple[int, int] | None,
    full_depth: int | None,
    particle_diameter_angstrom: float,
    voxel_size_angstrom: float,
    threshold: float = 3.0,
    edge_margin_voxels: float = 0.0,
    min_distance_voxels: float | None = None,
    *,
    sigma_factor: float = DEFAULT_SIGMA_FACTOR,
    sigma_ratio: float = DEFAULT_SIGMA_RATIO,
    invert: bool = False,
    noise: tuple[float, float] | None = None,
) -> PickResult:
    """Pick in a z-slab ``(d, h, w)`` of a tomogram that starts at global plane ``z_start``.

    ``z_core`` = global ``[start, stop)`` planes whose picks this slab owns (``None``: all); ``full_depth``
    the tomogram's depth (``None``: the slab is the whole tomogram). ``noise`` = ``(median, sigma)`` of the
    DoG map shared by all slabs; ``None`` estimates it from this slab's core. Coordinates are global.
    """
    x = _prepare(slab, invert)
    sigma1, sigma2 = dog_sigmas(particle_diameter_angstrom, voxel_size_angstrom, sigma_factor, sigma_ratio)
    radius = particle_diameter_angstrom / 2.0 / voxel_size_angstrom
    min_distance = radius if min_distance_voxels is None else float(min_distance_voxels)
    dog = dog_filter(x, sigma1, sigma2)
    if noise is None:
        lo, hi = (0, dog.shape[0]) if z_core is None else (z_core[0] - z_start, z_core[1] - z_start)
        noise = noise_statistics(dog[max(lo, 0) : max(hi, lo + 1)])
    scores = normalise_scores(dog, noise)
    return find_peaks(
        scores, threshold, min_distance, edge_margin_voxels, z_offset=z_start, z_core=z_core, full_depth=full_depth
    )


def halo_voxels(
    particle_diameter_angstrom: float,
    voxel_size_angstrom: float,
    min_distance_voxels: float | None = None,
    *,
    sigma_factor: float = DEFAULT_SIGMA_FACTOR,
    sigma_ratio: float = DEFAULT_SIGMA_RATIO,
) -> int:
    """Overlap (planes) a slab needs on each side so its core picks match the whole tomogram's:
    ``ceil(4 sigma2 + 2 min_distance) + 1`` (filter support + peak neighbourhood + NMS reach)."""
    _, sigma2 = dog_sigmas(particle_diameter_angstrom, voxel_size_angstrom, sigma_factor, sigma_ratio)
    radius = particle_diameter_angstrom / 2.0 / voxel_size_angstrom
    min_distance = radius if min_distance_voxels is None else float(min_distance_voxels)
    return math.ceil(4.0 * sigma2 + 2.0 * min_distance) + 1


def slab_bounds(depth: int, slab_depth: int, halo: int) -> list[tuple[int, int, int, int]]:
    """Split ``depth`` z-planes into slabs: ``[(read_start, read_stop, core_start, core_stop), ...]``.

    Cores of ``slab_depth`` planes tile ``[0, depth)`` exactly; each slab reads ``halo`` more planes on
    each side (clipped to the tomogram).
    """
    if depth < 1 or slab_depth < 1 or halo < 0:
        raise ValueError(f"need depth >= 1, slab_depth >= 1, halo >= 0; got {depth}, {slab_depth}, {halo}")
    bounds = []
    for core_start in range(0, depth, slab_depth):
        core_stop = min(core_start + slab_depth, depth)
        bounds.append((max(0, core_start - halo), min(depth, core_stop + halo), core_start, core_stop))
    return bounds
