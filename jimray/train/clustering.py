"""(b) of a round: PCA + Gaussian mixture over the embeddings that stay on the workers.

Only sufficient statistics (and a bounded seeding sample) cross the wire, through the reducer. With K unset
it is chosen by BIC over the candidates (one mixture at ``pca_dims``). By default (``gmm.consensus_dims``) the
clusters are the consensus of an ensemble of mixtures over several PCA sizes (:mod:`jimray.cluster.consensus`),
stored as one diagonal mixture on the whitened embedding (the M-step of the consensus labels) so that
``jimray predict`` reproduces them. Without the consensus and with a fixed K the mixture is warm-started from
last round's clusters (their means in this round's PCA space).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from jimray.cluster.consensus import consensus_mixture, select_k
from jimray.cluster.gmm import GaussianMixture
from jimray.cluster.keys import gather_smallest_keys, id_keys
from jimray.cluster.pca import PCAState, whitened_projection
from jimray.cluster.reduce import LocalReducer, Reducer
from jimray.cluster.select import fit_best_k, gmm_kwargs
from jimray.config import GMMConfig

KChooser = Callable[[Callable[[int], np.ndarray]], tuple[int, list[dict]]]


@dataclass
class ClusterState:
    """A round's clustering: local labels (n,), K, global BIC and the fitted GMM and PCA (as objects)."""

    labels: np.ndarray
    n_clusters: int
    bic: float
    gmm: GaussianMixture | None
    pca: PCAState | None

    @property
    def gmm_state(self) -> dict | None:
        return None if self.gmm is None else self.gmm.get_state()

    @property
    def pca_state(self) -> dict | None:
        return None if self.pca is None else self.pca.get_state()

    def with_labels(self, labels: np.ndarray) -> ClusterState:
        return replace(self, labels=labels)

    @classmethod
    def from_checkpoint(cls, state) -> ClusterState:
        gmm = GaussianMixture.from_state(state.gmm_state) if state.gmm_state else None
        pca = PCAState.from_state(state.pca_state) if state.pca_state else None
        return cls(np.zeros(0, np.int64), state.n_clusters, float("nan"), gmm, pca)


def _means_from_labels(z: torch.Tensor, labels: np.ndarray, k: int, reducer: Reducer) -> torch.Tensor | None:
    """Global per-cluster means of ``z`` under last round's labels, or None if a cluster is empty."""
    onehot = torch.zeros((z.shape[0], k), dtype=z.dtype)
    onehot[torch.arange(z.shape[0]), torch.as_tensor(labels)] = 1.0
    stats = reducer.all_reduce_sum(torch.cat([onehot.T @ z, onehot.sum(0, keepdim=True).T], dim=1))
    counts = stats[:, -1:]
    if bool((counts < 1).any()):
        return None
    return stats[:, :-1] / counts


def cluster_embeddings(
    embeddings: torch.Tensor,
    config: GMMConfig,
    reducer: Reducer,
    previous_labels: np.ndarray | None,
    previous_k: int | None,
    choose_k: KChooser | None = None,
    ids: np.ndarray | None = None,
) -> ClusterState:
    """Fit PCA + GMM on the global set of embeddings; returns local labels (before matching to last round).
    ``choose_k(labels_for) -> (K, table)`` picks K (when ``config.n_components`` is None) from the partitions
    ``labels_for(K)`` of the consensus rule, e.g. by held-out class averages (``gmm.k_selection: distinct``,
    :func:`jimray.train.frame_step.frame_k_chooser`); without it K is chosen by held-out likelihood. ``ids``
    (n,) of the local rows: the consensus is fitted on the rows in id order, so that it does not depend on how
    the rows are spread over the workers or ordered on them."""
    if config.consensus_dims:
        return _consensus(embeddings, config, config.n_components, reducer, choose_k, ids)
    z, pca = whitened_projection(embeddings, config.pca_dims, reducer)
    kwargs = gmm_kwargs(config)
    if config.n_components is None:
        gmm, _table = fit_best_k(z, config.candidates, reducer=reducer, **kwargs)
    else:
        means = None
        if previous_labels is not None and previous_k == config.n_components:
            means = _means_from_labels(z, previous_labels, config.n_components, reducer)
        if means is not None:
            kwargs["n_init"] = 1
        gmm = GaussianMixture(config.n_components, means_init=means, **kwargs).fit(z, reducer=reducer)
    labels = np.asarray(gmm.predict(z), dtype=np.int64)
    return ClusterState(labels, gmm.n_components, float(gmm.bic(z, reducer=reducer)), gmm, pca)


