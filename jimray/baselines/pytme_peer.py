"""pytme, an independent template-matching engine, as a peer of the constrained-CC search (issue 15).

`pytme <https://github.com/KosinskiLab/pyTME>`_ (PyPI ``pytme``, an optional benchmark dependency:
``pip install 'jimray[peer]'``) runs its own exhaustive search: every rotation of its own near-uniform set for an
angular step (360 rotations at 30 degrees, 1,992 at 15), every shift by FFT, scored by ``FLCSphericalMask``
(normalised cross-correlation, the target normalised locally under the template's mask). This module only
*calls* it (nothing of it is copied) and turns its answer into jimray's pose convention, the one of
:func:`jimray.baselines.search.align_pairs`: ``target ~ transform_volumes(source, R, t)``.

Conventions (checked by ``tests/test_pytme_peer.py`` on a noiseless pair)
----------------------------------------------------------------------
pytme rotates the template ``T`` on its ``(z, y, x)`` array as ``T_R(q) = T(R_p (q - c') + c')`` about
``c' = (N - 1) / 2`` (15.5 in a box of 32) and reports the shift ``s`` of the best translation (score-map index
minus ``N // 2``), so ``target(q) ~ T(R_p (q - s - c') + c')``. With ``P`` the axis reversal
``(z, y, x) <-> (x, y, z)`` and jimray's ``particle(x) = reference(R^T (x - c - t) + c)`` about ``c = N // 2``:

* ``R = P R_p^T P`` (:func:`rotation_to_ours`; its own inverse);
* ``t = P s + (R - I) d`` with ``d = c - c'`` (half a voxel on every even axis, :func:`shift_to_ours`).

Filters (pytme's own, :mod:`tme.filters`): ``wedge_filter="target"`` multiplies the rotated template's spectrum
by the *target's* wedge (``WedgeReconstructed``, continuous, tilt about y: equal to
:func:`jimray.fourier.masks.wedge_masks` inside the Nyquist sphere) and masks the target with it, as pytme's
``match_template`` does; it is made for a complete (wedge-free) reference, so with a wedged source the source's
own wedge stays in the template. ``wedge_filter="none"`` uses no wedge filter. A Gaussian low-pass
(``BandPassReconstructed``, half power at ``lowpass_cycles_per_voxel``, default 0.25: the band of our
search's score) goes on both, as ``match_template --lowpass`` does.

Speed: the ``numpyfftw`` backend (pyFFTW with one thread, pytme's setting) and one job: one CPU thread.
Rotations use cubic splines (``interpolation_order=3``, pytme's default). Pairs run one after another.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from jimray.baselines.search import AlignmentResult
from jimray.fourier.xcorr import peak_shifts

PYTME_VERSION = "0.3.6"
INSTALL_HINT = "pip install 'jimray[peer]'"
WEDGE_FILTERS = ("none", "target")
SCORE = "FLCSphericalMask"
_P = np.eye(3)[::-1]  # (z, y, x) <-> (x, y, z)


def require_pytme():
    """Import and return pytme's ``tme`` package, or raise an ImportError that says how to install it."""
    try:
        import tme
    except ImportError as exc:
        raise ImportError(f"pytme is not installed; the pytme peer of the benchmarks needs it: {INSTALL_HINT} "
                          f"(pytme=={PYTME_VERSION})") from exc
    return tme


def pytme_available() -> bool:
    """True when pytme can be imported."""
    try:
        require_pytme()
    except ImportError:
        return False
    return True


def pytme_rotations(angular_step_degrees: float) -> np.ndarray:
    """pytme's own rotation set for this step, ``(m, 3, 3)`` in *pytme's* convention (``(z, y, x)`` arrays):
    its optimised set nearest the step (30 degrees: 360 rotations, 15: 1,992)."""
    require_pytme()
    from tme.rotations import get_rotation_matrices

    return np.asarray(get_rotation_matrices(float(angular_step_degrees)), dtype=np.float64)


def rotation_to_ours(rotations: np.ndarray) -> np.ndarray:
    """pytme rotations ``(..., 3, 3)`` -> jimray's ``R = P R_p^T P`` (and back: the map is its own inverse)."""
    r = np.asarray(rotations, dtype=np.float64)
    return _P @ np.swapaxes(r, -1, -2) @ _P


