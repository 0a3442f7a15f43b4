"""Gaussian mixture model fitted by EM on sufficient statistics, in torch, optionally distributed.

cuML has no Gaussian mixture, so this is our own EM. Each E-step pass over the local rows yields the
sufficient statistics (N_k, sum_n r_nk (x_n - m_k), sum_n r_nk (x_n - m_k)(x_n - m_k)^T, taken about
the current means m_k for numerical accuracy) and the log-likelihood sum; a :class:`~jimray.cluster.
reduce.Reducer` sums them over all workers (one collective per iteration), and every rank computes the
same M-step. The contract follows scikit-learn's ``GaussianMixture`` (log-sum-exp E-step, Cholesky
factors of the precisions, ``lower_bound_`` = mean log-likelihood, convergence when it changes by less
than ``tol``). Seeding: k-means++ + Lloyd on a gathered subsample (cuML on GPU when importable, see
:mod:`jimray.cluster.seeding`); ``init_backend_`` records which path ran.

Shapes: X (n, d); ``weights_`` (K,), ``means_`` (K, d), ``covariances_`` (K, d, d) for "full" and
(K, d) for "diag", ``precisions_cholesky_`` likewise.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

from jimray.cluster.keys import gather_smallest_keys, value_keys
from jimray.cluster.reduce import Reducer, as_reducer
from jimray.cluster.seeding import seed_centers

log = logging.getLogger(__name__)

_COV_TYPES = ("full", "diag")
_INITS = ("k-means++", "random")
_ELEMENTS_PER_CHUNK = 2**18  # K * rows * d elements held at once in the E-step (cache-sized chunks)


def _as_tensor(X: Any, dtype: torch.dtype, device: torch.device | str | None) -> tuple[torch.Tensor, bool]:
    """(X as a 2-D tensor of ``dtype`` on ``device`` (X's own device when None), whether X was numpy)."""
    was_numpy = not isinstance(X, torch.Tensor)
    t = torch.as_tensor(np.asarray(X)) if was_numpy else X.detach()
    if t.ndim != 2:
        raise ValueError(f"X must be a 2-D array of shape (n_samples, n_features), got shape {tuple(t.shape)}")
    t = t.to(device=device if device is not None else t.device, dtype=dtype)
    if not bool(torch.isfinite(t).all()):
        raise ValueError("X contains NaN or infinite values: clean the embeddings before fitting")
    return t, was_numpy


def _output(t: torch.Tensor, was_numpy: bool):
    return t.cpu().numpy() if was_numpy else t


def precision_cholesky(covariances: torch.Tensor, covariance_type: str) -> torch.Tensor:
    """Cholesky factors of the precision matrices (as scikit-learn: inverse-transposed Cholesky of cov)."""
    if covariance_type == "diag":
        if bool((covariances <= 0).any()):
            raise ValueError("a diagonal covariance is not positive: increase reg_covar")
        return covariances.rsqrt()
    chol, info = torch.linalg.cholesky_ex(covariances)
    if bool((info != 0).any()):
        bad = torch.nonzero(info).flatten().tolist()
        raise ValueError(
            f"covariance of component(s) {bad} is not positive definite (collapsed component): increase reg_covar"
        )
    eye = torch.eye(covariances.shape[-1], dtype=covariances.dtype, device=covariances.device)
    inv = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
    return inv.transpose(-1, -2)


def _log_det_prec_chol(prec_chol: torch.Tensor, covariance_type: str) -> torch.Tensor:
    if covariance_type == "diag":
        return prec_chol.log().sum(-1)
    return torch.diagonal(prec_chol, dim1=-2, dim2=-1).log().sum(-1)


class _Params:
    """Mixture parameters (all on one device) with their precision Cholesky factors."""

    def __init__(self, weights, means, covariances, covariance_type):
        self.weights = weights
        self.means = means
        self.covariances = covariances
        self.covariance_type = covariance_type
        self.prec_chol = precision_cholesky(covariances, covariance_type)
        self.log_det = _log_det_prec_chol(self.prec_chol, covariance_type)

    def to(self, device) -> _Params:
        return _Params(self.weights.to(device), self.means.to(device), self.covariances.to(device),
                       self.covariance_type)


def _chunks(n: int, k: int, d: int):
    step = max(256, _ELEMENTS_PER_CHUNK // max(1, k * d))
    for lo in range(0, n, step):
        yield lo, min(n, lo + step)


def _weighted_log_prob(xc: torch.Tensor, p: _Params) -> tuple[torch.Tensor, torch.Tensor]:
    """(log w_k + log N(x | k) of shape (n, K), differences x - m_k of shape (K, n, d))."""
    d = xc.shape[1]
    diff = xc[None, :, :] - p.means[:, None, :]
    if p.covariance_type == "full":
        y = torch.matmul(diff, p.prec_chol)
    else:
        y = diff * p.prec_chol[:, None, :]
    log_prob = -0.5 * (d * math.log(2 * math.pi) + (y * y).sum(-1)) + p.log_det[:, None]
    return (log_prob + p.weights.log()[:, None]).T, diff


def _stats(resp: torch.Tensor, diff: torch.Tensor, covariance_type: str) -> tuple[torch.Tensor, ...]:
    """Sufficient statistics about the shift used in ``diff`` (K, n, d) for responsibilities (n, K)."""
    rt = resp.T  # (K, n)
    nk = rt.sum(1)
    s1 = torch.matmul(rt[:, None, :], diff)[:, 0, :]
    if covariance_type == "full":
        s2 = torch.matmul((diff * rt[:, :, None]).transpose(1, 2), diff)
    else:
        s2 = (diff * diff * rt[:, :, None]).sum(1)
    return nk, s1, s2


def _value_order(x: torch.Tensor) -> torch.Tensor:
    """Row order ``(n,)`` of ``x (n, f)`` by a fixed projection of its values (weights sqrt(2), sqrt(3), ...):
    the same rows in any order come out in one order."""
    weights = torch.arange(2, x.shape[1] + 2, dtype=torch.float64, device=x.device).sqrt()
    return torch.argsort(x.double() @ weights, stable=True)


def seeding_sample(X: torch.Tensor, n_max: int, reducer: Reducer, generator: torch.Generator) -> torch.Tensor:
    """At most ``n_max`` rows of the global data set (every rank's ``X``) to seed from, identical on all ranks and
    a function of the set of rows alone (not of how they are spread over ranks or ordered): every row when the
    set is small, else the ``n_max`` rows of smallest :func:`jimray.cluster.keys.value_keys`; in the order of
    their values. Every ``n_init`` start seeds from these rows (the starts differ by the generator's k-means++
    draws)."""
    sample = gather_smallest_keys(X, n_max, reducer, generator, value_keys).to(X.dtype)
    return sample[_value_order(sample)]


class GaussianMixture:
    """Gaussian mixture fitted by (distributed) EM; scikit-learn's ``GaussianMixture`` contract.

    Extra arguments beyond scikit-learn's: ``means_init`` (K, d) (hard-assign to these centres instead of
    seeding), ``init_sample`` (rows gathered for k-means++ seeding), ``n_lloyd`` (Lloyd iterations after
    k-means++), ``device`` (fit there; default X's device) and ``dtype`` (computation precision).
    """

    def __init__(
        self,
        n_components: int,
        *,
        covariance_type: str = "full",
        reg_covar: float = 1e-6,
        n_init: int = 1,
        max_iter: int = 100,
        tol: float = 1e-3,
        init_params: str = "k-means++",
        warm_start: bool = False,
        random_state: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
        means_init: Any = None,
        init_sample: int = 20000,
        n_lloyd: int = 10,
    ):
        if int(n_components) < 1:
            raise ValueError(f"n_components must be >= 1, got {n_components}")
        if covariance_type not in _COV_TYPES:
            raise ValueError(f"covariance_type must be one of {_COV_TYPES}, got '{covariance_type}'")
        if init_params not in _INITS:
            raise ValueError(f"init_params must be one of {_INITS}, got '{init_params}'")
        if reg_covar < 0 or n_init < 1 or max_iter < 1 or tol < 0 or init_sample < 1:
            raise ValueError("need reg_covar >= 0, n_init >= 1, max_iter >= 1, tol >= 0, init_sample >= 1")
        self.n_components = int(n_components)
        self.covariance_type = covariance_type
        self.reg_covar = float(reg_covar)
        self.n_init = int(n_init)
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.init_params = init_params
        self.warm_start = bool(warm_start)
        self.random_state = random_state
        self.device = device
        self.dtype = dtype
        self.means_init = means_init
        self.init_sample = int(init_sample)
        self.n_lloyd = int(n_lloyd)
        self.n_reseeded_ = 0

    # ------------------------------------------------------------------ fitted-state helpers
    def _is_fitted(self) -> bool:
        return hasattr(self, "means_")

    def _check_fitted(self) -> None:
        if not self._is_fitted():
            raise RuntimeError("this GaussianMixture is not fitted yet: call fit(X) (or from_state) first")

    def _params(self) -> _Params:
        return _Params(self.weights_, self.means_, self.covariances_, self.covariance_type)

    def _set_params(self, p: _Params) -> None:
        self.weights_, self.means_, self.covariances_ = p.weights, p.means, p.covariances
        self.precisions_cholesky_ = p.prec_chol

    # ------------------------------------------------------------------ EM pieces
    def _m_step(self, nk, s1, s2, shift, n_total) -> _Params:
        """Parameters from reduced statistics taken about ``shift`` (K, d); re-seeds dead components."""
        eps = 10 * torch.finfo(self.dtype).eps
        nk_safe = nk + eps
        weights = nk_safe / nk_safe.sum()
        delta = s1 / nk_safe[:, None]
        means = shift + delta
        if self.covariance_type == "full":
            cov = s2 / nk_safe[:, None, None] - delta[:, :, None] * delta[:, None, :]
            cov = 0.5 * (cov + cov.transpose(1, 2))
            cov = cov + self.reg_covar * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        else:
            cov = (s2 / nk_safe[:, None] - delta * delta).clamp_min(0) + self.reg_covar
        self._reseed_dead(nk, weights, means, cov)
        return _Params(weights, means, cov, self.covariance_type)

    def _reseed_dead(self, nk, weights, means, cov) -> None:
        """Components holding less than one point are moved next to the heaviest one (split along its
        main axis), in place. Deterministic from reduced statistics, so identical on every rank."""
        dead = torch.nonzero(nk < 1.0).flatten().tolist()
        if not dead or len(dead) == len(nk):
            return
        for k in dead:
            alive = nk >= 1.0
            big = int(torch.argmax(torch.where(alive, weights, torch.zeros_like(weights))))
            if self.covariance_type == "full":
                evals, evecs = torch.linalg.eigh(cov[big])
                step = evals[-1].clamp_min(0).sqrt() * evecs[:, -1]
            else:
                step = torch.zeros_like(means[big])
                j = int(torch.argmax(cov[big]))
                step[j] = cov[big, j].sqrt()
            means[k] = means[big] + step
            means[big] = means[big] - step
            cov[k] = cov[big]
            weights[k] = weights[big] = 0.5 * weights[big]
            nk[k] = 1.0  # counts as alive for the next dead component
            self.n_reseeded_ += 1
        log.info("GaussianMixture: re-seeded %d empty component(s) %s", len(dead), dead)

    def _accumulate(self, X: torch.Tensor, k: int, chunk, reducer: Reducer):
        """The one accumulation loop of the EM pieces: over cache-sized chunks ``[lo, hi)`` of the local rows,
        ``chunk(lo, hi)`` gives (log-likelihood sum or None, responsibilities (m, K), differences (K, m, d)
        about the shift of the statistics); returns the reduced (log-likelihood sum, (N_k, s1, s2))."""
        d = X.shape[1]
        ll = torch.zeros((), dtype=self.dtype, device=X.device)
        nk = torch.zeros(k, dtype=self.dtype, device=X.device)
        s1 = torch.zeros((k, d), dtype=self.dtype, device=X.device)
        s2 = torch.zeros((k, d, d) if self.covariance_type == "full" else (k, d), dtype=self.dtype, device=X.device)
        for lo, hi in _chunks(X.shape[0], k, d):
            chunk_ll, resp, diff = chunk(lo, hi)
            if chunk_ll is not None:
                ll += chunk_ll
            a, b, c = _stats(resp, diff, self.covariance_type)
            nk += a
            s1 += b
            s2 += c
        return self._reduce_stats(ll, nk, s1, s2, reducer)

    def _em_pass(self, X: torch.Tensor, p: _Params, reducer: Reducer) -> tuple[float, tuple[torch.Tensor, ...]]:
        """One E-step over local rows: (global mean log-likelihood, reduced statistics about p.means)."""

        def chunk(lo, hi):
            wlp, diff = _weighted_log_prob(X[lo:hi], p)
            norm = torch.logsumexp(wlp, dim=1)
            return norm.sum(), torch.exp(wlp - norm[:, None]), diff

        return self._accumulate(X, p.means.shape[0], chunk, reducer)

    def _reduce_stats(self, ll, nk, s1, s2, reducer: Reducer):
        flat = torch.cat([ll.reshape(1), nk, s1.flatten(), s2.flatten()])
        flat = reducer.all_reduce_sum(flat)
        k = nk.shape[0]
        out_nk = flat[1 : 1 + k]
        out_s1 = flat[1 + k : 1 + k + s1.numel()].reshape(s1.shape)
        out_s2 = flat[1 + k + s1.numel() :].reshape(s2.shape)
        return flat[0], (out_nk, out_s1, out_s2)

    def _hard_init(self, X: torch.Tensor, centres: torch.Tensor, reducer: Reducer, n_total: float) -> _Params:
        """M-step from a hard assignment of every row to its nearest centre (stats about the centres)."""
        k = centres.shape[0]

        def chunk(lo, hi):
            diff = X[lo:hi][None, :, :] - centres[:, None, :]
            labels = torch.argmin((diff * diff).sum(-1), dim=0)
            return None, torch.nn.functional.one_hot(labels, k).to(self.dtype), diff

        _, (nk, s1, s2) = self._accumulate(X, k, chunk, reducer)
        return self._m_step(nk, s1, s2, centres, n_total)

    def _random_init(self, X, generator, reducer, n_total) -> _Params:
        """scikit-learn's "random": uniform random responsibilities (per-rank stream), stats about the mean."""
        k, d = self.n_components, X.shape[1]
        local_gen = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=generator)) + reducer.rank)
        mean = reducer.all_reduce_sum(X.sum(0)) / n_total
        shift = mean[None, :].expand(k, d)

        def chunk(lo, hi):
            resp = torch.rand((hi - lo, k), generator=local_gen, dtype=self.dtype).to(X.device)
            resp /= resp.sum(1, keepdim=True)
            return None, resp, X[lo:hi][None, :, :] - shift[:, None, :]

        _, (nk, s1, s2) = self._accumulate(X, k, chunk, reducer)
        return self._m_step(nk, s1, s2, shift, n_total)

    def _initialize(self, X, generator, reducer, n_total) -> _Params:
        k = self.n_components
        if self.means_init is not None:
            centres, _ = _as_tensor(self.means_init, self.dtype, X.device)
            if centres.shape != (k, X.shape[1]):
                raise ValueError(f"means_init must have shape ({k}, {X.shape[1]}), got {tuple(centres.shape)}")
            self.init_backend_ = "given"
            return self._hard_init(X, centres, reducer, n_total)
        if self.init_params == "random":
            self.init_backend_ = "torch"
            return self._random_init(X, generator, reducer, n_total)
        sample = seeding_sample(X, self.init_sample, reducer, generator)
        if sample.shape[0] < k:
            raise ValueError(f"only {sample.shape[0]} rows in total for n_components={k}: need at least K rows")
        centres, backend = seed_centers(sample, k, generator, n_lloyd=self.n_lloyd)
        if reducer.world_size > 1:
            centres = reducer.broadcast(centres.contiguous())
        self.init_backend_ = backend
        log.info("GaussianMixture seeding backend: %s (K=%d, sample of %d rows)", backend, k, sample.shape[0])
        return self._hard_init(X, centres, reducer, n_total)

    def _base_seed(self, reducer: Reducer, device) -> int:
        if self.random_state is not None:
            return int(self.random_state)
        seed = torch.tensor([int(np.random.SeedSequence().entropy % 2**62)], dtype=torch.int64, device=device)
        return int(reducer.broadcast(seed)[0]) if reducer.world_size > 1 else int(seed[0])

    def _run_em(self, X, p: _Params, reducer, n_total) -> tuple[_Params, float, int, bool]:
        lower_bound = -math.inf
        converged = False
        n_iter = 0
        for n_iter in range(1, self.max_iter + 1):  # noqa: B007 - n_iter is used after the loop
            prev = lower_bound
            ll_sum, (nk, s1, s2) = self._em_pass(X, p, reducer)
            lower_bound = float(ll_sum) / n_total
            p = self._m_step(nk, s1, s2, p.means, n_total)
            if abs(lower_bound - prev) < self.tol:
                converged = True
                break
        return p, lower_bound, n_iter, converged

    # ------------------------------------------------------------------ public API
    def fit(self, X, reducer: Reducer | None = None) -> GaussianMixture:
        """Fit on the local rows ``X`` (n, d); with a reducer, on the union of every rank's rows."""
        reducer = as_reducer(reducer)
        X, _ = _as_tensor(X, self.dtype, self.device)
        n_total = float(reducer.all_reduce_sum(torch.tensor([float(X.shape[0])], dtype=self.dtype,
                                                              device=X.device))[0])
        if n_total < self.n_components:
            raise ValueError(f"{int(n_total)} rows for n_components={self.n_components}: need at least K rows")
        warm = self.warm_start and self._is_fitted()
        if warm and self.means_.shape[1] != X.shape[1]:
            raise ValueError(f"warm start from {self.means_.shape[1]}-d means but X has {X.shape[1]} features")
        base = self._base_seed(reducer, X.device)
        best = None
        for init in range(1 if warm else self.n_init):
            if warm:
                p = _Params(self.weights_.to(X.device), self.means_.to(X.device), self.covariances_.to(X.device),
                            self.covariance_type)
            else:
                gen = torch.Generator().manual_seed(int(np.random.SeedSequence([base, init]).generate_state(1)[0]))
                p = self._initialize(X, gen, reducer, n_total)
            p, lb, n_iter, converged = self._run_em(X, p, reducer, n_total)
            if best is None or lb > best[1]:
                best = (p, lb, n_iter, converged)
        p, lb, n_iter, converged = best
        if reducer.world_size > 1:  # guarantee bit-identical state everywhere
            p = _Params(reducer.broadcast(p.weights), reducer.broadcast(p.means), reducer.broadcast(p.covariances),
                        self.covariance_type)
        self._set_params(p)
        self.lower_bound_, self.n_iter_, self.converged_ = lb, n_iter, converged
        self.n_features_in_ = X.shape[1]
        if not converged:
            log.warning("GaussianMixture did not converge in %d iterations (tol=%g): raise max_iter or tol",
                        n_iter, self.tol)
        return self

    def fit_labels(self, X, labels, reducer: Reducer | None = None) -> GaussianMixture:
        """Set the parameters to the M-step of hard ``labels (n,)`` (values in ``[0, K)``) on the local rows
        ``X (n, d)`` (with a reducer, on every rank's rows): weights = cluster fractions, means, covariances
        + ``reg_covar``; no EM follows. A clustering found by other means (e.g. a consensus) becomes a mixture
        whose ``predict`` reproduces it wherever one Gaussian per cluster separates the clusters."""
        reducer = as_reducer(reducer)
        X, _ = _as_tensor(X, self.dtype, self.device)
        labels = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=X.device)
        k = self.n_components
        if labels.shape != (X.shape[0],) or (labels.numel() and (labels.min() < 0 or labels.max() >= k)):
            raise ValueError(f"labels must have shape ({X.shape[0]},) with values in [0, {k}), got shape "
                             f"{tuple(labels.shape)}")
        zero = torch.zeros((k, X.shape[1]), dtype=self.dtype, device=X.device)

        def chunk(lo, hi):
            return None, torch.nn.functional.one_hot(labels[lo:hi], k).to(self.dtype), X[lo:hi][None] - zero[:, None]

        _, (nk, s1, s2) = self._accumulate(X, k, chunk, reducer)
        n_total = float(reducer.all_reduce_sum(torch.tensor([float(X.shape[0])], dtype=self.dtype))[0])
        self._set_params(self._m_step(nk, s1, s2, zero, n_total))
        self.lower_bound_, self.n_iter_, self.converged_, self.n_features_in_ = float("nan"), 0, True, X.shape[1]
        return self

    def _log_resp(self, X) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(weighted log prob (n, K), log-normaliser (n,), X was numpy) on X's device."""
        self._check_fitted()
        t, was_numpy = _as_tensor(X, self.dtype, None)
        if t.shape[1] != self.means_.shape[1]:
            raise ValueError(f"X has {t.shape[1]} features but the mixture was fitted on {self.means_.shape[1]}")
        p = self._params().to(t.device)
        parts = [_weighted_log_prob(t[lo:hi], p)[0] for lo, hi in _chunks(t.shape[0], *p.means.shape)]
        wlp = torch.cat(parts) if parts else torch.zeros((0, self.n_components), dtype=self.dtype, device=t.device)
        return wlp, torch.logsumexp(wlp, dim=1), was_numpy

    def score_samples(self, X):
        """Log-likelihood of each row of X under the mixture, (n,)."""
        _, norm, was_numpy = self._log_resp(X)
        return _output(norm, was_numpy)

    def predict_proba(self, X):
        """Responsibilities (n, K); rows sum to 1."""
        wlp, norm, was_numpy = self._log_resp(X)
        return _output(torch.exp(wlp - norm[:, None]), was_numpy)

    def predict(self, X):
        """Most probable component of each row, (n,) int64."""
        wlp, _, was_numpy = self._log_resp(X)
        return _output(torch.argmax(wlp, dim=1), was_numpy)

    def fit_predict(self, X, reducer: Reducer | None = None):
        return self.fit(X, reducer).predict(X)

    def _global_sum_count(self, X, reducer) -> tuple[float, float]:
        _, norm, _ = self._log_resp(X)
        both = torch.stack([norm.sum(), torch.tensor(float(norm.shape[0]), dtype=norm.dtype, device=norm.device)])
        both = as_reducer(reducer).all_reduce_sum(both)
        return float(both[0]), float(both[1])

    def score(self, X, reducer: Reducer | None = None) -> float:
        """Mean log-likelihood per row (over all ranks' rows when reduced)."""
        total, n = self._global_sum_count(X, reducer)
        return total / n

    def n_parameters(self) -> int:
        """Free parameters (scikit-learn's ``_n_parameters``)."""
        self._check_fitted()
        k, d = self.means_.shape
        cov = k * d * (d + 1) // 2 if self.covariance_type == "full" else k * d
        return cov + k * d + k - 1

    def bic(self, X, reducer: Reducer | None = None) -> float:
        """Bayesian information criterion on the global data (lower is better)."""
        total, n = self._global_sum_count(X, reducer)
        return -2.0 * total + self.n_parameters() * math.log(n)

    def aic(self, X, reducer: Reducer | None = None) -> float:
        total, _ = self._global_sum_count(X, reducer)
        return -2.0 * total + 2 * self.n_parameters()

    def reorder_components(self, order) -> GaussianMixture:
        """Permute components in place: new component i is old component ``order[i]``."""
        self._check_fitted()
        idx = torch.as_tensor(np.asarray(order), dtype=torch.int64, device=self.means_.device)
        if sorted(idx.tolist()) != list(range(self.n_components)):
            raise ValueError(f"order must be a permutation of 0..{self.n_components - 1}, got {list(order)}")
        p = _Params(self.weights_[idx], self.means_[idx], self.covariances_[idx], self.covariance_type)
        self._set_params(p)
        return self

    # ------------------------------------------------------------------ checkpoints
    def get_state(self) -> dict:
        """Hyper-parameters and fitted parameters as plain numbers and CPU tensors (for checkpoints)."""
        state: dict[str, Any] = {
            "n_components": self.n_components, "covariance_type": self.covariance_type,
            "reg_covar": self.reg_covar, "n_init": self.n_init, "max_iter": self.max_iter, "tol": self.tol,
            "init_params": self.init_params, "warm_start": self.warm_start, "random_state": self.random_state,
            "dtype": str(self.dtype).replace("torch.", ""), "init_sample": self.init_sample, "n_lloyd": self.n_lloyd,
        }
        if self._is_fitted():
            state.update(
                weights=self.weights_.cpu().clone(), means=self.means_.cpu().clone(),
                covariances=self.covariances_.cpu().clone(), converged=bool(self.converged_),
                n_iter=int(self.n_iter_), lower_bound=float(self.lower_bound_),
                init_backend=getattr(self, "init_backend_", None),
            )
        return state

    @classmethod
    def from_state(cls, state: dict, device: torch.device | str | None = None) -> GaussianMixture:
        """Rebuild from :meth:`get_state` output (fitted parameters on ``device``, default CPU)."""
        keys = ("n_components", "covariance_type", "reg_covar", "n_init", "max_iter", "tol", "init_params",
                "warm_start", "random_state", "init_sample", "n_lloyd")
        missing = [k for k in (*keys, "dtype") if k not in state]
        if missing:
            raise ValueError(f"GaussianMixture state lacks {missing}: pass the dict returned by get_state()")
        gmm = cls(**{k: state[k] for k in keys}, dtype=getattr(torch, state["dtype"]), device=device)
        if "means" in state:
            dev = device if device is not None else "cpu"
            p = _Params(*(torch.as_tensor(state[k], dtype=gmm.dtype, device=dev)
                          for k in ("weights", "means", "covariances")), gmm.covariance_type)
            gmm._set_params(p)
            gmm.converged_, gmm.n_iter_ = bool(state["converged"]), int(state["n_iter"])
            gmm.lower_bound_, gmm.init_backend_ = float(state["lower_bound"]), state.get("init_backend")
            gmm.n_features_in_ = p.means.shape[1]
        return gmm
