"""K by held-out class averages: a split into clusters is kept only where the particles recognise it.

The field's test of whether two classes are really different is gold-standard: build each class's average
from half of its particles and ask the *other* half which average it matches. This module does that for every
pair of clusters of a candidate partition:

1. every cluster's members are split in two halves by a hash of their ids (no rank or position involved);
2. each half is averaged (wedge-aware, :class:`jimray.average.WedgeAccumulator`) in the frame of the cluster's
   best common-frame reference (the one its members score highest against, all ranks), under the poses the
   frame already found;
3. every particle is scored against the averages of the half it is *not* in, so no particle is scored against
   its own noise. By default (:func:`pose_half_scores`) from the pose it already has in each cluster's frame
   (the pose the half-averages were built with), refined locally, at full sampling; or
   (:func:`search_half_scores`) with a global search (rotation grid + all shifts,
   :func:`jimray.align.multiref.score_references`), which is affordable only Fourier-binned and tells the
   small structures apart less well;
4. for clusters ``a`` and ``b`` the paired difference ``score(own other-half average) - score(the other
   cluster's other-half average)`` over the members of both gives an effect size ``d`` (mean / standard
   deviation) and a t statistic (``d * sqrt(n)``).

Two clusters are *distinct* when ``t >= min_t`` (not chance) and ``d >= min_effect`` (not a small
systematic preference: splitting one structure by a nuisance such as the orientation to the missing wedge
gives half-averages that their own members prefer slightly, with ``d`` -0.3-0.56 on the benchmark sets, where
different structures give ``d`` 0.86-3.4 with the default scoring). :func:`distinct_k` scans the candidate K
and returns the largest whose every pair is distinct (BENCHMARKS.md, issue 12: the measurements behind the
two thresholds and the sets they were tried on).

Data may be spread over workers: averages and statistics go through a :class:`jimray.cluster.reduce.Reducer`.
Kernels only: torch and numpy.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from jimray.align.multiref import ReferenceScores
from jimray.average.wedge_average import WedgeAccumulator
from jimray.cluster.reduce import Reducer, all_reduce_spectra, as_reducer

__all__ = ["PairTest", "id_halves", "cluster_frames", "class_half_averages", "pose_half_scores", "search_half_scores",
           "half_counts", "pair_distinctness", "distinct_k"]

HalfScores = Callable[[torch.Tensor, object, torch.Tensor, torch.Tensor, np.ndarray], torch.Tensor]

MIN_T = 4.0
MIN_EFFECT = 0.6
MIN_HALF = 2  # members a cluster needs in each half to be verified at all


@dataclass
class PairTest:
    """Per pair of clusters ``(K, K)`` (symmetric; the diagonal is +inf): ``t`` statistics, effect sizes
    ``effect`` and the number of particles ``count`` behind them."""

    t: np.ndarray
    effect: np.ndarray
    count: np.ndarray

    def distinct(self, min_t: float = MIN_T, min_effect: float = MIN_EFFECT) -> bool:
        """Whether every pair of clusters is distinct (True for one cluster)."""
        off = ~np.eye(self.t.shape[0], dtype=bool)
        return bool(np.all((self.t[off] >= min_t) & (self.effect[off] >= min_effect)))

    def weakest(self) -> tuple[int, int, float, float]:
        """``(a, b, t, effect)`` of the pair with the smallest effect size."""
        eff = self.effect.copy()
        np.fill_diagonal(eff, np.inf)
        a, b = np.unravel_index(np.argmin(eff), eff.shape)
        return int(a), int(b), float(self.t[a, b]), float(self.effect[a, b])


def id_halves(ids: Sequence, seed: int = 0) -> np.ndarray:
    """Half ``(n,)`` (0 or 1) of each particle from a hash of ``"seed:id"``: the same id always falls in the
    same half, wherever it is held."""
    return np.array([hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=1).digest()[0] & 1 for i in ids],
                    dtype=np.int64)


def cluster_frames(scores: torch.Tensor, labels: np.ndarray, k: int, reducer: Reducer | None = None) -> np.ndarray:
    """Per cluster the common-frame reference whose frame its averages use ``(K,)``: the one with the highest
    mean score ``scores (n, R)`` over the cluster's members on all ranks."""
    reducer = as_reducer(reducer)
    onehot = torch.zeros((scores.shape[0], k), dtype=torch.float64)
    onehot[torch.arange(scores.shape[0]), torch.as_tensor(labels, dtype=torch.long)] = 1.0
    sums = reducer.all_reduce_sum(onehot.T @ scores.double())  # (K, R)
    return sums.argmax(dim=1).numpy()


