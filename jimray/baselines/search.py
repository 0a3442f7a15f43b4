"""Classical constrained cross-correlation alignment (Förster et al. 2008; Xu et al. 2012 "F&A" style).

For every pair (source, target) the pose ``(R, t)`` with ``target ~ transform_volumes(source, R, t)`` is found by

1. an exhaustive rotational search over a uniform SO(3) grid (:func:`so3_grid`, ZYZ with sin(tilt) sampling);
2. for each rotation an FFT translational search of the normalised, missing-wedge-aware constrained
   correlation (:mod:`jimray.fourier.xcorr`: the score of :func:`jimray.fourier.ccc.constrained_ccc` with the
   mask of :func:`jimray.fourier.ccc.alignment_mask`, i.e. target wedge AND rotated source wedge AND low-pass,
   DC removed, the same score as Jim-Net's loss) over all shifts ``||t|| <= max_shift_voxels``;
3. a local refinement around the best rotation: ``refine_steps`` rounds of a 3x3x3 grid of small rotations
   (rotation vectors on a cube of half-width ``h``, left-multiplied) with ``h`` halving each round from
   ``angular_step / 2``; optional parabolic sub-voxel peak interpolation of the shift.

Work is batched in torch over particles and rotations, ``chunk_size`` (particle, rotation) volumes at a time;
it runs on the device of the inputs. With one shared reference the rotated references are computed once per
rotation and reused for every particle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from jimray.conventions import euler_to_matrix
from jimray.fourier.masks import lowpass_mask, wedge_masks
from jimray.fourier.xcorr import constrained_xcorr_all_shifts, mask_to_rfft, peak_shifts
from jimray.geometry.rigid import voxel_grid

_DIMS = (-3, -2, -1)


@dataclass
class AlignmentResult:
    """Poses found by the search: ``rotations (n, 3, 3)``, ``shifts (n, 3)`` (voxels, x y z), ``scores (n,)``
    (constrained correlation at the pose, in [-1, 1])."""

    rotations: torch.Tensor
    shifts: torch.Tensor
    scores: torch.Tensor


def so3_grid(angular_step_degrees: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """Near-uniform rotation grid ``(m, 3, 3)`` with about ``angular_step_degrees`` spacing.

    RELION ZYZ Euler angles: tilt in ``0, s, 2s, .. 180``; for each tilt ``max(1, round(360 sin(tilt) / s))``
    equally spaced rot angles (so the viewing directions are uniform on the sphere, Haar measure
    ``sin(tilt) d rot d tilt d psi``); psi (in-plane) in steps of ``s``. 30 degrees gives 552 rotations,
    15 degrees about 4.4 thousand.
    """
    step = float(angular_step_degrees)
    if not 0.5 <= step <= 180.0:
        raise ValueError(f"angular_step_degrees must lie in [0.5, 180], got {angular_step_degrees}")
    n_tilt = max(1, round(180.0 / step))
    n_psi = max(1, round(360.0 / step))
    angles = []
    for tilt in np.linspace(0.0, 180.0, n_tilt + 1):
        n_rot = max(1, round(360.0 * math.sin(math.radians(tilt)) / step))
        for rot in np.arange(n_rot) * 360.0 / n_rot:
            for psi in np.arange(n_psi) * 360.0 / n_psi:
                angles.append((rot, tilt, psi))
    return torch.as_tensor(euler_to_matrix(np.array(angles)), device=device, dtype=dtype)


def local_rotation_grid(half_width_degrees: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """27 small rotations ``(27, 3, 3)``: rotation vectors on the 3x3x3 cube ``{-h, 0, h}^3`` (identity first)."""
    h = math.radians(float(half_width_degrees))
    vals = torch.tensor([0.0, -h, h], dtype=torch.float64)
    vecs = torch.cartesian_prod(vals, vals, vals)
    return _axis_angle_to_matrix(vecs).to(device=device, dtype=dtype)


def _axis_angle_to_matrix(vecs: torch.Tensor) -> torch.Tensor:
    theta = vecs.norm(dim=-1, keepdim=True).unsqueeze(-1)
    k = torch.zeros(*vecs.shape[:-1], 3, 3, dtype=vecs.dtype)
    x, y, z = vecs.unbind(-1)
    k[..., 0, 1], k[..., 0, 2], k[..., 1, 0] = -z, y, z
    k[..., 1, 2], k[..., 2, 0], k[..., 2, 1] = -x, -y, x
    safe = torch.where(theta > 0, theta, torch.ones_like(theta))
    k = k / safe
    eye = torch.eye(3, dtype=vecs.dtype).expand_as(k)
    return eye + torch.sin(theta) * k + (1.0 - torch.cos(theta)) * (k @ k)


def _as_tilts(tilt, n: int, name: str, device) -> torch.Tensor:
    tilt = torch.as_tensor(tilt, dtype=torch.float32, device=device).reshape(-1)
    if tilt.numel() == 1:
        tilt = tilt.expand(n)
    if tilt.shape != (n,):
        raise ValueError(f"{name} must be a number or have shape ({n},), got {tuple(tilt.shape)}")
    if torch.any((tilt <= 0) | (tilt > 90)):
        raise ValueError(f"{name} must lie in (0, 90] degrees (90 = no missing wedge), got {tilt.tolist()}")
    return tilt


def _rotation_sampling_grid(rotations: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """``grid_sample`` grid ``(b, d, h, w, 3)`` rotating by ``R`` about the box centre: the sampling positions
    of :func:`jimray.geometry.rigid.transform_volumes` (no shift), normalised in one batched matmul."""
    d, h, w = shape
    dtype, device = rotations.dtype, rotations.device
    centre = torch.tensor([w // 2, h // 2, d // 2], dtype=dtype, device=device)
    size = torch.tensor([max(w - 1, 1), max(h - 1, 1), max(d - 1, 1)], dtype=dtype, device=device)
    voxels = voxel_grid(shape, device=device, dtype=dtype).reshape(1, -1, 3)
    grid = torch.matmul(voxels, rotations * (2.0 / size)) + (2.0 * centre / size - 1.0)
    return grid.reshape(rotations.shape[0], d, h, w, 3)


def _rotate_channels(channels: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate ``(b, C, d, h, w)`` by ``rotations (b, 3, 3)`` (trilinear, zeros outside), one grid per volume."""
    grid = _rotation_sampling_grid(rotations.to(channels.dtype), tuple(channels.shape[-3:]))
    return F.grid_sample(channels, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


class _Searcher:
    """Scores (particle, rotation) candidates for one batch of targets against one or per-target sources.

    Masks are kept as symmetrised ``rfftn`` half masks: target wedge and low-pass are even in ``k``, so
    ``sym(W_t * L * rot(W_s)) = W_t * L * sym(rot(W_s))`` and the rotated source wedge is symmetrised once per
    rotated source (and rotated once per rotation when every source shares one tilt range).
    """

    def __init__(self, targets, target_tilts, sources, source_tilts, lowpass, max_shift, subvoxel, chunk_size,
                 wedge_threshold=0.5):
        self.shape = tuple(targets.shape[-3:])
        dtype, device = targets.dtype, targets.device
        self.targets_ft = torch.fft.rfftn(targets, dim=_DIMS)
        self.target_w = self._half((wedge_masks(self.shape, target_tilts, device=device) > 0.5).to(dtype))
        self.low = self._half((lowpass_mask(self.shape, lowpass, device=device) > 0.5).to(dtype)).clone()
        self.low[0, 0, 0] = 0.0  # DC removed: zero-mean correlation
        self.sources = sources
        self.source_wedges = wedge_masks(self.shape, source_tilts, device=device, dtype=dtype)
        # No source wedge and a low-pass cube inside the sphere that a rotated all-ones mask keeps (less an
        # interpolation margin): the rotated source wedge is 1 on the whole low-pass, no need to rotate it.
        self.no_source_wedge = bool(torch.all(source_tilts >= 90.0)) and (
            lowpass * math.sqrt(3.0) <= 0.5 - 1.5 / min(self.shape)
        )
        self.max_shift, self.subvoxel, self.chunk_size = max_shift, subvoxel, chunk_size
        self.wedge_threshold = wedge_threshold

    def _half(self, shifted: torch.Tensor) -> torch.Tensor:
        return torch.fft.ifftshift(shifted, dim=_DIMS)[..., : self.shape[-1] // 2 + 1]

    def _sym_wedges(self, rotated: torch.Tensor) -> torch.Tensor:
        return mask_to_rfft((rotated > self.wedge_threshold).to(rotated.dtype))

    def _shared_wedges(self, rotations: torch.Tensor) -> torch.Tensor:
        """One source tilt, rotations ``(c, 3, 3)`` -> symmetrised rotated half wedges ``(1, c, ...)``."""
        wedge = self.source_wedges[:1].expand(rotations.shape[0], *self.shape)
        return self._sym_wedges(_rotate_channels(wedge.unsqueeze(1), rotations)[:, 0]).unsqueeze(0)

    def _rotated(self, src: slice, rotations: torch.Tensor, wedges: torch.Tensor | None):
        """Rotate sources ``[src]`` by ``rotations (1 or s, c, 3, 3)`` -> spectra ``(s, c, ...)`` and the
        symmetrised rotated half wedges (``wedges`` when precomputed, else rotated with the volumes)."""
        vols = self.sources[src]
        s, c = max(vols.shape[0], rotations.shape[0]), rotations.shape[1]
        flat_r = rotations.expand(s, c, 3, 3).reshape(s * c, 3, 3)
        channels = vols.unsqueeze(1).expand(s, c, *self.shape).reshape(s * c, 1, *self.shape)
        if wedges is None:
            src_w = self.source_wedges[src] if self.source_wedges.shape[0] > 1 else self.source_wedges
            src_w = src_w.unsqueeze(1).expand(s, c, *self.shape).reshape(s * c, 1, *self.shape)
            channels = torch.cat([channels, src_w], dim=1)
        rotated = _rotate_channels(channels, flat_r)
        spectra = torch.fft.rfftn(rotated[:, 0], dim=_DIMS)
        if wedges is None:
            wedges = self._sym_wedges(rotated[:, 1]).reshape(s, c, *spectra.shape[-3:])
        return spectra.reshape(s, c, *spectra.shape[-3:]), wedges

    def _score(self, p: slice, rot_ft, rot_wedges) -> tuple[torch.Tensor, torch.Tensor]:
        mask = self.target_w[p].unsqueeze(1) * self.low * rot_wedges
        cc = constrained_xcorr_all_shifts(self.targets_ft[p].unsqueeze(1), rot_ft, mask, self.shape)
        return peak_shifts(cc, self.max_shift, self.subvoxel)

    def score(self, rotations: torch.Tensor, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``rotations`` ``(1 or P, C, 3, 3)`` -> scores ``(P, C)``, shifts ``(P, C, 3)``."""
        n = self.targets_ft.shape[0]
        c_all = rotations.shape[1]
        pc = max(1, min(n, self.chunk_size))
        rc = max(1, self.chunk_size // pc)
        shared_rot = rotations.shape[0] == 1
        shared = shared_rot and self.sources.shape[0] == 1
        scores = self.targets_ft.real.new_empty(n, c_all)
        shifts = self.targets_ft.real.new_empty(n, c_all, 3)
        for r0 in range(0, c_all, rc):
            r = slice(r0, min(r0 + rc, c_all))
            if self.no_source_wedge:
                wedges = self.low.new_ones(1, 1, *self.low.shape)
            elif shared_rot and self.source_wedges.shape[0] == 1:
                wedges = self._shared_wedges(rotations[0, r])
            else:
                wedges = None
            if shared:
                rot_ft, rot_w = self._rotated(slice(0, 1), rotations[:, r], wedges)
            for p0 in range(0, n, pc):
                p = slice(p0, min(p0 + pc, n))
                if not shared:
                    src = slice(0, 1) if self.sources.shape[0] == 1 else p
                    rot_ft, rot_w = self._rotated(src, rotations[:, r] if shared_rot else rotations[p, r], wedges)
                scores[p, r], shifts[p, r] = self._score(p, rot_ft, rot_w)
            if progress is not None:
                progress(r.stop - r.start)
        return scores, shifts


def _check_volumes(volumes, name: str) -> torch.Tensor:
    v = torch.as_tensor(volumes)
    if v.ndim != 4 or min(v.shape[-3:]) < 4:
        raise ValueError(f"{name} must be (n, d, h, w) with every side >= 4, got shape {tuple(v.shape)}")
    if not torch.is_floating_point(v):
        v = v.float()
    if not torch.isfinite(v).all():
        raise ValueError(f"{name} contains NaN or infinite voxels; clean the input volumes first")
    return v


def align_pairs(
    sources,
    targets,
    source_tilt_range_degrees=90.0,
    target_tilt_range_degrees=90.0,
    *,
    angular_step_degrees: float = 30.0,
    refine_steps: int = 4,
    max_shift_voxels: float | None = None,
    lowpass_cycles_per_voxel: float = 0.25,
    subvoxel: bool = True,
    chunk_size: int = 128,
    rotated_wedge_threshold: float = 0.5,
    coarse_binning: int | None = None,
    progress: bool = False,
) -> AlignmentResult:
    """Pose ``(R, t)`` per pair with ``target ~ transform_volumes(source, R, t)`` (jimray/RELION sense).

    ``sources``: ``(n, d, h, w)`` or one ``(1, d, h, w)``/``(d, h, w)`` volume shared by every target;
    ``targets``: ``(n, d, h, w)``. Tilt ranges: a number or ``(n,)`` degrees (90 = no wedge).
    ``max_shift_voxels``: search radius (default: a quarter of the box). ``chunk_size``: (pair, rotation)
    volumes in flight (bounds memory: about ``chunk_size * d * h * w * 40`` bytes).
    ``rotated_wedge_threshold``: the interpolated rotated source wedge counts as measured above this value
    (0.5 = :func:`jimray.fourier.ccc.alignment_mask`; a value near 1 erodes it, which keeps the content of
    the source's missing wedge, spread by the real-space rotation, out of the score: with wedged sources the
    score at the true pose rises from about 0.95 to 0.98). ``coarse_binning``: the global grid search runs
    on volumes Fourier-cropped by this factor (lossless for the score's frequencies when
    ``lowpass * binning <= 0.5``; only the trilinear rotation sees the coarser sampling; shifts on a
    ``binning``-voxel lattice, then sub-voxel), the local refinement at full sampling; ``None`` picks 2 when
    ``lowpass <= 0.25`` and the box is at least 24, else 1. Returns tensors on the device of ``targets``.
    """
    targets, sources, t_tilt, s_tilt = _prepare_pairs(sources, targets, source_tilt_range_degrees,
                                                      target_tilt_range_degrees)
    shape = tuple(targets.shape[-3:])
    if refine_steps < 0 or chunk_size < 1:
        raise ValueError(f"refine_steps must be >= 0 and chunk_size >= 1, got {refine_steps}, {chunk_size}")
    if not 0.0 <= rotated_wedge_threshold < 1.0:
        raise ValueError(f"rotated_wedge_threshold must lie in [0, 1), got {rotated_wedge_threshold}")
    max_shift = min(shape) / 4.0 if max_shift_voxels is None else float(max_shift_voxels)
    binning = _coarse_binning(coarse_binning, shape, lowpass_cycles_per_voxel)
    searcher = _Searcher(targets, t_tilt, sources, s_tilt, lowpass_cycles_per_voxel, max_shift, subvoxel, chunk_size,
                         rotated_wedge_threshold)
    coarse = searcher if binning == 1 else _Searcher(
        fourier_crop(targets, binning), t_tilt, fourier_crop(sources, binning), s_tilt,
        lowpass_cycles_per_voxel * binning, max_shift / binning, subvoxel, chunk_size, rotated_wedge_threshold)
    grid = so3_grid(angular_step_degrees, device=targets.device, dtype=targets.dtype)
    with _progress(progress, grid.shape[0] + refine_steps * 27, "constrained-CC search") as advance:
        return _coarse_then_local(coarse, searcher, grid, angular_step_degrees, refine_steps, advance)


def _prepare_pairs(sources, targets, source_tilts, target_tilts):
    """Checked ``targets (n, ...)``, ``sources (1 or n, ...)`` and tilt ranges (``(1,)`` for a shared source
    with one tilt range, else ``(n,)``; a shared source with per-pair tilts is expanded)."""
    targets = _check_volumes(targets, "targets")
    sources = torch.as_tensor(sources)
    sources = _check_volumes(sources.unsqueeze(0) if sources.ndim == 3 else sources, "sources")
    n, shape = targets.shape[0], tuple(targets.shape[-3:])
    sources = sources.to(device=targets.device, dtype=targets.dtype)
    if tuple(sources.shape[-3:]) != shape or sources.shape[0] not in (1, n):
        raise ValueError(f"sources must be (d, h, w), (1, d, h, w) or ({n}, d, h, w) with box {shape}, "
                         f"got {tuple(sources.shape)}")
    t_tilt = _as_tilts(target_tilts, n, "target_tilt_range_degrees", targets.device)
    s_tilt = _as_tilts(source_tilts, n, "source_tilt_range_degrees", targets.device)
    if sources.shape[0] == 1 and torch.all(s_tilt == s_tilt[0]):
        s_tilt = s_tilt[:1]
    elif sources.shape[0] == 1:
        sources = sources.expand(n, *shape)
    return targets, sources, t_tilt, s_tilt


def _coarse_then_local(coarse, searcher, grid, angular_step_degrees, refine_steps, advance) -> AlignmentResult:
    """Global grid search (with ``coarse``, maybe binned), then shrinking 3x3x3 local grids at full sampling."""
    n = searcher.targets_ft.shape[0]
    idx = torch.arange(n, device=grid.device)
    scores, shifts = coarse.score(grid.unsqueeze(0), advance)
    best = scores.argmax(dim=1)
    rot, shift, score = grid[best], shifts[idx, best], scores[idx, best]
    if coarse is not searcher:  # re-score the coarse winner at full sampling
        score, shift = (x[:, 0] for x in searcher.score(rot.unsqueeze(1)))
    for step in range(refine_steps):
        local = local_rotation_grid(angular_step_degrees / 2.0 ** (step + 1), grid.device, grid.dtype)
        candidates = local.unsqueeze(0) @ rot.unsqueeze(1)  # (n, 27, 3, 3)
        scores, shifts = searcher.score(candidates, advance)
        best = scores.argmax(dim=1)
        rot, shift, score = candidates[idx, best], shifts[idx, best], scores[idx, best]
    return AlignmentResult(rotations=rot, shifts=shift, scores=score)


def fourier_crop(volumes: torch.Tensor, factor: int) -> torch.Tensor:
    """Bin ``(b, d, h, w)`` volumes by ``factor`` by keeping the central ``(d, h, w) // factor`` frequencies
    (box centres ``N // 2`` stay aligned; values are rescaled to keep the mean)."""
    if factor == 1:
        return volumes
    shape = tuple(volumes.shape[-3:])
    small = tuple(n // factor for n in shape)
    spectrum = torch.fft.fftshift(torch.fft.fftn(volumes, dim=_DIMS), dim=_DIMS)
    crop = tuple(slice(n // 2 - m // 2, n // 2 - m // 2 + m) for n, m in zip(shape, small, strict=True))
    cropped = torch.fft.ifftshift(spectrum[(..., *crop)], dim=_DIMS)
    scale = math.prod(small) / math.prod(shape)
    return torch.fft.ifftn(cropped, dim=_DIMS).real.to(volumes.dtype) * scale


def _coarse_binning(requested: int | None, shape: tuple[int, int, int], lowpass: float) -> int:
    if requested is None:
        return 2 if lowpass <= 0.25 and min(shape) >= 24 else 1
    if requested < 1 or lowpass * requested > 0.5 + 1e-9 or min(shape) // requested < 4:
        raise ValueError(f"coarse_binning must be >= 1 with lowpass * binning <= 0.5 and a binned box >= 4, got "
                         f"{requested} (lowpass {lowpass}, box {shape})")
    return int(requested)


def align_to_reference(
    particles,
    reference,
    particle_tilt_range_degrees=60.0,
    reference_tilt_range_degrees=90.0,
    **options,
) -> AlignmentResult:
    """Pose of each particle relative to a reference: ``particle ~ transform_volumes(reference, R, t)``
    (reference rotated into the particle, RELION sense; :mod:`jimray.conventions`).

    ``particles`` ``(n, d, h, w)``; ``reference`` ``(d, h, w)`` (shared, rotated once per grid rotation) or
    ``(n, d, h, w)`` (one per particle). Tilt ranges: a number or ``(n,)`` degrees. ``options`` are those of
    :func:`align_pairs` (``angular_step_degrees=30``, ``refine_steps=4``, ``max_shift_voxels``,
    ``lowpass_cycles_per_voxel=0.25``, ``subvoxel``, ``chunk_size``, ``progress``).
    """
    return align_pairs(
        reference, particles, reference_tilt_range_degrees, particle_tilt_range_degrees, **options
    )


class _progress:
    """Context manager yielding ``advance(k)`` (or ``None``) backed by a rich progress bar when enabled."""

    def __init__(self, enabled: bool, total: int, label: str):
        self.enabled, self.total, self.label, self.bar = enabled, total, label, None

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.progress import Progress

        self.bar = Progress(transient=True)
        self.bar.start()
        task = self.bar.add_task(self.label, total=self.total)
        return lambda k: self.bar.advance(task, k)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False
