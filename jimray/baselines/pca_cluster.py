"""Alignment-free clustering baselines: k-means and a Gaussian mixture on the PCA of raw voxels (CPU, sklearn).

Each volume is flattened, standardised (zero mean, unit variance per volume, so contrast and offset do not
drive the clusters), projected on its first ``n_components`` principal components, and clustered.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture


def pca_features(volumes, n_components: int = 10, seed: int = 0) -> np.ndarray:
    """PCA scores ``(n, k)`` of standardised, flattened volumes ``(n, d, h, w)``; ``k = min(n_components, n)``."""
    x = volumes.detach().cpu().numpy() if torch.is_tensor(volumes) else np.asarray(volumes)
    if x.ndim != 4 or x.shape[0] < 2:
        raise ValueError(f"volumes must be (n, d, h, w) with n >= 2, got shape {x.shape}")
    if n_components < 1:
        raise ValueError(f"n_components must be >= 1, got {n_components}")
    flat = x.reshape(x.shape[0], -1).astype(np.float64)
    if not np.isfinite(flat).all():
        raise ValueError("volumes contain NaN or infinite voxels; clean the input volumes first")
    flat = flat - flat.mean(axis=1, keepdims=True)
    flat = flat / np.maximum(flat.std(axis=1, keepdims=True), 1e-12)
    k = min(n_components, flat.shape[0], flat.shape[1])
    return PCA(n_components=k, random_state=seed).fit_transform(flat)


def _check_classes(n_classes: int, n: int) -> None:
    if not 1 <= n_classes <= n:
        raise ValueError(f"n_classes must lie in [1, {n}] (the number of volumes), got {n_classes}")


def pca_kmeans(volumes, n_classes: int, n_components: int = 10, seed: int = 0) -> np.ndarray:
    """Cluster labels ``(n,)`` (int64) from k-means (10 restarts) on :func:`pca_features`."""
    feats = pca_features(volumes, n_components, seed)
    _check_classes(n_classes, feats.shape[0])
    return KMeans(n_clusters=n_classes, n_init=10, random_state=seed).fit_predict(feats).astype(np.int64)


def pca_gmm(
    volumes, n_classes: int, n_components: int = 10, seed: int = 0, covariance_type: str = "full"
) -> np.ndarray:
    """Cluster labels ``(n,)`` (int64) from a Gaussian mixture (5 k-means-initialised restarts) on
    :func:`pca_features`. ``covariance_type`` as in sklearn (``full``, ``diag``, ``tied``, ``spherical``)."""
    feats = pca_features(volumes, n_components, seed)
    _check_classes(n_classes, feats.shape[0])
    gmm = GaussianMixture(
        n_components=n_classes, covariance_type=covariance_type, n_init=5, reg_covar=1e-4, random_state=seed
    )
    return gmm.fit(feats).predict(feats).astype(np.int64)