def class_half_averages(volumes: torch.Tensor, tilts, labels: np.ndarray, halves: np.ndarray, k: int,
                        scores: ReferenceScores, reducer: Reducer | None = None, wiener_floor: float = 1.0,
                        frames: np.ndarray | None = None) -> torch.Tensor:
    """Wedge-aware averages ``(K, 2, d, h, w)`` of every cluster's two halves, each in the frame of the
    cluster's reference ``frames (K,)`` (default :func:`cluster_frames`) under the poses of ``scores``
    (``(n, R)`` against the common-frame references). ``volumes (n, d, h, w)``, tilt ranges (a number or
    ``(n,)``), local ``labels`` and ``halves`` ``(n,)``. A half without members stays zero. Identical on every
    rank."""
    reducer = as_reducer(reducer)
    shape = tuple(volumes.shape[-3:])
    d, h, w = shape
    best = cluster_frames(scores.scores, labels, k, reducer) if frames is None else np.asarray(frames)
    tilt = torch.as_tensor(np.asarray(tilts, dtype=np.float32).reshape(-1)).expand(volumes.shape[0])
    spectra = torch.zeros((k, 2, d, h, w // 2 + 1), dtype=torch.complex128)
    weights = torch.zeros((k, 2, d, h, w // 2 + 1), dtype=torch.float64)
    for c in range(k):
        for half in (0, 1):
            members = np.flatnonzero((labels == c) & (halves == half))
            if len(members) == 0:
                continue
            j = int(best[c])
            acc = WedgeAccumulator(shape).add(volumes[members].float(), scores.rotations[members, j],
                                              scores.shifts[members, j], tilt[members])
            spectra[c, half], weights[c, half] = acc.spectrum_sum.to(torch.complex128), acc.weight_sum.double()
    spectra, weights = all_reduce_spectra(spectra, weights, reducer)
    return torch.fft.irfftn(spectra / weights.clamp_min(wiener_floor), s=shape, dim=(-3, -2, -1)).float()


def pose_half_scores(lowpass_cycles_per_voxel: float = 0.25, max_shift_voxels: float = 4.0,
                     refine_degrees: float = 10.0) -> HalfScores:
    """The default scorer of the test: ``score(volumes (n, d, h, w), tilts, averages (K, 2, d, h, w), rotations
    (n, K, 3, 3), halves (n,)) -> (n, K)``, every particle against the average of the half it is not in of
    every cluster, starting from its pose in that cluster's frame (``rotations``, from the frame).

    The pose is refined against that average (27 rotations within ``refine_degrees``, Fourier-binned, as
    :func:`jimray.align.multiref.refine_poses`; 0 = none), which cannot fit the particle's own noise: it is not
    in that half. The score is then taken at full sampling up to ``lowpass_cycles_per_voxel`` with a shift
    search (:func:`jimray.align.multiref.score_at_poses`): the small structures differ in the band near the
    low-pass that a binned rotation damps, where the frame's grid search runs (BENCHMARKS.md, issue 12)."""
    from jimray.align.multiref import fourier_binning, refine_poses, score_at_poses, tilt_vector
    from jimray.baselines.search import fourier_crop

    def score(volumes: torch.Tensor, tilts, averages: torch.Tensor, rotations: torch.Tensor,
              halves: np.ndarray) -> torch.Tensor:
        n, k = volumes.shape[0], averages.shape[0]
        out = torch.zeros((n, k))
        if n == 0:  # a worker without rows still takes part in every reduction
            return out
        volumes, tilt = volumes.float(), tilt_vector(tilts, n)
        binning = fourier_binning(tuple(volumes.shape[-3:]), lowpass_cycles_per_voxel)
        small = fourier_crop(volumes, binning)
        small_avg = fourier_crop(averages.reshape(2 * k, *averages.shape[-3:]), binning)
        small_avg = small_avg.reshape(k, 2, *small.shape[-3:])
        # the particles scored against each half's average: those of the other half
        scored = [torch.as_tensor(np.flatnonzero(np.asarray(halves) == 1 - half), dtype=torch.long) for half in (0, 1)]
        for c in range(k):
            for half, p in enumerate(scored):
                if len(p) == 0:
                    continue
                rot = rotations[p, c].float()
                if refine_degrees > 0:
                    rot, _, _ = refine_poses(small[p], small_avg[c, half][None], torch.zeros(len(p), dtype=torch.long),
                                             rot, tilt[p], start_degrees=refine_degrees, steps=1,
                                             max_shift_voxels=max_shift_voxels / binning,
                                             lowpass_cycles_per_voxel=lowpass_cycles_per_voxel * binning)
                value, _ = score_at_poses(volumes[p], averages[c, half][None], rot[:, None], tilt[p],
                                          max_shift_voxels=max_shift_voxels,
                                          lowpass_cycles_per_voxel=lowpass_cycles_per_voxel)
                out[p, c] = value[:, 0]
        return out

    return score


def search_half_scores(search: Callable[[torch.Tensor, object, torch.Tensor], torch.Tensor]) -> HalfScores:
    """A scorer (as :func:`pose_half_scores`) from a global search ``search(volumes, tilts, references (M, d, h,
    w)) -> (n, M)`` (e.g. :func:`jimray.cluster.frame.frame_scores`' ``.scores``): the poses are not used."""

    def score(volumes: torch.Tensor, tilts, averages: torch.Tensor, rotations: torch.Tensor,
              halves: np.ndarray) -> torch.Tensor:
        n, k = volumes.shape[0], averages.shape[0]
        both = search(volumes, tilts, averages.reshape(2 * k, *averages.shape[-3:])).reshape(n, k, 2)
        return both[torch.arange(n), :, torch.as_tensor(1 - np.asarray(halves), dtype=torch.long)]

    return score


def pair_distinctness(labels: np.ndarray, other_half_scores: torch.Tensor, reducer: Reducer | None = None
                      ) -> PairTest:
    """The paired test of every pair of clusters (module docstring) from this rank's ``other_half_scores (n,
    K)`` (every particle against the average of the half it is not in of every cluster, e.g. from
    :func:`pose_half_scores`) and local ``labels`` ``(n,)``. Statistics are summed over all ranks."""
    reducer = as_reducer(reducer)
    n, k = other_half_scores.shape
    sums = torch.zeros((3, k, k), dtype=torch.float64)  # count, sum, sum of squares of the paired differences
    if n:
        other = other_half_scores.double()
        own = torch.as_tensor(labels, dtype=torch.long)
        diff = other.gather(1, own[:, None]) - other  # (n, K): own cluster minus each cluster
        onehot = torch.zeros((n, k), dtype=torch.float64)
        onehot[torch.arange(n), own] = 1.0
        sums = torch.stack([onehot.T @ torch.ones_like(diff), onehot.T @ diff, onehot.T @ diff.square()])
    sums = reducer.all_reduce_sum(sums)
    count = sums[0] + sums[0].T  # members of a and of b, each measured against the other cluster
    mean = (sums[1] + sums[1].T) / count.clamp_min(1.0)
    var = ((sums[2] + sums[2].T) / count.clamp_min(1.0) - mean.square()).clamp_min(1e-24)
    effect = (mean / var.sqrt()).numpy()
    t = effect * np.sqrt(count.numpy())
    too_few = count.numpy() < 3  # too few particles to tell two clusters apart
    effect[too_few], t[too_few] = -np.inf, -np.inf
    np.fill_diagonal(effect, np.inf)
    np.fill_diagonal(t, np.inf)
    return PairTest(t, effect, count.numpy())


def half_counts(labels: np.ndarray, halves: np.ndarray, k: int, reducer: Reducer | None = None) -> np.ndarray:
    """Members of every cluster in each half over all ranks ``(K, 2)``."""
    counts = torch.zeros((k, 2), dtype=torch.float64)
    np.add.at(counts.numpy(), (np.asarray(labels, dtype=np.int64), np.asarray(halves, dtype=np.int64)), 1.0)
    return as_reducer(reducer).all_reduce_sum(counts).numpy().astype(np.int64)


def distinct_k(candidates: Sequence[int], labels_for: Callable[[int], np.ndarray], volumes: torch.Tensor, tilts,
               ids: Sequence, scores: ReferenceScores, score: HalfScores | None = None,
               reducer: Reducer | None = None, min_t: float = MIN_T, min_effect: float = MIN_EFFECT, seed: int = 0
               ) -> tuple[int, list[dict]]:
    """The largest K among ``candidates`` whose partition ``labels_for(K)`` (local labels ``(n,)``) has every
    pair of clusters distinct (:class:`PairTest`) and every cluster at least :data:`MIN_HALF` members in each
    half (a smaller cluster cannot be verified, so its partition does not count as distinct). The scan goes up
    from the smallest K and stops after two failing K above the last that passed (larger K only split
    further); K above half the particles (over all ranks) is not tried. Returns ``(K, table)`` with one row
    per K tried (``k``, ``distinct``, the weakest pair's ``t`` and ``effect``); the smallest candidate when
    none passes. ``score``: a half-average scorer (default :func:`pose_half_scores`). All ranks agree (every
    statistic is reduced)."""
    reducer = as_reducer(reducer)
    score = pose_half_scores() if score is None else score
    ks = sorted({int(k) for k in candidates})
    if not ks or ks[0] < 1:
        raise ValueError(f"candidates must be positive integers, got {list(candidates)}")
    n_total = int(reducer.all_reduce_sum(torch.tensor([float(volumes.shape[0])], dtype=torch.float64))[0])
    ks = [k for k in ks if k <= max(1, n_total // 2)] or ks[:1]
    halves = id_halves(ids, seed)
    table: list[dict] = []
    chosen, fails_after_pass = ks[0], 0
    for k in ks:
        labels = np.asarray(labels_for(k), dtype=np.int64)
        frames = cluster_frames(scores.scores, labels, k, reducer)
        averages = class_half_averages(volumes, tilts, labels, halves, k, scores, reducer, frames=frames)
        other = score(volumes, tilts, averages, scores.rotations[:, torch.as_tensor(frames, dtype=torch.long)], halves)
        test = pair_distinctness(labels, other, reducer)
        ok = test.distinct(min_t, min_effect) and bool((half_counts(labels, halves, k, reducer) >= MIN_HALF).all())
        a, b, t, effect = test.weakest() if k > 1 else (0, 0, math.inf, math.inf)
        table.append({"k": k, "distinct": ok, "weakest_pair": [a, b], "t": t, "effect": effect})
        if ok:
            chosen, fails_after_pass = k, 0
        elif any(row["distinct"] for row in table):
            fails_after_pass += 1
            if fails_after_pass >= 2:
                break
    return chosen, table
