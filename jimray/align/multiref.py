"""Multi-reference alignment scores: every particle against every reference, over a rotation grid and all
shifts, in one batched pass (the classical step of the common-frame clustering, :mod:`jimray.cluster.frame`).

References are wedge-free (wedge-compensated class averages), so the comparison region of a particle and a
rotated reference is the particle's own measured region (its missing-wedge mask AND the low-pass), which does
not depend on the rotation. That makes the score cheap: each reference is rotated once per grid rotation for
all particles (``K * m`` rotated references, Fourier-binned), and each (particle, rotated reference) pair costs
one small inverse FFT that gives the constrained correlation (:mod:`jimray.fourier.xcorr`, the score of
:func:`jimray.fourier.ccc.constrained_ccc`) for every shift at once.

Shapes: particles ``(n, d, h, w)``, references ``(K, d, h, w)``, rotations ``(m, 3, 3)``; poses follow
:mod:`jimray.conventions` (``particle ~ transform_volumes(reference, R, t)``, shifts in voxels, x y z).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from jimray.baselines.search import fourier_crop, local_rotation_grid, so3_grid
from jimray.fourier.masks import lowpass_mask, wedge_masks
from jimray.fourier.xcorr import hermitian_weights, mask_to_rfft

_DIMS = (-3, -2, -1)

__all__ = ["ReferenceScores", "fourier_binning", "tilt_vector", "score_references", "score_at_poses", "refine_poses",
           "so3_grid"]


@dataclass
class ReferenceScores:
    """Best pose of every particle against every reference: ``scores (n, K)`` (constrained correlation, in
    [-1, 1]), ``rotations (n, K, 3, 3)``, ``shifts (n, K, 3)`` (voxels at the input sampling, x y z)."""

    scores: torch.Tensor
    rotations: torch.Tensor
    shifts: torch.Tensor

    def best(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(labels (n,), scores (n,), rotations (n, 3, 3), shifts (n, 3))`` of each particle's best reference."""
        labels = self.scores.argmax(dim=1)
        idx = torch.arange(labels.shape[0], device=labels.device)
        return labels, self.scores[idx, labels], self.rotations[idx, labels], self.shifts[idx, labels]


def tilt_vector(tilt_range_degrees, n: int) -> torch.Tensor:
    """Tilt ranges ``(n,)`` float64 from a number or an ``(n,)`` sequence (checked)."""
    tilt = torch.as_tensor(tilt_range_degrees, dtype=torch.float64).reshape(-1)
    tilt = tilt.expand(n) if tilt.numel() == 1 else tilt
    if tilt.shape != (n,):
        raise ValueError(f"tilt_range_degrees must be a number or have shape ({n},), got {tuple(tilt.shape)}")
    return tilt


def _check(particles: torch.Tensor, references: torch.Tensor, tilts) -> torch.Tensor:
    if particles.ndim != 4 or references.ndim != 4 or particles.shape[1:] != references.shape[1:]:
        raise ValueError(f"particles (n, d, h, w) and references (K, d, h, w) must share a box, got "
                         f"{tuple(particles.shape)} and {tuple(references.shape)}")
    if not (torch.isfinite(particles).all() and torch.isfinite(references).all()):
        raise ValueError("particles or references contain NaN or infinite voxels; clean the input volumes first")
    return tilt_vector(tilts, particles.shape[0])


def fourier_binning(shape: tuple[int, ...], lowpass: float) -> int:
    """Largest power of 2 that keeps every frequency the score uses (``lowpass * binning <= 0.5``) and a binned
    box of at least 8 voxels."""
    binning = 1
    while lowpass * binning * 2 <= 0.5 + 1e-9 and min(shape) // (binning * 2) >= 8:
        binning *= 2
    return binning


