"""Distributed PCA from the reduced mean and covariance of every worker's rows.

Two reductions (row count + sum, then the centred scatter matrix) and a d x d eigendecomposition give the
same principal axes as a PCA of all rows at once. On CUDA with ``cuml`` importable and a single process,
cuML's PCA does the fit instead (``backend`` records which path ran). Sign convention: the entry of largest
magnitude of each component is positive (deterministic on every rank).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from jimray.cluster.reduce import Reducer, as_reducer
from jimray.cluster.seeding import cuml_available

log = logging.getLogger(__name__)


@dataclass
class PCAState:
    """A fitted PCA: ``mean`` (d,), ``components`` (n_dims, d) (rows = axes, by decreasing variance),
    ``explained_variance`` (n_dims,) (unbiased, like scikit-learn), ``n_samples`` and ``backend``."""

    mean: torch.Tensor
    components: torch.Tensor
    explained_variance: torch.Tensor
    n_samples: int
    backend: str = "torch"

    def transform(self, X):
        """Project rows X (n, d) onto the components: (n, n_dims), on X's device (numpy in, numpy out)."""
        was_numpy = not isinstance(X, torch.Tensor)
        t = torch.as_tensor(np.asarray(X)) if was_numpy else X
        if t.ndim != 2 or t.shape[1] != self.mean.shape[0]:
            raise ValueError(f"transform expects (n, {self.mean.shape[0]}) rows, got shape {tuple(t.shape)}")
        out_dtype = t.dtype if t.is_floating_point() else self.mean.dtype
        comp = self.components.to(device=t.device, dtype=self.mean.dtype)
        y = (t.to(self.mean.dtype) - self.mean.to(t.device)) @ comp.T
        y = y.to(out_dtype)
        return y.cpu().numpy() if was_numpy else y

    def inverse_transform(self, Y):
        """Map projections (n, n_dims) back to the input space (n, d)."""
        was_numpy = not isinstance(Y, torch.Tensor)
        t = torch.as_tensor(np.asarray(Y)) if was_numpy else Y
        x = t.to(self.mean.dtype) @ self.components.to(t.device) + self.mean.to(t.device)
        return x.cpu().numpy() if was_numpy else x

    def get_state(self) -> dict[str, Any]:
        return {"mean": self.mean.cpu().clone(), "components": self.components.cpu().clone(),
                "explained_variance": self.explained_variance.cpu().clone(), "n_samples": int(self.n_samples),
                "backend": self.backend}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PCAState:
        return cls(torch.as_tensor(state["mean"]), torch.as_tensor(state["components"]),
                   torch.as_tensor(state["explained_variance"]), int(state["n_samples"]), state.get("backend", "torch"))


def _fix_signs(components: torch.Tensor) -> torch.Tensor:
    idx = torch.argmax(components.abs(), dim=1)
    signs = torch.sign(components[torch.arange(components.shape[0]), idx])
    signs[signs == 0] = 1
    return components * signs[:, None]


def _fit_cuml(X: torch.Tensor, n_dims: int) -> PCAState:
    import cupy
    from cuml.decomposition import PCA

    pca = PCA(n_components=n_dims, svd_solver="full", output_type="cupy").fit(cupy.from_dlpack(X.contiguous()))

    def to_t(a):
        return torch.from_dlpack(cupy.ascontiguousarray(a)).to(device=X.device, dtype=X.dtype)

    comps = _fix_signs(to_t(pca.components_))
    return PCAState(to_t(pca.mean_), comps, to_t(pca.explained_variance_), X.shape[0], "cuml")


def fit_pca(X, n_dims: int, reducer: Reducer | None = None, dtype: torch.dtype = torch.float64,
            use_cuml: bool | None = None) -> PCAState:
    """PCA of the union of every rank's rows X (n, d) keeping ``n_dims`` axes; identical on all ranks."""
    reducer = as_reducer(reducer)
    t = torch.as_tensor(np.asarray(X)) if not isinstance(X, torch.Tensor) else X.detach()
    if t.ndim != 2:
        raise ValueError(f"fit_pca expects (n, d) rows, got shape {tuple(t.shape)}")
    d = t.shape[1]
    if not 1 <= n_dims <= d:
        raise ValueError(f"n_dims must be in 1..{d} (the number of features), got {n_dims}")
    t = t.to(dtype)
    if use_cuml is None:
        use_cuml = t.is_cuda and reducer.world_size == 1 and cuml_available()
    if use_cuml:
        try:
            return _fit_cuml(t, n_dims)
        except Exception as exc:  # pragma: no cover - needs a GPU with cuML
            log.warning("cuML PCA failed (%s); using torch", exc)
    first = reducer.all_reduce_sum(torch.cat([t.new_tensor([float(t.shape[0])]), t.sum(0)]))
    n = float(first[0])
    if n < 2:
        raise ValueError(f"PCA needs at least 2 rows in total, got {int(n)}")
    mean = first[1:] / n
    centred = t - mean
    cov = reducer.all_reduce_sum(centred.T @ centred) / (n - 1)
    cov = 0.5 * (cov + cov.T)
    evals, evecs = torch.linalg.eigh(cov)
    order = torch.argsort(evals, descending=True)[:n_dims]
    comps = _fix_signs(evecs[:, order].T.contiguous())
    if reducer.world_size > 1:
        comps = reducer.broadcast(comps)
    return PCAState(mean, comps, evals[order].clamp_min(0), int(n), "torch")


def whitened_projection(embeddings: torch.Tensor, pca_dims: int | None, reducer: Reducer | None = None
                        ) -> tuple[torch.Tensor, PCAState]:
    """Standardise each embedding dimension, PCA to ``pca_dims`` (all dims when None) and whiten, all
    from statistics over every worker; returns the projected rows and ONE :class:`PCAState` holding the whole
    affine map (so ``jimray predict`` applies exactly the same projection).

    Standardising and whitening make the mixture (and its ``reg_covar``) independent of the embeddings' scale,
    which changes by orders of magnitude as the network trains; dimensions that do not vary get weight 0.
    """
    reducer = as_reducer(reducer)
    x = embeddings.double()
    stats = reducer.all_reduce_sum(torch.cat([x.new_tensor([float(x.shape[0])]), x.sum(0), (x * x).sum(0)]))
    n, d = float(stats[0]), x.shape[1]
    mean = stats[1 : d + 1] / n
    std = (stats[d + 1 :] / n - mean**2).clamp_min(0).sqrt()
    scale = torch.where(std > 1e-12 * std.max().clamp_min(1e-300), 1.0 / std.clamp_min(1e-300), 0.0)
    n_dims = min(pca_dims or d, d)
    pca = fit_pca((x - mean) * scale, n_dims, reducer=reducer)
    whiten = pca.explained_variance.clamp_min(1e-12 * pca.explained_variance.max().clamp_min(1e-300)).rsqrt()
    folded = PCAState(mean, pca.components * whiten[:, None] * scale[None, :], pca.explained_variance,
                      pca.n_samples, pca.backend)
    return torch.as_tensor(folded.transform(x)), folded
