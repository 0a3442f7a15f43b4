"""Simulated tomograms: many copies of given maps at random non-overlapping positions and orientations.

Steps (all randomness from ``numpy.random.default_rng`` streams of ``seed``):

1. Positions: centres drawn uniformly (continuous, voxels) with every centre at least ``box // 2`` voxels
   inside each face (``box`` = the maps' box; the whole box fits) and at least ``min_distance`` (default
   ``box``) from every other centre, by rejection sampling; too crowded a request is an error.
2. Classes: each map ``n_particles // len(maps)`` times (the remainder to the first maps), in random order.
3. Orientations: uniform rotations ``R`` (:func:`jimray.conventions.random_rotations`); the particle is the
   map rotated by ``R`` about its box centre, so the subtomogram cut around the true coordinate has the
   pose ``(R, t)`` of :mod:`jimray.conventions` with ``|t| < 0.5`` (the sub-voxel part of the position,
   rendered by :func:`jimray.geometry.rigid.transform_volumes`). Euler angles are RELION ZYZ of ``R``.
4. The particle boxes are added into the empty tomogram (overlapping box corners simply add).
5. The single-axis-tilt missing wedge of :func:`jimray.fourier.wedge_masks` over the whole tomogram.
6. White Gaussian noise with ``var(noise) = S / snr``, ``S`` the mean over the particles of the variance of
   the particle in its own box after the wedge: the SNR definition of
   :func:`jimray.simulate.subtomogram.simulate_subtomograms`, so a tomogram at SNR 0.1 cut into boxes gives
   subtomograms as noisy as simulated ones at SNR 0.1. ``snr = inf`` adds no noise.

Coordinates are ``(x, y, z)`` voxels (the centre of the rotated map, i.e. voxel ``box // 2`` of its box).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from jimray.conventions import box_center, matrix_to_euler, random_rotations
from jimray.fourier.masks import wedge_masks
from jimray.geometry.rigid import transform_volumes
from jimray.simulate.subtomogram import apply_fourier_filter

_MAX_TRIES_PER_PARTICLE = 2000


class SimulatedTomogram(NamedTuple):
    """``tomogram`` (z, y, x) float32; ``coords`` (n, 3) float64 voxels (x, y, z); ``classes`` (n,) int64
    (index into the maps); ``euler_degrees`` (n, 3) float64 RELION ZYZ (rot, tilt, psi)."""

    tomogram: torch.Tensor
    coords: np.ndarray
    classes: np.ndarray
    euler_degrees: np.ndarray


def _check(maps, shape, n_particles, tilt_range_degrees, snr) -> torch.Tensor:
    if len(maps) == 0:
        raise ValueError("simulate_tomogram needs at least one map")
    shapes = {tuple(m.shape) for m in maps}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3 or len(set(next(iter(shapes)))) != 1:
        raise ValueError(f"maps must be cubic (n, n, n) volumes of one shape; got shapes {sorted(shapes)}")
    box = next(iter(shapes))[0]
    if len(shape) != 3 or any(int(s) < box for s in shape):
        raise ValueError(f"tomogram shape (z, y, x) must be 3 sizes, each >= the map box {box}; got {tuple(shape)}")
    if n_particles < 0:
        raise ValueError(f"n_particles must be >= 0, got {n_particles}")
    if not 0 < tilt_range_degrees <= 90:
        raise ValueError(f"tilt_range_degrees must lie in (0, 90] (90 = no wedge), got {tilt_range_degrees}")
    if math.isnan(snr) or snr <= 0:
        raise ValueError(f"snr must be > 0 (var(signal)/var(noise); inf for no noise), got {snr}")
    return torch.stack([m.to(torch.float32) for m in maps])


def random_positions(
    shape: tuple[int, int, int], n: int, margin: float, min_distance: float, rng: np.random.Generator
) -> np.ndarray:
    """``n`` points ``(x, y, z)`` uniform in the tomogram ``shape`` (z, y, x) shrunk by ``margin`` on every
    face, pairwise at least ``min_distance`` apart (rejection sampling). Raises if they do not fit."""
    lo = np.full(3, float(margin))
    hi = np.array([shape[2], shape[1], shape[0]], dtype=np.float64) - 1.0 - margin
    if np.any(hi < lo):
        raise ValueError(
            f"tomogram {tuple(shape)} is too small for a margin of {margin} voxels on every face; make each "
            f"axis at least {2 * math.ceil(margin) + 1} voxels"
        )
    points = np.zeros((n, 3))
    count, tries = 0, 0
    while count < n:
        if tries > _MAX_TRIES_PER_PARTICLE * max(n, 1):
            raise ValueError(
                f"could place only {count} of {n} particles {min_distance:g} voxels apart in a tomogram of "
                f"shape {tuple(shape)}; ask for fewer particles, a smaller min_distance or a bigger tomogram"
            )
        batch = rng.uniform(lo, hi, size=(256, 3))
        tries += len(batch)
        for p in batch:
            if count == n:
                break
            if count == 0 or np.min(np.sum((points[:count] - p) ** 2, axis=1)) >= min_distance**2:
                points[count] = p
                count += 1
    return points


def simulate_tomogram(
    maps: list[torch.Tensor],
    shape: tuple[int, int, int],
    n_particles: int,
    tilt_range_degrees: float = 60.0,
    snr: float = 0.1,
    seed: int = 0,
    min_distance: float | None = None,
    *,
    batch_size: int = 64,
) -> SimulatedTomogram:
    """Simulate a tomogram of ``shape`` (z, y, x) holding ``n_particles`` copies of ``maps`` (cubic ``(n, n, n)``
    volumes of one box); steps and SNR definition in the module docstring. Runs on the maps' device."""
    stack = _check(maps, shape, n_particles, float(tilt_range_degrees), float(snr))
    shape = tuple(int(s) for s in shape)
    box = stack.shape[-1]
    c = box_center(box)
    min_distance = float(box) if min_distance is None else float(min_distance)
    rng_pos, rng_pose, rng_noise = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    coords = random_positions(shape, n_particles, max(c, box - 1 - c), min_distance, rng_pos)
    classes = rng_pose.permutation(np.arange(n_particles) % len(maps)).astype(np.int64)
    rotations = random_rotations(n_particles, rng_pose)
    device = stack.device
    tomogram = torch.zeros(shape, dtype=torch.float32, device=device)
    corner = np.rint(coords).astype(np.int64) - c  # (x, y, z) of box voxel 0
    sub_voxel = coords - np.rint(coords)
    wedge = wedge_masks((box,) * 3, float(tilt_range_degrees), device=device)[0]
    box_variance = []
    for start in range(0, n_particles, max(1, batch_size)):
        sl = slice(start, min(start + max(1, batch_size), n_particles))
        boxes = transform_volumes(
            stack[torch.as_tensor(classes[sl], device=device)],
            torch.as_tensor(rotations[sl], dtype=torch.float32, device=device),
            torch.as_tensor(sub_voxel[sl], dtype=torch.float32, device=device),
        )
        box_variance.append(apply_fourier_filter(boxes, wedge).var(dim=(-3, -2, -1), unbiased=False).double())
        for k, (x0, y0, z0) in enumerate(corner[sl]):
            tomogram[z0 : z0 + box, y0 : y0 + box, x0 : x0 + box] += boxes[k]
    if float(tilt_range_degrees) < 90:
        tomogram = apply_fourier_filter(tomogram[None], wedge_masks(shape, float(tilt_range_degrees), device=device))[0]
    if not math.isinf(snr) and n_particles > 0:
        signal_variance = float(torch.cat(box_variance).mean())
        noise = torch.from_numpy(rng_noise.standard_normal(shape, dtype=np.float32)).to(device)
        tomogram = tomogram + noise * math.sqrt(signal_variance / float(snr))
    euler = matrix_to_euler(rotations) if n_particles else np.zeros((0, 3))
    return SimulatedTomogram(tomogram, coords, classes, euler)
