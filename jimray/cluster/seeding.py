"""Seeding cluster centres: k-means++ plus a few Lloyd iterations on a (gathered) subsample.

On CUDA tensors with ``cuml`` importable, cuML's ``KMeans(init="scalable-k-means++")`` does the work
(CuPy <-> torch through DLPack); everywhere else the torch implementation below runs on the input's
device. :func:`seed_centers` returns which path it took (``"cuml"`` or ``"torch"``).
"""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)


def cuml_available() -> bool:
    """True when cuML (and CuPy) can be imported."""
    try:
        import cuml  # noqa: F401
        import cupy  # noqa: F401
    except Exception:  # ImportError, or CUDA runtime errors raised at import
        return False
    return True


def squared_distances(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (n, k) between rows of x (n, d) and c (k, d), clamped at 0."""
    d2 = (x * x).sum(1, keepdim=True) - 2.0 * x @ c.T + (c * c).sum(1)[None, :]
    return d2.clamp_min_(0.0)


def kmeans_plusplus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ centres (k, d) chosen among the rows of ``x`` (n, d), n >= k (as scikit-learn:
    2 + log(k) candidate draws per centre, keep the one lowering the potential most)."""
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means++ needs at least k={k} points, got {n}: lower n_components or pass more data")
    trials = 2 + int(math.log(k))
    centres = torch.empty((k, x.shape[1]), dtype=x.dtype, device=x.device)
    first = int(torch.randint(n, (1,), generator=generator))
    centres[0] = x[first]
    closest = squared_distances(x, centres[:1])[:, 0]
    for c in range(1, k):
        pot = closest.sum()
        if float(pot) <= 0.0:  # all remaining points coincide with centres: take random rows
            cand = torch.randint(n, (trials,), generator=generator)
        else:
            u = torch.rand(trials, generator=generator, dtype=torch.float64) * float(pot)
            cum = torch.cumsum(closest.double().cpu(), 0)
            cand = torch.searchsorted(cum, u).clamp_(max=n - 1)
        cand = cand.to(x.device)
        dist = torch.minimum(closest[None, :], squared_distances(x, x[cand]).T)  # (trials, n)
        best = int(torch.argmin(dist.sum(1)))
        centres[c] = x[cand[best]]
        closest = dist[best]
    return centres


def lloyd(x: torch.Tensor, centres: torch.Tensor, n_iter: int = 10) -> torch.Tensor:
    """``n_iter`` Lloyd iterations from ``centres`` (k, d) on ``x`` (n, d); empty clusters keep their centre."""
    c = centres.clone()
    k = c.shape[0]
    for _ in range(n_iter):
        labels = torch.argmin(squared_distances(x, c), dim=1)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        sums = torch.zeros_like(c).index_add_(0, labels, x)
        keep = counts > 0
        new = c.clone()
        new[keep] = sums[keep] / counts[keep, None]
        if torch.equal(new, c):
            break
        c = new
    return c


def _cuml_centres(x: torch.Tensor, k: int, seed: int, n_iter: int) -> torch.Tensor:
    import cupy
    from cuml.cluster import KMeans

    data = cupy.from_dlpack(x.contiguous())
    km = KMeans(n_clusters=k, init="scalable-k-means++", max_iter=max(n_iter, 1), random_state=seed,
                n_init=1, output_type="cupy")
    km.fit(data)
    return torch.from_dlpack(cupy.ascontiguousarray(km.cluster_centers_)).to(device=x.device, dtype=x.dtype)


def seed_centers(
    x: torch.Tensor, k: int, generator: torch.Generator, n_lloyd: int = 10, use_cuml: bool | None = None
) -> tuple[torch.Tensor, str]:
    """Initial centres (k, d) from the sample ``x`` (n, d) and the backend used (``"cuml"`` or ``"torch"``).

    ``use_cuml=None`` picks cuML when ``x`` is on CUDA and cuML is importable; a cuML failure falls back
    to torch (logged).
    """
    if x.ndim != 2:
        raise ValueError(f"seed_centers expects (n, d) points, got shape {tuple(x.shape)}")
    if use_cuml is None:
        use_cuml = x.is_cuda and cuml_available()
    if use_cuml:
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        try:
            return _cuml_centres(x, k, seed, n_lloyd), "cuml"
        except Exception as exc:  # pragma: no cover - needs a GPU with cuML
            log.warning("cuML k-means failed (%s); seeding with torch instead", exc)
    centres = kmeans_plusplus(x, k, generator)
    return lloyd(x, centres, n_lloyd), "torch"