def _consensus(embeddings: torch.Tensor, config: GMMConfig, k: int | None, reducer: Reducer,
               choose_k: KChooser | None = None, ids: np.ndarray | None = None) -> ClusterState:
    """K clusters (K chosen by ``choose_k`` or :func:`select_k` when None) by the consensus of the ensemble, as
    one diagonal mixture on the whitened embedding. With ``ids``, at most ``gmm.init_sample`` rows chosen by id
    are gathered to every rank and fitted there (identically, no collective per EM step: the ensemble runs
    thousands of them; :func:`_fitting_set`), and the fitted rule labels every row; without ids a larger set is
    fitted with all-reduced statistics."""
    fit_rows, fit_reducer = _fitting_set(embeddings, config, reducer, ids)
    kwargs = _member_kwargs(config)
    rules: dict[int, tuple[np.ndarray, GaussianMixture, PCAState, torch.Tensor]] = {}

    def rule(kk: int) -> tuple[np.ndarray, GaussianMixture, PCAState, torch.Tensor]:
        if kk not in rules:
            rules[kk] = _consensus_rule(embeddings, fit_rows, fit_reducer, kk, config, reducer, kwargs)
        return rules[kk]

    if k is None and choose_k is not None:
        k, _table = choose_k(lambda kk: rule(kk)[0])
    elif k is None:
        k, _table = select_k(fit_rows, config.candidates, config.consensus_dims, config.consensus_seeds,
                             seed=config.seed, reducer=fit_reducer, restarts=config.consensus_restarts,
                             score_dims=config.selection_pca_dims, **kwargs)
        k = int(reducer.broadcast(torch.tensor([k], dtype=torch.int64))[0]) if reducer.world_size > 1 else k
    labels, gmm, pca, z = rule(k)
    return ClusterState(labels, k, float(gmm.bic(z, reducer=reducer)), gmm, pca)


def _consensus_rule(embeddings: torch.Tensor, fit_rows: torch.Tensor, fit_reducer: Reducer, k: int,
                    config: GMMConfig, reducer: Reducer, kwargs: dict
                    ) -> tuple[np.ndarray, GaussianMixture, PCAState, torch.Tensor]:
    """The consensus mixture of ``k`` clusters fitted on ``fit_rows``, identical on every rank (broadcast from
    rank 0), the local labels ``(n,)`` it gives ``embeddings`` and their projection ``z``."""
    _, gmm, pca = consensus_mixture(fit_rows, k, config.consensus_dims, config.consensus_seeds, seed=config.seed,
                                    reducer=fit_reducer, restarts=config.consensus_restarts, **kwargs)
    if reducer.world_size > 1:  # every rank must hold the same rule (and K: the heads are resized by it)
        gmm.means_, gmm.covariances_, gmm.weights_ = (reducer.broadcast(t.contiguous()) for t in
                                                      (gmm.means_, gmm.covariances_, gmm.weights_))
        gmm.precisions_cholesky_ = reducer.broadcast(gmm.precisions_cholesky_.contiguous())
        pca = PCAState(reducer.broadcast(pca.mean.contiguous()), reducer.broadcast(pca.components.contiguous()),
                       reducer.broadcast(pca.explained_variance.contiguous()), pca.n_samples, pca.backend)
    z = torch.as_tensor(pca.transform(embeddings.double()))
    return np.asarray(gmm.predict(z), dtype=np.int64), gmm, pca, z


def _fitting_set(embeddings: torch.Tensor, config: GMMConfig, reducer: Reducer, ids: np.ndarray | None = None
                 ) -> tuple[torch.Tensor, Reducer]:
    """The rows the consensus is fitted on, and the reducer to fit them with.

    With ``ids`` (n,) of the local rows: the ``gmm.init_sample`` rows with the smallest seeded hash of their id
    (every row of a smaller set), on every rank, in id order, with a local reducer: the fit depends on the set
    of ids alone, not on how Ray Data spread and ordered the rows. Without ids: every rank's rows on every rank
    when the set is small (one process: its rows), else the local rows with ``reducer``."""
    x = embeddings.double()
    if ids is None:
        n_total = int(reducer.all_reduce_sum(torch.tensor([float(x.shape[0])], dtype=torch.float64))[0])
        if n_total > config.init_sample and reducer.world_size > 1:
            return x, reducer
        if reducer.world_size > 1:
            x = reducer.gather_sample(x, n_total, torch.Generator().manual_seed(config.seed))
        return x, LocalReducer() if reducer.world_size > 1 else reducer
    if len(ids) and np.abs(np.asarray(ids, dtype=np.int64)).max() >= 2**53:
        raise ValueError("subtomogram ids must be below 2^53 (they are ordered as float64 on the way to every "
                         "rank); renumber the particles (jimray ingest assigns 0..n-1)")
    rows = torch.cat([torch.as_tensor(np.asarray(ids, dtype=np.float64))[:, None], x], dim=1)  # exact below 2^53
    rows = gather_smallest_keys(rows, config.init_sample, reducer, torch.Generator().manual_seed(config.seed),
                                lambda r: id_keys(r[:, 0].numpy().astype(np.int64), config.seed))
    rows = rows[torch.argsort(rows[:, 0], stable=True)]  # id order
    return rows[:, 1:], LocalReducer() if reducer.world_size > 1 else reducer


def _member_kwargs(config: GMMConfig) -> dict:
    """Settings of the consensus members (diagonal mixtures; at least 5 starts and 300 EM iterations)."""
    return {"n_init": max(config.n_init, 5), "max_iter": max(config.max_iter, 300), "tol": config.tol,
            "init_sample": config.init_sample}
