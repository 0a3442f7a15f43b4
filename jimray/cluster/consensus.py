"""Consensus of an ensemble of Gaussian mixtures: one clustering that does not hinge on a PCA setting.

A single mixture on a PCA projection of the embedding depends on how many dimensions it keeps: on the
common-frame embedding, 4 dimensions are best at one noise level and 12-16 at another, and a setting that
finds every class on one set of structures merges two on another (BENCHMARKS.md, issue 12). The consensus
does not choose: it fits ``M`` diagonal mixtures (every PCA size of ``dims`` x ``n_seeds`` seeds), encodes each
point by its ``M`` labels (one-hot, ``M * K`` columns) and clusters those codes by k-means. The squared
distance between two codes is twice the number of members that split the two points, so k-means minimises
the disagreement with the ensemble (evidence accumulation), in ``O(n M K)`` memory: no ``n x n`` matrix.

The consensus labels are then turned into one mixture (:meth:`GaussianMixture.fit_labels`: the M-step of the
labels, no further EM) on the whitened embedding, so that a checkpoint stores one projection and one mixture, and
``jimray predict`` applies exactly the rule that gave the training labels.

K, when not given, is chosen by two-fold cross-validation (:func:`select_k`): the consensus is found on one
half of the points, its mixture scores the other half, and the K with the highest held-out log-likelihood wins.
BIC over one mixture picks 2-7 on the same data depending on the PCA size and covariance (BENCHMARKS.md); the
held-out likelihood needs no penalty term.

Everything runs on data spread over workers (statistics through a :class:`jimray.cluster.reduce.Reducer`).
Kernels only: torch and numpy.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from jimray.cluster.gmm import GaussianMixture
from jimray.cluster.pca import PCAState, whitened_projection
from jimray.cluster.reduce import Reducer, as_reducer
from jimray.cluster.seeding import kmeans_plusplus, squared_distances

__all__ = ["DEFAULT_DIMS", "ensemble_labels", "consensus_kmeans", "consensus_labels", "best_consensus",
           "consensus_mixture", "select_k"]

DEFAULT_DIMS = (4, 6, 8, 12, 16)


@contextmanager
def _threads_for(n_rows: int) -> Iterator[None]:
    """One torch thread while fitting small sets (thousands of tiny EM steps: threading costs more than it
    gives, 4x here on 240 x 30), the caller's setting otherwise; restored afterwards."""
    before = torch.get_num_threads()
    if n_rows <= 50000 and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ensemble_labels(embeddings: torch.Tensor, k: int, dims: Sequence[int] = DEFAULT_DIMS, n_seeds: int = 2,
                    seed: int = 0, reducer: Reducer | None = None, **gmm_kwargs) -> list[np.ndarray]:
    """Labels ``(n,)`` of every member: a diagonal mixture of ``k`` components on the whitened PCA projection
    of ``embeddings (n, f)`` to each size in ``dims`` (capped at ``f``; repeated sizes count once), for seeds
    ``seed .. seed + n_seeds - 1``. ``gmm_kwargs`` go to :class:`GaussianMixture` (covariance stays diagonal)."""
    if k < 1 or n_seeds < 1 or not dims or min(dims) < 1:
        raise ValueError(f"need k >= 1, n_seeds >= 1 and PCA sizes >= 1, got k={k}, n_seeds={n_seeds}, "
                         f"dims={list(dims)}")
    kwargs = {"reg_covar": 1e-3, "n_init": 5, "max_iter": 300} | gmm_kwargs | {"covariance_type": "diag"}
    out = []
    for d in sorted({min(int(d), embeddings.shape[1]) for d in dims}):
        z, _ = whitened_projection(embeddings, d, reducer)
        for s in range(n_seeds):
            gmm = GaussianMixture(k, random_state=seed + s, **kwargs).fit(z, reducer=reducer)
            out.append(np.asarray(gmm.predict(z), dtype=np.int64))
    return out


def _one_hot(labels: list[np.ndarray], k: int) -> torch.Tensor:
    n = len(labels[0]) if labels else 0
    codes = torch.zeros((n, len(labels) * k), dtype=torch.float64)
    for m, member in enumerate(labels):
        codes[torch.arange(n), m * k + torch.as_tensor(member, dtype=torch.long)] = 1.0
    return codes