def shift_to_ours(shift_xyz: np.ndarray, rotation: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """pytme's shift (voxels, already reordered to ``(x, y, z)``: ``P s``) and jimray's ``rotation (3, 3)`` ->
    jimray's ``t = P s + (R - I) d``, ``d = N // 2 - (N - 1) / 2`` per axis ``(x, y, z)`` of ``shape (d, h, w)``."""
    d = np.array([n // 2 - (n - 1) / 2.0 for n in shape[::-1]])
    return np.asarray(shift_xyz, dtype=np.float64) + (np.asarray(rotation, dtype=np.float64) - np.eye(3)) @ d


@dataclass
class PytmeOptions:
    """How pytme searches: its set for ``angular_step_degrees``; ``wedge_filter`` one of :data:`WEDGE_FILTERS`;
    Gaussian low-pass at ``lowpass_cycles_per_voxel`` (None: none); shifts within ``max_shift_voxels`` (None: a
    quarter of the box, as our search); parabolic sub-voxel peak (``subvoxel``); spline order of the rotation."""

    angular_step_degrees: float = 30.0
    wedge_filter: str = "target"
    lowpass_cycles_per_voxel: float | None = 0.25
    max_shift_voxels: float | None = None
    subvoxel: bool = True
    interpolation_order: int = 3

    def __post_init__(self):
        if self.wedge_filter not in WEDGE_FILTERS:
            raise ValueError(f"wedge_filter must be one of {WEDGE_FILTERS}, got {self.wedge_filter!r}")
        lp = self.lowpass_cycles_per_voxel
        if lp is not None and not 0 < lp <= 0.5:
            raise ValueError(f"lowpass_cycles_per_voxel must lie in (0, 0.5] or be None, got {lp}")


def _filters(tilt_range_degrees: float, options: PytmeOptions):
    """pytme ``Compose`` filters ``(template_filter, target_filter)`` (None where empty)."""
    from tme.filters import BandPassReconstructed, Compose, WedgeReconstructed

    parts = []
    if options.wedge_filter == "target" and tilt_range_degrees < 90.0:
        parts.append(WedgeReconstructed(angles=(tilt_range_degrees, tilt_range_degrees), weight_wedge=False,
                                        create_continuous_wedge=True, opening_axis=0, tilt_axis=2))
    if options.lowpass_cycles_per_voxel is not None:  # resolution in voxels at 1 A / voxel
        parts.append(BandPassReconstructed(lowpass=1.0 / options.lowpass_cycles_per_voxel, sampling_rate=1.0,
                                           use_gaussian=True))
    return (Compose(tuple(parts)), Compose(tuple(parts))) if parts else (None, None)


def match_one(source: np.ndarray, target: np.ndarray, tilt_range_degrees: float, rotations: np.ndarray,
              options: PytmeOptions) -> tuple[np.ndarray, np.ndarray, dict]:
    """One pytme exhaustive search of ``source`` (template, ``(d, h, w)``) in ``target`` over ``rotations``
    (pytme's convention): ``(scores (d, h, w), rotation index (d, h, w), index -> pytme rotation)``; score-map
    index ``N // 2`` on an axis is the zero shift."""
    require_pytme()
    from tme.analyzer import MaxScoreOverRotations
    from tme.backends import backend as be
    from tme.matching_data import MatchingData
    from tme.matching_exhaustive import match_exhaustive
    from tme.matching_scores import MATCHING_EXHAUSTIVE_REGISTER

    data = MatchingData(np.ascontiguousarray(target, dtype=np.float32),
                        np.ascontiguousarray(source, dtype=np.float32), rotations=rotations.astype(np.float32))
    data.template_filter, data.target_filter = _filters(tilt_range_degrees, options)
    setup, score = MATCHING_EXHAUSTIVE_REGISTER[SCORE]
    if be._backend_name != "numpyfftw":
        be.change_backend("numpyfftw")  # pyFFTW, one thread
    scores, _, index, mapping, _ = match_exhaustive(
        data, matching_score=score, matching_setup=setup, callback_class=MaxScoreOverRotations,
        job_schedule=(1, 1), interpolation_order=options.interpolation_order)
    return scores, index, mapping


def pose_from_scores(scores: np.ndarray, index: np.ndarray, mapping: dict, max_shift_voxels: float,
                     subvoxel: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """pytme's score and rotation-index maps ``(d, h, w)`` -> jimray pose ``(R (3, 3), t (3,), score)``: best
    shift within ``max_shift_voxels`` (:func:`jimray.fourier.xcorr.peak_shifts`, sub-voxel if asked), the
    rotation that scored it, both converted by :func:`rotation_to_ours` / :func:`shift_to_ours`."""
    shape = tuple(scores.shape)
    to_zero = ([-(n // 2) for n in shape], (0, 1, 2))  # roll so that index 0 is the zero shift
    cc = torch.from_numpy(np.roll(scores, *to_zero).astype(np.float64))
    score, whole = peak_shifts(cc, max_shift_voxels)
    peak = tuple(round(v) % n for v, n in zip(whole.tolist()[::-1], shape, strict=True))  # (z, y, x) index
    rotation = rotation_to_ours(mapping[int(np.roll(index, *to_zero)[peak])])
    if subvoxel:
        score, whole = peak_shifts(cc, max_shift_voxels, subvoxel=True)
    return rotation, shift_to_ours(whole.numpy(), rotation, shape), float(score)


def _as_tilts(tilt, n: int) -> np.ndarray:
    tilts = np.asarray(tilt, dtype=np.float64).reshape(-1)
    if tilts.size not in (1, n) or np.any((tilts <= 0) | (tilts > 90)):
        raise ValueError(f"target_tilt_range_degrees must be a number or ({n},) values in (0, 90], got {tilt}")
    return np.broadcast_to(tilts, (n,))


def _as_arrays(sources, targets) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``sources (1 or n, d, h, w)`` and ``targets (n, d, h, w)`` as numpy arrays, checked."""
    tgt = np.asarray(torch.as_tensor(targets).detach().cpu(), dtype=np.float32)
    src = np.asarray(torch.as_tensor(sources).detach().cpu(), dtype=np.float32)
    src = src[None] if src.ndim == 3 else src
    if tgt.ndim != 4 or src.shape[1:] != tgt.shape[1:] or src.shape[0] not in (1, tgt.shape[0]):
        raise ValueError(f"targets must be (n, d, h, w) and sources (d, h, w), (1, d, h, w) or (n, d, h, w) of the "
                         f"same box, got {tgt.shape} and {src.shape}")
    return src, tgt


def align_pairs_pytme(sources, targets, target_tilt_range_degrees=90.0, options: PytmeOptions | None = None,
                      **kwargs) -> AlignmentResult:
    """Pose ``(R, t)`` per pair with ``target ~ transform_volumes(source, R, t)`` (jimray/RELION sense), found by
    pytme's exhaustive search (:func:`match_one`, one pair at a time, one thread).

    ``sources``: ``(n, d, h, w)`` or one ``(d, h, w)`` / ``(1, d, h, w)`` volume shared by every target (the
    template; pytme assumes it complete); ``targets``: ``(n, d, h, w)``; ``target_tilt_range_degrees``: a number
    or ``(n,)`` (90 = no wedge). ``options`` (default :class:`PytmeOptions`), with any of its fields overridden
    by keyword. Returns CPU float32 tensors ``rotations (n, 3, 3)``, ``shifts (n, 3)`` (voxels, x y z) and
    pytme's ``scores (n,)``.
    """
    opts = replace(options or PytmeOptions(), **kwargs)
    src, tgt = _as_arrays(sources, targets)
    n, shape = tgt.shape[0], tgt.shape[1:]
    tilts = _as_tilts(target_tilt_range_degrees, n)
    grid = pytme_rotations(opts.angular_step_degrees)
    max_shift = min(shape) / 4.0 if opts.max_shift_voxels is None else float(opts.max_shift_voxels)
    poses = [pose_from_scores(*match_one(src[i % len(src)], tgt[i], tilts[i], grid, opts), max_shift, opts.subvoxel)
             for i in range(n)]
    rotations = np.array([p[0] for p in poses]).reshape(n, 3, 3)
    shifts = np.array([p[1] for p in poses]).reshape(n, 3)
    scores = np.array([p[2] for p in poses], dtype=np.float64).reshape(n)
    return AlignmentResult(rotations=torch.as_tensor(rotations, dtype=torch.float32),
                           shifts=torch.as_tensor(shifts, dtype=torch.float32),
                           scores=torch.as_tensor(scores, dtype=torch.float32))


def align_to_reference_pytme(particles, reference, particle_tilt_range_degrees=60.0,
                             options: PytmeOptions | None = None, **kwargs) -> AlignmentResult:
    """pytme in its intended use: each particle ``(n, d, h, w)`` searched with a wedge-free ``reference``
    (``(d, h, w)`` shared, or ``(n, d, h, w)``) as the template; ``particle ~ transform_volumes(reference, R, t)``.
    The default ``wedge_filter="target"`` puts each particle's wedge on the rotated reference."""
    return align_pairs_pytme(reference, particles, particle_tilt_range_degrees, options, **kwargs)


def rotation_count(angular_step_degrees: float) -> int:
    """Rotations in pytme's set for this step."""
    return int(pytme_rotations(angular_step_degrees).shape[0])

