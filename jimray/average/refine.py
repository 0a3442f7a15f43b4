"""Template refinement per cluster and gold-standard half maps (pure torch/numpy).

Refinement (as in the paper): start from a template (the wedge-weighted average under the current poses, one
member, or the members' plain mean), align every member to it, average the members under their new poses, and
repeat with that average as the target for a few iterations.

Gold standard: the cluster is split into two halves *by particle id* (:func:`split_halves`: deterministic for a
seed, balanced), each half is refined on its own from its own members, and the FSC between the two half maps
(under a soft spherical mask) measures the resolution. The full map averages both halves' particles.

The aligner is any callable ``aligner(particles (n, d, h, w), reference (d, h, w), tilt_range_degrees (n,),
rotations (n, 3, 3), shifts (n, 3)) -> (rotations, shifts)`` returning poses with particle ~
``transform_volumes(reference, R, t)``; the incoming poses are the current estimate (a local search may start
there). :func:`classical_aligner` wraps the exhaustive search of :mod:`jimray.baselines.search`; Jim-Net poses
can be plugged in the same way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from jimray.average.wedge_average import WedgeAccumulator, align_to_reference_frame
from jimray.conventions import compose_poses
from jimray.fourier.fsc import fsc, soft_spherical_mask

__all__ = [
    "Aligner",
    "RefinementResult",
    "GoldStandardResult",
    "classical_aligner",
    "local_aligner",
    "split_halves",
    "refine_template",
    "gold_standard_refine",
    "default_mask",
]

Aligner = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]
INITIAL_TEMPLATES = ("poses", "first", "mean")


@dataclass
class RefinementResult:
    """Outcome of :func:`refine_template`: the final average and weight (``(d, h, w)``), the members' final
    poses, the accumulator holding them, and per iteration the correlation of the new template with the old
    one (1.0 means converged)."""

    average: torch.Tensor
    weight: torch.Tensor
    rotations: torch.Tensor
    shifts: torch.Tensor
    accumulator: WedgeAccumulator
    history: list[float] = field(default_factory=list)


@dataclass
class GoldStandardResult:
    """Outcome of :func:`gold_standard_refine` for one cluster."""

    average: torch.Tensor  # (d, h, w) from all members
    half_maps: torch.Tensor  # (2, d, h, w)
    fsc: torch.Tensor  # (n_shells,) masked FSC between the half maps (shell k at k / box cycles/voxel)
    halves: np.ndarray  # (n,) 0 or 1: the half of each member
    rotations: torch.Tensor  # (n, 3, 3) final poses, members in input order
    shifts: torch.Tensor  # (n, 3)
    mask: torch.Tensor  # (d, h, w) the soft spherical mask used for the FSC


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.double() - a.double().mean()
    b = b.double() - b.double().mean()
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator > 0 else 0.0


def default_mask(shape: tuple[int, int, int], radius_voxels: float | None = None, device=None) -> torch.Tensor:
    """Soft spherical mask for a box: radius ``min(shape) // 2 - edge - 1`` unless given, edge ``max(2, N / 10)``."""
    n = min(shape)
    edge = max(2.0, n / 10.0)
    radius = float(radius_voxels) if radius_voxels is not None else max(1.0, n // 2 - edge - 1)
    return soft_spherical_mask(tuple(shape), radius, edge, device=device)


def split_halves(ids: Sequence, seed: int = 0) -> np.ndarray:
    """Deterministic, balanced random halves ``(n,)`` of 0/1 from particle ids (any values with ``str``).

    Each id is hashed with the seed (BLAKE2b of ``"seed:id"``); particles sorted by that hash alternate
    between half 0 and half 1. The same ids and seed always give the same halves, independent of input order;
    the halves differ in size by at most one.
    """
    keys = [hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).hexdigest() for i in ids]
    if len(set(map(str, ids))) != len(keys):
        raise ValueError("particle ids must be unique to split a cluster into gold-standard halves")
    order = np.argsort(np.array(keys), kind="stable")
    halves = np.empty(len(keys), dtype=np.int64)
    halves[order] = np.arange(len(keys)) % 2
    return halves


