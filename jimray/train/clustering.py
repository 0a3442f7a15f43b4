"""(b) of a round: PCA + Gaussian mixture over the embeddings that stay on the workers.

Only sufficient statistics (and a bounded seeding sample) cross the wire, through the reducer. With K unset
it is chosen by BIC over the candidates (one mixture at ``pca_dims``). By default (``gmm.consensus_dims``) the
clusters are the consensus of an ensemble of mixtures over several PCA sizes (:mod:`jimray.cluster.consensus`),
stored as one diagonal mixture on the whitened embedding (the M-step of the consensus labels) so that
``jimray predict`` reproduces them. Without the consensus and with a fixed K the mixture is warm-started from
last round's clusters (their means in this round's PCA space).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from jimray.cluster.consensus import consensus_mixture
from jimray.cluster.gmm import GaussianMixture
from jimray.cluster.pca import PCAState, whitened_projection
from jimray.cluster.reduce import Reducer
from jimray.cluster.select import fit_best_k, gmm_kwargs
from jimray.config import GMMConfig


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
) -> ClusterState:
    """Fit PCA + GMM on the global set of embeddings; returns local labels (before matching to last round)."""
    z, pca = whitened_projection(embeddings, config.pca_dims, reducer)
    kwargs = gmm_kwargs(config)
    if config.n_components is None:
        gmm, _table = fit_best_k(z, config.candidates, reducer=reducer, **kwargs)
        if config.consensus_dims:
            return _consensus(embeddings, config, gmm.n_components, reducer)
    elif config.consensus_dims:
        return _consensus(embeddings, config, config.n_components, reducer)
    else:
        means = None
        if previous_labels is not None and previous_k == config.n_components:
            means = _means_from_labels(z, previous_labels, config.n_components, reducer)
        if means is not None:
            kwargs["n_init"] = 1
        gmm = GaussianMixture(config.n_components, means_init=means, **kwargs).fit(z, reducer=reducer)
    labels = np.asarray(gmm.predict(z), dtype=np.int64)
    return ClusterState(labels, gmm.n_components, float(gmm.bic(z, reducer=reducer)), gmm, pca)


def _consensus(embeddings: torch.Tensor, config: GMMConfig, k: int, reducer: Reducer) -> ClusterState:
    """K clusters by the consensus of the ensemble, as one diagonal mixture on the whitened embedding."""
    labels, gmm, pca = consensus_mixture(embeddings, k, config.consensus_dims, config.consensus_seeds,
                                         seed=config.seed, reducer=reducer, n_init=max(config.n_init, 5),
                                         max_iter=max(config.max_iter, 300), tol=config.tol,
                                         init_sample=config.init_sample)
    z = pca.transform(embeddings.double())
    return ClusterState(labels, k, float(gmm.bic(torch.as_tensor(z), reducer=reducer)), gmm, pca)
