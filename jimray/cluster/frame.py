"""Common-frame embedding: describe every subtomogram by how well it aligns onto a bank of references.

A mixture fitted to particles in random orientations sees mostly their orientation. Aligned onto common
references they differ only by structure: a particle's vector of best aligned scores (over a rotation grid and
all shifts, :func:`jimray.align.multiref.score_references`) against ``R`` references does not depend on its
orientation, and particles of one structure score alike against every reference. That vector, centred per
particle and standardised per reference, is the *frame embedding* the Gaussian mixture clusters.

The references are found without templates or labels, by **mode seeking** (one step per training round):

1. **seeds** (round 1): ``R`` particles chosen by k-means++ on alignment-free, rotation-invariant features
   (:func:`jimray.cluster.invariant.invariant_features`, whitened PCA), so the seeds span sizes and shapes;
2. **update**: every reference takes its own ``m`` best-scoring particles over the whole data set (an
   overlapping selection, not a partition: a blurred average cannot draw every particle into one part, which
   is what a hard multi-reference partition does on similar small structures), aligns them with the poses
   just found and averages them, missing-wedge aware (:class:`jimray.average.WedgeAccumulator`). Each
   reference climbs toward the structure its members share.

References are masked by a soft sphere (``mask_radius_fraction`` of the box) before scoring: noise outside
the particle adds only chance correlation.

Everything works on data spread over workers: the seed sample, the per-reference selection threshold and
the per-reference average sums go through a :class:`jimray.cluster.reduce.Reducer`; every rank then holds
the same references; scores stay with the rank that holds the particle. Kernels only: torch and numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from jimray.align.multiref import ReferenceScores, score_references
from jimray.average.wedge_average import WedgeAccumulator
from jimray.cluster.pca import whitened_projection
from jimray.cluster.reduce import Reducer, all_reduce_spectra, as_reducer
from jimray.cluster.seeding import kmeans_plusplus
from jimray.geometry.rigid import voxel_grid

__all__ = ["FrameOptions", "FrameStats", "spherical_mask", "normalised_volumes", "masked_references",
           "choose_seeds", "gather_volumes",
           "frame_scores", "update_references", "frame_embedding", "apply_frame_stats"]


@dataclass(frozen=True)
class FrameOptions:
    """Settings of the common-frame embedding (the ``frame`` section of a job, :class:`jimray.config.FrameConfig`).

    ``n_references`` R; ``members_per_reference`` m (particles averaged into each reference per update);
    alignment: ``angular_step_degrees`` grid over SO(3), shifts up to ``max_shift_voxels``, scores over
    frequencies up to ``lowpass_cycles_per_voxel``; ``mask_radius_fraction`` of the box edge; ``seed``."""

    n_references: int = 45
    members_per_reference: int = 15
    angular_step_degrees: float = 30.0
    lowpass_cycles_per_voxel: float = 0.25
    max_shift_voxels: float = 4.0
    mask_radius_fraction: float = 0.33
    wiener_floor: float = 1.0
    seed: int = 0


@dataclass
class FrameStats:
    """Global per-reference mean and standard deviation ``(R,)`` of the particle-centred scores (fitted on the
    training data; :func:`apply_frame_stats` reuses them so that prediction sees the training embedding)."""

    mean: torch.Tensor
    std: torch.Tensor

    def get_state(self) -> dict:
        return {"mean": self.mean.cpu().clone(), "std": self.std.cpu().clone()}

    @classmethod
    def from_state(cls, state: dict) -> FrameStats:
        return cls(torch.as_tensor(state["mean"]).double(), torch.as_tensor(state["std"]).double())


def spherical_mask(shape: tuple[int, int, int], radius_voxels: float, edge_voxels: float = 4.0) -> torch.Tensor:
    """Soft spherical mask ``(d, h, w)`` about the box centre: 1 inside ``radius - edge/2``, a linear edge of
    ``edge_voxels``, 0 outside."""
    if radius_voxels <= 0 or edge_voxels <= 0:
        raise ValueError(f"mask radius and edge must be > 0 voxels, got {radius_voxels} and {edge_voxels}")
    radius = voxel_grid(tuple(shape)).norm(dim=-1)
    return ((radius_voxels + edge_voxels / 2 - radius) / edge_voxels).clamp(0.0, 1.0)


def normalised_volumes(volumes: torch.Tensor) -> torch.Tensor:
    """Each volume of ``(n, d, h, w)`` at zero mean and unit standard deviation."""
    mean = volumes.mean(dim=(-3, -2, -1), keepdim=True)
    return (volumes - mean) / volumes.std(dim=(-3, -2, -1), keepdim=True).clamp_min(1e-12)


def choose_seeds(features: torch.Tensor, ids: np.ndarray, n_seeds: int, seed: int = 0, pca_dims: int | None = 8,
                 sample: int = 20000, reducer: Reducer | None = None) -> np.ndarray:
    """Ids of ``n_seeds`` particles spread over the data: k-means++ on whitened PCA of ``features (n, f)`` over
    a bounded global sample (identical on every rank) -> ``(n_seeds,)`` int64 ids."""
    reducer = as_reducer(reducer)
    z, _ = whitened_projection(features.double(), pca_dims, reducer)
    rows = torch.cat([torch.as_tensor(np.asarray(ids, dtype=np.float64))[:, None], z.double()], dim=1)
    generator = torch.Generator().manual_seed(int(seed))
    pool = reducer.gather_sample(rows, sample, generator)
    pool = pool[torch.argsort(pool[:, 0], stable=True)]  # id order: the seeds do not hang on how rows are spread
    if pool.shape[0] < n_seeds:
        raise ValueError(f"the common frame needs at least n_references={n_seeds} subtomograms, got "
                         f"{pool.shape[0]}: lower --set frame.n_references")
    centres = kmeans_plusplus(pool[:, 1:], n_seeds, generator)
    picked = torch.cdist(centres, pool[:, 1:]).argmin(dim=1)  # the centres are rows of the pool
    return pool[picked, 0].round().long().numpy()


def gather_volumes(volumes: torch.Tensor, ids: np.ndarray, wanted: np.ndarray, reducer: Reducer | None = None
                   ) -> torch.Tensor:
    """The volumes of the ``wanted`` ids ``(k, d, h, w)``, identical on every rank (each id's owner adds it)."""
    reducer = as_reducer(reducer)
    ids = np.asarray(ids, dtype=np.int64)
    out = torch.zeros((len(wanted), *volumes.shape[-3:]), dtype=torch.float32)
    found = torch.zeros(len(wanted), dtype=torch.float64)
    for j, wanted_id in enumerate(np.asarray(wanted, dtype=np.int64)):
        hit = np.flatnonzero(ids == wanted_id)
        if len(hit):
            out[j] = volumes[int(hit[0])].float()
            found[j] = 1.0
    found = reducer.all_reduce_sum(found)
    if bool((found != 1).any()):
        raise ValueError(f"ids {np.asarray(wanted)[found.numpy() != 1][:5].tolist()} are held by no rank or by "
                         "several; subtomogram ids must be unique (re-ingest the data)")
    return reducer.all_reduce_sum(out)


def masked_references(references: torch.Tensor, options: FrameOptions) -> torch.Tensor:
    """References ``(R, d, h, w)`` as every frame score sees them: times the soft sphere of
    ``options.mask_radius_fraction`` of the box, then normalised (:func:`normalised_volumes`)."""
    shape = tuple(references.shape[-3:])
    mask = spherical_mask(shape, options.mask_radius_fraction * min(shape)).to(references.dtype)
    return normalised_volumes(references.float() * mask)


def frame_scores(volumes: torch.Tensor, tilts, references: torch.Tensor, options: FrameOptions,
                 reference_tilt_range_degrees: float = 90.0) -> ReferenceScores:
    """Best aligned score, rotation and shift of every particle ``(n, d, h, w)`` against every reference
    ``(R, d, h, w)`` (masked); ``reference_tilt_range_degrees`` < 90 when the references are single particles."""
    return score_references(normalised_volumes(volumes.float()), masked_references(references, options), tilts,
                            angular_step_degrees=options.angular_step_degrees,
                            max_shift_voxels=options.max_shift_voxels,
                            lowpass_cycles_per_voxel=options.lowpass_cycles_per_voxel,
                            reference_tilt_range_degrees=reference_tilt_range_degrees)


def _selection_thresholds(centred: torch.Tensor, m: int, reducer: Reducer) -> torch.Tensor:
    """Per reference the ``m``-th largest centred score over all ranks ``(R,)``."""
    r = centred.shape[1]
    local = torch.full((reducer.world_size, m, r), -torch.inf, dtype=torch.float64)
    top = torch.topk(centred.double(), min(m, centred.shape[0]), dim=0).values
    local[reducer.rank, : top.shape[0]] = top
    gathered = reducer.all_reduce_sum(torch.where(torch.isinf(local), torch.zeros_like(local), local))
    valid = reducer.all_reduce_sum(torch.isfinite(local).double())
    pooled = torch.where(valid > 0, gathered, torch.full_like(gathered, -torch.inf)).reshape(-1, r)
    return torch.topk(pooled, m, dim=0).values[-1]


def update_references(volumes: torch.Tensor, tilts, scores: ReferenceScores, options: FrameOptions,
                      previous: torch.Tensor, reducer: Reducer | None = None) -> torch.Tensor:
    """One mode-seeking step: every reference becomes the wedge-aware average of its ``m`` best-scoring particles
    over all ranks (scores centred per particle, so a particle counts where it scores *relatively* well), each
    aligned by its pose against that reference. ``previous (R, d, h, w)`` is kept where too few particles exist.
    Returns ``(R, d, h, w)``, identical on every rank."""
    reducer = as_reducer(reducer)
    n_total = int(reducer.all_reduce_sum(torch.tensor([float(volumes.shape[0])])).item())
    m = min(options.members_per_reference, n_total)
    if m < 1:
        return previous
    centred = scores.scores - scores.scores.mean(dim=1, keepdim=True)
    threshold = _selection_thresholds(centred, m, reducer)
    shape = tuple(volumes.shape[-3:])
    d, h, w = shape
    r = centred.shape[1]
    tilts = torch.as_tensor(np.asarray(tilts, dtype=np.float32).reshape(-1)).expand(volumes.shape[0])
    spectra = torch.zeros((r, d, h, w // 2 + 1), dtype=torch.complex128)
    weights = torch.zeros((r, d, h, w // 2 + 1), dtype=torch.float64)
    for j in range(r):
        members = torch.nonzero(centred[:, j].double() >= threshold[j]).flatten()
        if len(members) == 0:
            continue
        acc = WedgeAccumulator(shape).add(volumes[members].float(), scores.rotations[members, j],
                                          scores.shifts[members, j], tilts[members])
        spectra[j], weights[j] = acc.spectrum_sum.to(torch.complex128), acc.weight_sum.double()
    spectra, weights = all_reduce_spectra(spectra, weights, reducer)
    refs = torch.fft.irfftn(spectra / weights.clamp_min(options.wiener_floor), s=shape, dim=(-3, -2, -1)).float()
    empty = weights.sum(dim=(1, 2, 3)) == 0
    refs[empty] = previous[empty].float()
    return refs


def frame_embedding(scores: ReferenceScores, reducer: Reducer | None = None) -> tuple[torch.Tensor, FrameStats]:
    """The embedding the mixture clusters, ``(n, R)`` float64: scores centred per particle, then standardised per
    reference with global statistics (returned, for :func:`apply_frame_stats`)."""
    reducer = as_reducer(reducer)
    centred = scores.scores.double() - scores.scores.double().mean(dim=1, keepdim=True)
    sums = reducer.all_reduce_sum(torch.cat([centred.sum(0), centred.square().sum(0),
                                             torch.tensor([float(centred.shape[0])], dtype=torch.float64)]))
    r = centred.shape[1]
    n = max(float(sums[-1]), 1.0)
    mean = sums[:r] / n
    std = (sums[r : 2 * r] / n - mean.square()).clamp_min(0).sqrt().clamp_min(1e-12)
    stats = FrameStats(mean, std)
    return apply_frame_stats(scores.scores, stats), stats


def apply_frame_stats(scores: torch.Tensor, stats: FrameStats) -> torch.Tensor:
    """Embedding ``(n, R)`` of raw scores ``(n, R)`` with fitted :class:`FrameStats`."""
    centred = scores.double() - scores.double().mean(dim=1, keepdim=True)
    return (centred - stats.mean.to(centred.device)) / stats.std.to(centred.device)