def classical_aligner(angular_step_degrees: float = 30.0, **search_options) -> Aligner:
    """An :data:`Aligner` running :func:`jimray.baselines.search.align_to_reference` (global SO(3) grid of
    ``angular_step_degrees`` plus its local refinement; it takes no starting pose, so the incoming poses are
    not used) against the wedge-free template; ``search_options`` (``max_shift_voxels``,
    ``lowpass_cycles_per_voxel``, ``refine_steps``, ``chunk_size``, ...) go to it unchanged."""

    def align(particles, reference, tilt_range_degrees, rotations, shifts):
        from jimray.baselines.search import align_to_reference

        result = align_to_reference(
            particles, reference, tilt_range_degrees, 90.0, angular_step_degrees=angular_step_degrees,
            **search_options,
        )
        return result.rotations.to(particles.device), result.shifts.to(particles.device)

    return align


def local_aligner(
    half_width_degrees: float = 15.0,
    rounds: int = 3,
    *,
    max_shift_voxels: float | None = None,
    lowpass_cycles_per_voxel: float = 0.25,
    subvoxel: bool = True,
    chunk_size: int = 256,
) -> Aligner:
    """An :data:`Aligner` refining each incoming pose locally (much cheaper than a global search when the
    poses are already close, e.g. from Jim-Net or a previous iteration).

    Each of ``rounds`` rounds scores 27 rotations around the current one (rotation vectors on the cube
    ``{-h, 0, h}^3`` left-multiplied, :func:`jimray.baselines.search.local_rotation_grid`; ``h`` starts at
    ``half_width_degrees`` and halves every round) with the FFT translational search of the missing-wedge
    constrained correlation (:mod:`jimray.fourier.xcorr`; particle wedge AND low-pass, the template being
    wedge-free), shifts within ``max_shift_voxels`` (default a quarter of the box) of the box centre. The
    current rotation is among the candidates, so a round never loses score at its best shift.
    """
    if rounds < 1 or not half_width_degrees > 0:
        raise ValueError(f"need rounds >= 1 and half_width_degrees > 0, got {rounds} and {half_width_degrees}")

    def align(particles, reference, tilt_range_degrees, rotations, shifts):
        rotations = rotations.to(particles.device, particles.dtype)
        new_r, new_t = rotations.clone(), shifts.to(particles.device, particles.dtype).clone()
        per_chunk = max(1, chunk_size // 27)
        for start in range(0, particles.shape[0], per_chunk):
            sl = slice(start, start + per_chunk)
            new_r[sl], new_t[sl] = _local_search(particles[sl], reference, tilt_range_degrees[sl], rotations[sl],
                                                 half_width_degrees, rounds, max_shift_voxels,
                                                 lowpass_cycles_per_voxel, subvoxel)
        return new_r, new_t

    return align


def _local_search(particles, reference, tilt, rotations, half_width, rounds, max_shift, lowpass, subvoxel):
    from jimray.baselines.search import local_rotation_grid
    from jimray.fourier.masks import lowpass_mask, wedge_masks
    from jimray.fourier.xcorr import constrained_xcorr_all_shifts, mask_to_rfft, peak_shifts
    from jimray.geometry.rigid import transform_volumes

    n, shape = particles.shape[0], tuple(particles.shape[-3:])
    device, dtype = particles.device, particles.dtype
    max_shift = min(shape) / 4.0 if max_shift is None else float(max_shift)
    keep = (wedge_masks(shape, tilt.to(device), device=device) > 0.5) & (lowpass_mask(shape, lowpass, device) > 0.5)
    mask = mask_to_rfft(keep.to(dtype)).unsqueeze(1)  # (n, 1, ...)
    target = torch.fft.rfftn(particles, dim=(-3, -2, -1)).unsqueeze(1)
    idx = torch.arange(n, device=device)
    shifts = torch.zeros(n, 3, device=device, dtype=dtype)
    for k in range(rounds):
        candidates = local_rotation_grid(half_width / 2.0**k, device, dtype).unsqueeze(0) @ rotations.unsqueeze(1)
        flat = candidates.reshape(n * 27, 3, 3)
        rotated = transform_volumes(reference.to(dtype).expand(n * 27, *shape), flat)
        source = torch.fft.rfftn(rotated, dim=(-3, -2, -1)).reshape(n, 27, *target.shape[-3:])
        cc = constrained_xcorr_all_shifts(target, source, mask, shape)
        scores, cand_shifts = peak_shifts(cc, max_shift, subvoxel)
        best = scores.argmax(dim=1)
        rotations, shifts = candidates[idx, best], cand_shifts[idx, best]
    return rotations, shifts


def _check_members(particles, tilt_range_degrees, rotations, shifts) -> torch.Tensor:
    if particles.ndim != 4 or particles.shape[0] == 0:
        raise ValueError(f"particles must be (n, d, h, w) with n >= 1, got {tuple(particles.shape)}")
    n = particles.shape[0]
    if rotations.shape != (n, 3, 3) or shifts.shape != (n, 3):
        raise ValueError(f"need rotations (n, 3, 3) and shifts (n, 3) with n={n}, got "
                         f"{tuple(rotations.shape)} and {tuple(shifts.shape)}")
    tilt = torch.as_tensor(tilt_range_degrees, dtype=torch.float32).reshape(-1)
    return tilt.expand(n).clone() if tilt.numel() == 1 else tilt


def _accumulate(particles, rotations, shifts, tilt) -> WedgeAccumulator:
    acc = WedgeAccumulator(tuple(particles.shape[1:]), device=particles.device, dtype=torch.float32)
    return acc.add(particles, rotations, shifts, tilt)


def _initial_template(particles, rotations, shifts, tilt, initial: str, wiener_floor: float) -> torch.Tensor:
    if initial == "poses":
        return _accumulate(particles, rotations, shifts, tilt).result(wiener_floor)[0]
    if initial == "first":
        return align_to_reference_frame(particles[:1], rotations[:1], shifts[:1])[0]
    return particles.mean(dim=0)


def refine_template(
    particles: torch.Tensor,
    tilt_range_degrees: torch.Tensor | float,
    rotations: torch.Tensor,
    shifts: torch.Tensor,
    *,
    aligner: Aligner | None,
    iterations: int = 3,
    initial: str = "poses",
    mask: torch.Tensor | None = None,
    wiener_floor: float = 1.0,
) -> RefinementResult:
    """Iterative template estimation for one cluster.

    ``particles (n, d, h, w)``, tilt ranges scalar or ``(n,)`` (degrees), current poses ``rotations (n, 3, 3)``
    and ``shifts (n, 3)`` (voxels, particle ~ reference moved by ``(R, t)``). The template starts as
    ``initial``: ``"poses"`` (wedge-weighted average under the given poses), ``"first"`` (the first member,
    un-posed) or ``"mean"`` (plain mean of the members). Each of ``iterations`` rounds aligns all members to
    the template (times ``mask``, default :func:`default_mask`) with ``aligner`` and re-averages.
    ``aligner=None`` or ``iterations=0`` just averages under the given poses.
    """
    tilt = _check_members(particles, tilt_range_degrees, rotations, shifts)
    if initial not in INITIAL_TEMPLATES:
        raise ValueError(f"initial must be one of {INITIAL_TEMPLATES}, got {initial!r}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    rotations = rotations.to(particles.device, torch.float32)
    shifts = shifts.to(particles.device, torch.float32)
    if aligner is None or iterations == 0:
        acc = _accumulate(particles, rotations, shifts, tilt)
        average, weight = acc.result(wiener_floor)
        return RefinementResult(average, weight, rotations, shifts, acc, [])
    if mask is None:
        mask = default_mask(tuple(particles.shape[1:]), device=particles.device)
    template = _initial_template(particles, rotations, shifts, tilt, initial, wiener_floor)
    history: list[float] = []
    for _ in range(iterations):
        rotations, shifts = aligner(particles, template * mask, tilt, rotations, shifts)
        rotations = rotations.to(particles.device, torch.float32)
        shifts = shifts.to(particles.device, torch.float32)
        acc = _accumulate(particles, rotations, shifts, tilt)
        new_template, weight = acc.result(wiener_floor)
        history.append(_correlation(new_template * mask, template * mask))
        template = new_template
    return RefinementResult(template, weight, rotations, shifts, acc, history)


def _bring_into_frame_of(first, second, particles, tilt, halves, mask, aligner, wiener_floor) -> RefinementResult:
    """Re-express the half ``second`` (started from its own template) in the frame of ``first``: align its map
    to the first map (``second ~ first moved by (R, t)``) and compose that pose into its members' poses."""
    eye = torch.eye(3, device=particles.device).unsqueeze(0)
    zero = torch.zeros(1, 3, device=particles.device)
    ninety = torch.full((1,), 90.0)
    r, t = aligner(second.average.unsqueeze(0), first.average * mask, ninety, eye, zero)
    k = second.rotations.shape[0]
    rotations, shifts = compose_poses(r.expand(k, 3, 3).to(particles.device), t.expand(k, 3).to(particles.device),
                                      second.rotations, second.shifts)
    members = torch.as_tensor(np.flatnonzero(halves == 1), device=particles.device)
    acc = _accumulate(particles[members], rotations, shifts, tilt[members])
    average, weight = acc.result(wiener_floor)
    return RefinementResult(average, weight, rotations, shifts, acc, second.history)


def gold_standard_refine(
    particles: torch.Tensor,
    tilt_range_degrees: torch.Tensor | float,
    rotations: torch.Tensor,
    shifts: torch.Tensor,
    ids: Sequence,
    *,
    aligner: Aligner | None,
    iterations: int = 3,
    initial: str = "poses",
    seed: int = 0,
    mask_radius_voxels: float | None = None,
    halves: np.ndarray | None = None,
    wiener_floor: float = 1.0,
) -> GoldStandardResult:
    """Refine the two id-halves of one cluster independently (:func:`refine_template`) and compare them.

    ``ids (n,)`` name the members (for :func:`split_halves` with ``seed``), unless ``halves (n,)`` of 0/1 is
    given (e.g. RELION's ``rlnRandomSubset - 1``). A cluster of one particle puts it in both halves (the FSC
    is then meaningless: 1 everywhere). The FSC uses a soft spherical mask of radius ``mask_radius_voxels``
    (default :func:`default_mask`), which also masks the templates during alignment. With ``initial`` other
    than ``"poses"`` the halves start from different templates, so half 1 is then aligned onto half 0 and its
    poses re-expressed in half 0's frame before the FSC and the merge.
    """
    tilt = _check_members(particles, tilt_range_degrees, rotations, shifts)
    n = particles.shape[0]
    if len(ids) != n:
        raise ValueError(f"need one id per particle: {len(ids)} ids for {n} particles")
    halves = split_halves(ids, seed) if halves is None else np.asarray(halves, dtype=np.int64)
    if halves.shape != (n,) or not np.isin(halves, (0, 1)).all():
        raise ValueError(f"halves must be (n,) = ({n},) values in {{0, 1}}")
    mask = default_mask(tuple(particles.shape[1:]), mask_radius_voxels, device=particles.device)
    final_r = rotations.to(particles.device, torch.float32).clone()
    final_t = shifts.to(particles.device, torch.float32).clone()
    results = []
    for h in (0, 1):
        members = np.flatnonzero(halves == h) if n > 1 else np.array([0])
        idx = torch.as_tensor(members, device=particles.device)
        res = refine_template(particles[idx], tilt[members], final_r[idx], final_t[idx], aligner=aligner,
                              iterations=iterations, initial=initial, mask=mask, wiener_floor=wiener_floor)
        final_r[idx], final_t[idx] = res.rotations, res.shifts
        results.append(res)
    if initial != "poses" and aligner is not None and n > 1:
        results[1] = _bring_into_frame_of(results[0], results[1], particles, tilt, halves, mask, aligner,
                                          wiener_floor)
        idx = torch.as_tensor(np.flatnonzero(halves == 1), device=particles.device)
        final_r[idx], final_t[idx] = results[1].rotations, results[1].shifts
    half_maps = torch.stack([r.average for r in results])
    curve = fsc(half_maps[0] * mask, half_maps[1] * mask)
    merged = results[0].accumulator if n == 1 else results[0].accumulator.merge(results[1].accumulator)
    average = merged.result(wiener_floor)[0]
    return GoldStandardResult(average, half_maps, curve, halves, final_r, final_t, mask)