def _lloyd(codes: torch.Tensor, centres: torch.Tensor, reducer: Reducer, n_iter: int) -> tuple[torch.Tensor, float]:
    """Distributed Lloyd iterations; returns the centres and the global inertia."""
    k = centres.shape[0]
    inertia = float("inf")
    for _ in range(n_iter):
        dist = squared_distances(codes, centres) if codes.shape[0] else torch.zeros((0, k), dtype=codes.dtype)
        labels = dist.argmin(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, labels, codes)
        counts = torch.bincount(labels, minlength=k).to(codes.dtype)
        local_inertia = dist.gather(1, labels[:, None]).sum() if codes.shape[0] else codes.new_zeros(())
        packed = reducer.all_reduce_sum(torch.cat([sums.flatten(), counts, local_inertia.reshape(1)]))
        sums, counts = packed[: sums.numel()].reshape(sums.shape), packed[sums.numel() : -1]
        new_inertia = float(packed[-1])
        keep = counts > 0
        new = centres.clone()
        new[keep] = sums[keep] / counts[keep, None]
        converged = torch.equal(new, centres) or new_inertia >= inertia
        centres, inertia = new, min(inertia, new_inertia)
        if converged:
            break
    return centres, inertia


def consensus_kmeans(labels: list[np.ndarray], k: int, n_init: int = 20, seed: int = 0, sample: int = 20000,
                     n_iter: int = 50, reducer: Reducer | None = None) -> np.ndarray:
    """k-means with ``k`` clusters on the one-hot codes of the members' ``labels`` (each ``(n,)``, values in
    ``[0, k)``): ``n_init`` k-means++ starts on a bounded global sample (identical on every rank), Lloyd on all
    rows, lowest inertia kept. Returns the local consensus labels ``(n,)`` int64."""
    if not labels:
        raise ValueError("consensus_kmeans needs at least one member's labels")
    reducer = as_reducer(reducer)
    codes = _one_hot(labels, k)
    generator = torch.Generator().manual_seed(int(seed))
    pool = reducer.gather_sample(codes, sample, generator)
    if pool.shape[0] < k:
        raise ValueError(f"only {pool.shape[0]} points in total for {k} clusters: need at least K points")
    best = None
    for _ in range(n_init):
        centres, inertia = _lloyd(codes, kmeans_plusplus(pool, k, generator), reducer, n_iter)
        if best is None or inertia < best[1] - 1e-9:
            best = (centres, inertia)
    if codes.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    return squared_distances(codes, best[0]).argmin(dim=1).numpy().astype(np.int64)


def consensus_labels(embeddings: torch.Tensor, k: int, dims: Sequence[int] = DEFAULT_DIMS, n_seeds: int = 2,
                     seed: int = 0, reducer: Reducer | None = None, **gmm_kwargs) -> np.ndarray:
    """Consensus clustering of ``embeddings (n, f)`` into ``k`` clusters (members by :func:`ensemble_labels`,
    combined by :func:`consensus_kmeans`); local labels ``(n,)`` int64."""
    with _threads_for(embeddings.shape[0]):
        members = ensemble_labels(embeddings, k, dims, n_seeds, seed, reducer, **gmm_kwargs)
        return consensus_kmeans(members, k, seed=seed, reducer=reducer)


def _labels_mixture(z: torch.Tensor, labels: np.ndarray, k: int, reducer: Reducer | None) -> GaussianMixture:
    """The M-step mixture (diagonal) of ``labels`` on the whitened embedding ``z``."""
    return GaussianMixture(k, covariance_type="diag", reg_covar=1e-3).fit_labels(z, labels, reducer=reducer)


