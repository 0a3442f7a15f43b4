"""Multi-reference alignment (MRA) as Dynamo / STOPGAP / RELION users run it on subtomograms.

``K`` references are initialised from a starting partition (k-means on PCA of the raw particles, or random
disjoint subsets): one particle of each part (default) or each part's unaligned wedge-aware average; then each
iteration

1. aligns every particle to every reference with the constrained-CC search of
   :func:`jimray.baselines.search.align_to_reference` (a starting particle reference carries its own wedge;
   the averages are wedge-compensated, tilt range 90 = no wedge);
2. assigns each particle to the reference with the best score;
3. re-averages each class in the reference frame, missing-wedge aware
   (:func:`jimray.average.wedge_average.wedge_weighted_average`: each particle brought back with the inverse
   pose, its spectrum accumulated with its wedge rotated by the same inverse rotation, the sum divided by the
   weight sum floored at ``wiener_floor``).

All ``iterations`` run (the references keep sharpening after the assignments settle); ``changed`` records how
many assignments changed in each. An empty class keeps its previous reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from jimray.average.wedge_average import wedge_weighted_average
from jimray.baselines.pca_cluster import pca_kmeans
from jimray.baselines.search import AlignmentResult, align_to_reference


@dataclass
class MRAResult:
    """``labels (n,)`` int64 numpy; pose of each particle relative to its class reference
    (``particle ~ transform_volumes(references[label], R, t)``): ``rotations (n, 3, 3)``, ``shifts (n, 3)``;
    ``references (K, d, h, w)``; ``scores (n,)`` best constrained correlation; ``changed`` per iteration."""

    labels: np.ndarray
    rotations: torch.Tensor
    shifts: torch.Tensor
    references: torch.Tensor
    scores: torch.Tensor
    changed: list[int] = field(default_factory=list)


def _class_averages(particles, tilts, labels, rotations, shifts, n_classes, wiener_floor, previous=None):
    refs = []
    for k in range(n_classes):
        members = torch.as_tensor(np.flatnonzero(labels == k), device=particles.device)
        if members.numel() == 0:
            if previous is None:
                raise ValueError(f"class {k} has no particle at initialisation; use fewer classes")
            refs.append(previous[k])
            continue
        average, _ = wedge_weighted_average(particles[members], rotations[members], shifts[members],
                                            tilts[members], wiener_floor=wiener_floor)
        refs.append(average)
    return torch.stack(refs)


def _initial_labels(particles, n_classes: int, init: str, seed: int, n_components: int) -> np.ndarray:
    n = particles.shape[0]
    if init == "pca_kmeans":
        return pca_kmeans(particles, n_classes, n_components=n_components, seed=seed)
    if init == "random":
        rng = np.random.default_rng(seed)
        return (rng.permutation(n) % n_classes).astype(np.int64)
    raise ValueError(f"init must be 'pca_kmeans' or 'random', got {init!r}")


def _initial_references(particles, tilts, labels, n_classes, kind: str, seed: int, wiener_floor: float):
    """Starting references ``(K, d, h, w)`` and their tilt ranges from a partition ``labels``."""
    if kind == "average":
        n = particles.shape[0]
        eye = torch.eye(3, dtype=particles.dtype, device=particles.device).expand(n, 3, 3)
        zero = torch.zeros(n, 3, dtype=particles.dtype, device=particles.device)
        return _class_averages(particles, tilts, labels, eye, zero, n_classes, wiener_floor), [90.0] * n_classes
    if kind != "particle":
        raise ValueError(f"init_references must be 'particle' or 'average', got {kind!r}")
    rng = np.random.default_rng(seed)
    picks = []
    for k in range(n_classes):
        members = np.flatnonzero(labels == k)
        if len(members) == 0:
            raise ValueError(f"class {k} has no particle at initialisation; use fewer classes")
        picks.append(int(rng.choice(members)))
    return particles[picks].clone(), [float(tilts[i]) for i in picks]


def multi_reference_alignment(
    particles,
    tilt_range_degrees,
    n_classes: int,
    iterations: int = 5,
    *,
    angular_step_degrees: float = 30.0,
    seed: int = 0,
    init: str = "pca_kmeans",
    init_references: str = "particle",
    initial_references=None,
    n_components: int = 10,
    wiener_floor: float = 1.0,
    progress: bool = False,
    **search_options,
) -> MRAResult:
    """Classify and align ``particles`` ``(n, d, h, w)`` (tilt ranges: a number or ``(n,)`` degrees) into
    ``n_classes`` classes with ``iterations`` rounds of MRA (see the module docstring).

    ``init``: the starting partition, ``"pca_kmeans"`` (k-means on PCA of the raw voxels) or ``"random"``
    (random disjoint subsets). ``init_references``: ``"particle"`` (one seeded random member of each part, with
    its own wedge: alignment to a real particle gives consistent poses, so the next average is sharp) or
    ``"average"`` (wedge-weighted average of each part, unaligned: nearly featureless, so MRA tends to stay at
    a blurred fixed point). ``initial_references`` ``(K, d, h, w)`` (no wedge) overrides both. ``search_options`` go
    to :func:`jimray.baselines.search.align_to_reference` (``refine_steps``, ``max_shift_voxels``,
    ``lowpass_cycles_per_voxel``, ``subvoxel``, ``chunk_size``).
    """
    particles = torch.as_tensor(particles)
    if particles.ndim != 4:
        raise ValueError(f"particles must be (n, d, h, w), got shape {tuple(particles.shape)}")
    if not torch.is_floating_point(particles):
        particles = particles.float()
    n, shape = particles.shape[0], tuple(particles.shape[-3:])
    if not 1 <= n_classes <= n or iterations < 1:
        raise ValueError(f"need 1 <= n_classes <= n ({n}) and iterations >= 1, got {n_classes}, {iterations}")
    tilts = torch.as_tensor(tilt_range_degrees, dtype=particles.dtype, device=particles.device).reshape(-1)
    tilts = tilts.expand(n).contiguous() if tilts.numel() == 1 else tilts
    if tilts.shape != (n,):
        raise ValueError(f"tilt_range_degrees must be a number or have shape ({n},), got {tuple(tilts.shape)}")
    if initial_references is not None:
        refs = torch.as_tensor(initial_references, dtype=particles.dtype, device=particles.device)
        if refs.shape != (n_classes, *shape):
            raise ValueError(f"initial_references must be ({n_classes}, {shape}), got {tuple(refs.shape)}")
        labels, ref_tilts = np.full(n, -1, dtype=np.int64), [90.0] * n_classes
    else:
        labels = _initial_labels(particles, n_classes, init, seed, n_components)
        refs, ref_tilts = _initial_references(particles, tilts, labels, n_classes, init_references, seed,
                                              wiener_floor)
    changed: list[int] = []
    for _ in range(iterations):
        results = [
            align_to_reference(particles, refs[k], tilts, ref_tilts[k], angular_step_degrees=angular_step_degrees,
                               progress=progress, **search_options)
            for k in range(n_classes)
        ]
        best = _best_class(results)
        new_labels = best.cpu().numpy().astype(np.int64)
        changed.append(int((new_labels != labels).sum()))
        labels = new_labels
        rot, shift, score = _gather(results, best)
        refs = _class_averages(particles, tilts, labels, rot, shift, n_classes, wiener_floor, previous=refs)
        ref_tilts = [90.0] * n_classes  # wedge-compensated averages from here on
    return MRAResult(labels=labels, rotations=rot, shifts=shift, references=refs, scores=score, changed=changed)


def _best_class(results: list[AlignmentResult]) -> torch.Tensor:
    return torch.stack([r.scores for r in results], dim=1).argmax(dim=1)


def _gather(results: list[AlignmentResult], best: torch.Tensor):
    idx = torch.arange(best.shape[0], device=best.device)
    rot = torch.stack([r.rotations for r in results], dim=1)[idx, best]
    shift = torch.stack([r.shifts for r in results], dim=1)[idx, best]
    score = torch.stack([r.scores for r in results], dim=1)[idx, best]
    return rot, shift, score
