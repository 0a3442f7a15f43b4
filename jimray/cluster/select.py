"""Choosing K by BIC and keeping cluster labels stable across training rounds."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from jimray.cluster.gmm import GaussianMixture
from jimray.cluster.reduce import Reducer, as_reducer
from jimray.conventions import hungarian_mapping

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


def relabel(new_labels, previous_labels) -> np.ndarray:
    """``new_labels`` renamed to agree best (Hungarian) with ``previous_labels`` of the same items;
    clusters without a partner get fresh labels."""
    new = np.asarray(new_labels, dtype=np.int64)
    mapping = hungarian_mapping(new, np.asarray(previous_labels, dtype=np.int64))
    lut_keys = np.array(sorted(mapping), dtype=np.int64)
    lut_vals = np.array([mapping[k] for k in lut_keys], dtype=np.int64)
    return lut_vals[np.searchsorted(lut_keys, new)]


def match_components(gmm: GaussianMixture, new_labels, previous_labels) -> np.ndarray:
    """Reorder ``gmm``'s components in place so that its labels agree best with ``previous_labels``
    (Hungarian on the items' labels); returns ``new_labels`` under the new component order."""
    new = np.asarray(new_labels, dtype=np.int64)
    mapping = hungarian_mapping(new, np.asarray(previous_labels, dtype=np.int64))
    k = gmm.n_components
    slot = {old: t for old, t in mapping.items() if 0 <= old < k and 0 <= t < k}
    free = iter(sorted(set(range(k)) - set(slot.values())))
    for old in range(k):  # components matched to nothing (or to a label >= K) take the free slots
        if old not in slot:
            slot[old] = next(free)
    order = np.empty(k, dtype=np.int64)
    for old, target in slot.items():
        order[target] = old
    gmm.reorder_components(order)
    lut = np.array([slot[old] for old in range(k)], dtype=np.int64)
    return lut[new]