def best_consensus(embeddings: torch.Tensor, z: torch.Tensor, k: int, dims: Sequence[int] = DEFAULT_DIMS,
                   n_seeds: int = 2, seed: int = 0, restarts: int = 1, reducer: Reducer | None = None,
                   **gmm_kwargs) -> tuple[np.ndarray, GaussianMixture]:
    """The best of ``restarts`` consensus clusterings of ``embeddings (n, f)`` (each with its own seeds:
    ``seed + 10 * i``): the one whose M-step mixture has the highest mean log-likelihood on the whitened
    embedding ``z (n, f)`` (all ranks), as the ``n_init`` starts of a mixture keep the best bound. One consensus
    can settle in a partition that merges two structures and splits a third (BENCHMARKS.md, issue 12): its
    mixture then fits the data clearly worse. Returns ``(labels (n,), mixture)``."""
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    best = None
    for i in range(restarts):
        labels = consensus_labels(embeddings, k, dims, n_seeds, seed + 10 * i, reducer, **gmm_kwargs)
        gmm = _labels_mixture(z, labels, k, reducer)
        score = gmm.score(z, reducer)
        if best is None or score > best[0] + 1e-12:
            best = (score, labels, gmm)
    return best[1], best[2]


def consensus_mixture(embeddings: torch.Tensor, k: int, dims: Sequence[int] = DEFAULT_DIMS, n_seeds: int = 2,
                      seed: int = 0, reducer: Reducer | None = None, restarts: int = 1, **gmm_kwargs
                      ) -> tuple[np.ndarray, GaussianMixture, PCAState]:
    """The consensus as one rule: ``(labels (n,), mixture, projection)`` where the mixture is the M-step of the
    consensus labels (diagonal, on the whitened embedding of every dimension) and ``labels`` its ``predict``, so
    ``mixture.predict(projection.transform(x))`` gives the same labels for the same embeddings. With
    ``restarts`` > 1 the best of that many consensus clusterings (:func:`best_consensus`) is kept."""
    z, pca = whitened_projection(embeddings, None, reducer)
    _, gmm = best_consensus(embeddings, z, k, dims, n_seeds, seed, restarts, reducer, **gmm_kwargs)
    return np.asarray(gmm.predict(z), dtype=np.int64), gmm, pca


def select_k(embeddings: torch.Tensor, candidates: Sequence[int], dims: Sequence[int] = DEFAULT_DIMS,
             n_seeds: int = 2, seed: int = 0, reducer: Reducer | None = None, restarts: int = 1,
             score_dims: int | None = None, **gmm_kwargs) -> tuple[int, list[dict]]:
    """K among ``candidates`` by two-fold cross-validated log-likelihood of the consensus mixture on the whitened
    embedding ``(n, f)``: each point falls in a fold by a seeded draw (per rank); for each fold the consensus and
    its M-step mixture are fitted on the other fold and score this one (the best of ``restarts`` consensus
    clusterings of the fitting fold, :func:`best_consensus`), on the whitened PCA projection to ``score_dims``
    (None: every dimension). Returns ``(K, table)`` with one row
    ``{"k", "heldout_loglik"}`` (summed over all points) per candidate tried; all ranks agree."""
    reducer = as_reducer(reducer)
    ks = sorted({int(k) for k in candidates})
    if not ks or ks[0] < 1:
        raise ValueError(f"candidates must be positive integers, got {list(candidates)}")
    generator = torch.Generator().manual_seed(int(seed) * 1000003 + reducer.rank)
    fold = torch.rand(embeddings.shape[0], generator=generator) < 0.5
    z, _ = whitened_projection(embeddings, score_dims, reducer)
    counts = reducer.all_reduce_sum(torch.tensor([float(fold.sum()), float((~fold).sum())], dtype=torch.float64))
    table = []
    for k in ks:
        if k > counts.min():
            continue
        total = 0.0
        for train, n_held_out in ((fold, counts[1]), (~fold, counts[0])):
            _, gmm = best_consensus(embeddings[train], z[train], k, dims, n_seeds, seed, restarts, reducer,
                                    **gmm_kwargs)
            total += gmm.score(z[~train], reducer) * float(n_held_out)
        table.append({"k": k, "heldout_loglik": total})
    if not table:
        raise ValueError(f"every candidate K in {ks} exceeds the points of a cross-validation fold "
                         f"({int(counts.min())}): pass smaller candidates")
    return max(table, key=lambda row: row["heldout_loglik"])["k"], table