def _particle_masks(shape, tilts: torch.Tensor, lowpass: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetrised half masks ``(u, ...)`` of the distinct tilt ranges and the index ``(n,)`` of each particle's."""
    unique, inverse = torch.unique(tilts, return_inverse=True)
    wedges = wedge_masks(shape, unique, device=device, dtype=dtype)
    low = lowpass_mask(shape, min(lowpass, 0.5), device=device, dtype=dtype)
    return mask_to_rfft(((wedges * low) > 0.5).to(dtype)), inverse.to(device)


def rotated_reference_spectra(references: torch.Tensor, rotations: torch.Tensor, binning: int,
                              rotation_chunk: int = 64) -> torch.Tensor:
    """``rfftn`` spectra ``(K, m, d', h', w' // 2 + 1)`` of every reference rotated by every rotation. The
    references are Fourier-binned by ``binning`` first, then all ``K`` are rotated together as channels of one
    trilinear resampling per rotation (one sampling grid for all references)."""
    from jimray.baselines.search import _rotate_channels

    small = fourier_crop(references, binning)  # (K, d', h', w')
    m = rotations.shape[0]
    out = []
    for r0 in range(0, m, rotation_chunk):
        rot = rotations[r0 : r0 + rotation_chunk]
        vols = _rotate_channels(small.unsqueeze(0).expand(rot.shape[0], *small.shape).contiguous(), rot)
        out.append(torch.fft.rfftn(vols, dim=_DIMS).transpose(0, 1))  # (K, c, ...)
    return torch.cat(out, dim=1)


def _shift_phases(small: tuple[int, int, int], max_shift: float, device, dtype):
    """Integer shifts ``(S, 3)`` (x y z, binned voxels) with ``||t|| <= max_shift`` and the phase ramps
    ``exp(2 pi i k.t)`` ``(S, d', h', w' // 2 + 1)`` that move a spectrum by each of them."""
    d, h, w = small
    r = int(math.floor(max_shift + 1e-6))
    axis = torch.arange(-r, r + 1, device=device, dtype=dtype)
    shifts = torch.cartesian_prod(axis, axis, axis)
    shifts = shifts[shifts.norm(dim=1) <= max_shift + 1e-6]
    fz = torch.fft.fftfreq(d, device=device, dtype=dtype)
    fy = torch.fft.fftfreq(h, device=device, dtype=dtype)
    fx = torch.fft.rfftfreq(w, device=device, dtype=dtype)
    phase = (shifts[:, 0, None, None, None] * fx + shifts[:, 1, None, None, None] * fy[:, None]
             + shifts[:, 2, None, None, None] * fz[:, None, None])
    return shifts, torch.polar(torch.ones_like(phase), 2.0 * math.pi * phase)


def _rotated_wedges(small, tilt: float, rotations: torch.Tensor, keep: torch.Tensor) -> torch.Tensor | None:
    """Symmetrised half masks ``(m, F)`` of a reference wedge rotated by each rotation (thresholded at 0.5),
    on the kept Fourier voxels; None without a wedge (``tilt >= 90``)."""
    if tilt >= 90.0:
        return None
    from jimray.geometry.rigid import rotate_fourier_masks

    wedge = wedge_masks(small, tilt, device=rotations.device, dtype=rotations.dtype)
    out = []
    for r0 in range(0, rotations.shape[0], 256):
        rot = rotations[r0 : r0 + 256]
        rotated = rotate_fourier_masks(wedge.expand(rot.shape[0], *small), rot) > 0.5
        out.append(mask_to_rfft(rotated.to(rotations.dtype)).reshape(rot.shape[0], -1)[:, keep])
    return torch.cat(out)


def score_references(
    particles: torch.Tensor,
    references: torch.Tensor,
    tilt_range_degrees,
    *,
    angular_step_degrees: float = 30.0,
    rotations: torch.Tensor | None = None,
    max_shift_voxels: float = 4.0,
    lowpass_cycles_per_voxel: float = 0.25,
    reference_tilt_range_degrees: float = 90.0,
    particle_chunk: int = 32,
) -> ReferenceScores:
    """Best rotation (of the grid) and shift of every particle against every wedge-free reference.

    ``particles (n, d, h, w)`` with tilt ranges (a number or ``(n,)``, degrees, 90 = no wedge);
    ``references (K, d, h, w)`` wedge-free; ``rotations (m, 3, 3)`` or a grid of ``angular_step_degrees``
    (:func:`jimray.baselines.search.so3_grid`). The work is Fourier-binned by 2 when the low-pass allows it
    (lossless for the scored frequencies). Shifts are integers of the binned lattice within
    ``max_shift_voxels`` (input voxels). The correlation for every (particle, shift) against every rotated
    reference is one real matrix product over the measured Fourier voxels (Parseval), so the cost is
    ``n * S * K * m * F`` multiply-adds for ``S`` shifts and ``F`` voxels, in BLAS.

    ``reference_tilt_range_degrees`` < 90 treats the references as subtomograms with that missing wedge (e.g.
    single particles used as prototypes): the score is then compared over the particle's measured region AND the
    rotated reference's (the constrained correlation of :func:`jimray.fourier.ccc.alignment_mask`), whose
    normalisation is one more matrix product over the rotated wedge masks.
    """
    tilts = _check(particles, references, tilt_range_degrees)
    dtype, device = particles.dtype, particles.device
    grid = rotations if rotations is not None else so3_grid(angular_step_degrees, device=device, dtype=dtype)
    binning = fourier_binning(tuple(particles.shape[-3:]), lowpass_cycles_per_voxel)
    small = tuple(s // binning for s in particles.shape[-3:])
    masks, which = _particle_masks(small, tilts.to(device), lowpass_cycles_per_voxel * binning, device, dtype)
    weighted = masks * hermitian_weights(small[-1], device=device, dtype=dtype)  # (u, ...)
    keep = (weighted.sum(0) > 0).reshape(-1)  # Fourier voxels that any particle measured
    ref_ft = rotated_reference_spectra(references.to(dtype), grid.to(dtype), binning)
    k, m = ref_ft.shape[:2]
    ref_ft = ref_ft.reshape(k * m, -1)[:, keep]  # (K*m, F)
    refs_real = torch.cat([ref_ft.real, ref_ft.imag], dim=1).T.contiguous()  # (2F, K*m)
    wk = weighted.reshape(weighted.shape[0], -1)[:, keep]  # (u, F)
    r_power = wk @ ref_ft.abs().square().T  # (u, K*m)
    ref_wedges = _rotated_wedges(small, float(reference_tilt_range_degrees), grid.to(dtype), keep)  # (m, F) or None
    shifts, phases = _shift_phases(small, max_shift_voxels / binning, device, dtype)
    phases = phases.reshape(phases.shape[0], -1)[:, keep]  # (S, F)
    part_ft = torch.fft.rfftn(fourier_crop(particles, binning), dim=_DIMS).reshape(particles.shape[0], -1)[:, keep]
    n, s_count = particles.shape[0], shifts.shape[0]
    scores = torch.empty((n, k), dtype=dtype, device=device)
    index = torch.empty((n, k), dtype=torch.long, device=device)
    for p0 in range(0, n, particle_chunk):
        p = slice(p0, min(p0 + particle_chunk, n))
        q = part_ft[p] * wk[which[p]]  # (c, F): w M P
        if ref_wedges is None:
            p_power = (q * part_ft[p].conj()).real.sum(dim=1)[:, None]  # (c, 1)
        else:  # power over the particle's AND the rotated reference's measured voxels, per rotation
            p_power = ((q * part_ft[p].conj()).real @ ref_wedges.T).repeat(1, k)  # (c, K*m)
        shifted = q[:, None, :] * phases[None]  # (c, S, F)
        cross = torch.cat([shifted.real, shifted.imag], dim=2).reshape(-1, refs_real.shape[0]) @ refs_real
        norm = torch.sqrt(p_power * r_power[which[p]] + 1e-12)  # (c, K*m)
        cc = cross.reshape(-1, s_count, k * m) / norm[:, None, :]
        best_over_shift, shift_index = cc.max(dim=1)  # (c, K*m)
        best, rot_index = best_over_shift.reshape(-1, k, m).max(dim=2)  # (c, K)
        scores[p] = best
        flat = rot_index + torch.arange(k, device=device) * m
        index[p] = rot_index + (shift_index.gather(1, flat) * m * k)
    rot_index = index % m
    shift_index = index // (m * k)
    return ReferenceScores(scores, grid[rot_index], shifts[shift_index] * binning)


def score_at_poses(
    particles: torch.Tensor,
    references: torch.Tensor,
    rotations: torch.Tensor,
    tilt_range_degrees,
    *,
    max_shift_voxels: float = 4.0,
    lowpass_cycles_per_voxel: float = 0.25,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every particle against every wedge-free reference at a rotation it already has: no rotation search, the
    best shift (sub-voxel, within ``max_shift_voxels``) over the frequencies up to ``lowpass_cycles_per_voxel``.

    ``particles (n, d, h, w)``, ``references (M, d, h, w)``, ``rotations (n, M, 3, 3)`` (the pose of particle
    ``i`` in the frame of reference ``j``, :mod:`jimray.conventions`), tilt ranges a number or ``(n,)``.
    Returns ``scores (n, M)`` (constrained correlation) and ``shifts (n, M, 3)`` (voxels, x y z). Costs one
    rotation of a reference per (particle, reference) at full sampling (not Fourier-binned: the trilinear
    rotation of a binned volume damps the band near the low-pass, which is where small structures differ; on
    the benchmark set embedded 0.05 the distinct test's weakest true pair fell from d 1.05 to 0.52 binned)."""
    n, m = particles.shape[0], references.shape[0]
    if rotations.shape != (n, m, 3, 3):
        raise ValueError(f"rotations must have shape ({n}, {m}, 3, 3) (particles, references), got "
                         f"{tuple(rotations.shape)}")
    scores = particles.new_empty((n, m))
    shifts = particles.new_empty((n, m, 3))
    same = torch.zeros(n, dtype=torch.long, device=particles.device)
    for j in range(m):  # refine_poses without a refinement step: the score at the pose, best shift
        _, shifts[:, j], scores[:, j] = refine_poses(
            particles, references[j : j + 1], same, rotations[:, j].to(particles.dtype), tilt_range_degrees, steps=0,
            max_shift_voxels=max_shift_voxels, lowpass_cycles_per_voxel=lowpass_cycles_per_voxel)
    return scores, shifts


def refine_poses(
    particles: torch.Tensor,
    references: torch.Tensor,
    labels: torch.Tensor,
    rotations: torch.Tensor,
    tilt_range_degrees,
    *,
    start_degrees: float = 15.0,
    steps: int = 3,
    max_shift_voxels: float = 4.0,
    lowpass_cycles_per_voxel: float = 0.25,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local refinement of each particle's pose against its own reference ``references[labels]``: ``steps``
    rounds of the 27 rotations of :func:`jimray.baselines.search.local_rotation_grid` (half-width halving from
    ``start_degrees``) at full sampling with sub-voxel shifts. Returns ``(rotations (n, 3, 3), shifts (n, 3),
    scores (n,))``."""
    from jimray.baselines.search import _Searcher

    tilts = _check(particles, references, tilt_range_degrees).to(device=particles.device, dtype=particles.dtype)
    refs = (references if references.shape[0] == 1 else references[labels]).to(particles.dtype)  # one: shared
    searcher = _Searcher(particles, tilts, refs, torch.full((1,), 90.0, device=particles.device,
                         dtype=particles.dtype), lowpass_cycles_per_voxel, max_shift_voxels, True, 512)
    idx = torch.arange(particles.shape[0], device=particles.device)
    rot = rotations
    score, shift = (x[:, 0] for x in searcher.score(rot.unsqueeze(1)))
    for step in range(steps):
        local = local_rotation_grid(start_degrees / 2.0**step, particles.device, particles.dtype)
        candidates = local.unsqueeze(0) @ rot.unsqueeze(1)
        scores, shifts = searcher.score(candidates)
        best = scores.argmax(dim=1)
        rot, shift, score = candidates[idx, best], shifts[idx, best], scores[idx, best]
    return rot, shift, score
