"""Choosing K by BIC (label matching across rounds lives in :mod:`jimray.cluster.labels`)."""

from __future__ import annotations

from typing import Any

import torch

from jimray.cluster.gmm import GaussianMixture
from jimray.cluster.reduce import Reducer, as_reducer

_GMM_FIELDS = ("covariance_type", "reg_covar", "n_init", "max_iter", "tol", "init_sample")


def gmm_kwargs(config: Any) -> dict[str, Any]:
    """GaussianMixture keyword arguments from a config-like object (e.g. ``jimray.config.GMMConfig``):
    the fields above plus ``seed`` -> ``random_state``; missing attributes keep the defaults."""
    out = {name: getattr(config, name) for name in _GMM_FIELDS if hasattr(config, name)}
    if hasattr(config, "seed"):
        out["random_state"] = config.seed
    return out


def fit_best_k(X, candidates, reducer: Reducer | None = None, **gmm_kwargs: Any
               ) -> tuple[GaussianMixture, list[dict[str, Any]]]:
    """Fit one mixture per candidate K on the (global) rows and keep the lowest BIC.

    Returns (best fitted mixture, table of {"k", "bic", "lower_bound", "n_iter", "converged"} per K).
    Candidates larger than the number of rows are skipped; all ranks choose the same K.
    """
    reducer = as_reducer(reducer)
    ks = sorted({int(k) for k in candidates})
    if not ks or ks[0] < 1:
        raise ValueError(f"candidates must be positive integers, got {list(candidates)}")
    n_local = X.shape[0] if hasattr(X, "shape") else len(X)
    n_total = int(reducer.all_reduce_sum(torch.tensor([float(n_local)], dtype=torch.float64))[0])
    table: list[dict[str, Any]] = []
    best: tuple[float, GaussianMixture] | None = None
    for k in ks:
        if k > n_total:
            continue
        gmm = GaussianMixture(k, **gmm_kwargs).fit(X, reducer=reducer)
        bic = gmm.bic(X, reducer=reducer)
        table.append({"k": k, "bic": bic, "lower_bound": gmm.lower_bound_, "n_iter": gmm.n_iter_,
                      "converged": gmm.converged_})
        if best is None or bic < best[0]:
            best = (bic, gmm)
    if best is None:
        raise ValueError(f"every candidate K in {ks} exceeds the {n_total} rows: pass smaller candidates")
    return best[1], table
