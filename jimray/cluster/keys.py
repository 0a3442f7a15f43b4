"""Rows chosen identically on every rank: seeded hash keys of ids or of values, and the gathered sample of the
rows with the smallest keys. A sample chosen this way depends on the set of rows alone, not on how Ray Data
spread them over the workers or ordered them (random draws over a rank-ordered concatenation would).

Kernels only: torch and numpy (collectives through a :class:`jimray.cluster.reduce.Reducer`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from jimray.cluster.reduce import Reducer

__all__ = ["id_keys", "value_keys", "gather_smallest_keys"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser of ``z`` (uint64, any shape), wrapping."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _to_key(z: np.ndarray, device) -> torch.Tensor:
    return torch.as_tensor((z >> np.uint64(12)).astype(np.float64), device=device)  # 52 bits: exact in float64


def id_keys(ids, seed: int, device=None) -> torch.Tensor:
    """A seeded 52-bit key ``(n,)`` float64 of integer ids: the same id, the same key, wherever it is held."""
    with np.errstate(over="ignore"):
        z = np.asarray(ids, dtype=np.int64).astype(np.uint64) + _GOLDEN * np.uint64((int(seed) + 1) % 2**64)
    return _to_key(_splitmix64(z), device)


def value_keys(x: torch.Tensor) -> torch.Tensor:
    """A 52-bit key ``(n,)`` float64 of each row of ``x (n, f)`` (a hash per value, summed): a function of the
    row's values alone, rounded to 6 decimals first so that the last-bit differences of a projection computed
    with statistics summed in another order do not change it."""
    bits = (np.round(x.detach().double().cpu().numpy(), 6) + 0.0).view(np.uint64)
    with np.errstate(over="ignore"):
        z = _splitmix64(bits + _GOLDEN * (np.arange(bits.shape[1], dtype=np.uint64) + np.uint64(1)))
        z = z.sum(axis=1, dtype=np.uint64)
    return _to_key(z, x.device)


def gather_smallest_keys(x: torch.Tensor, n_max: int, reducer: Reducer, generator: torch.Generator,
                         keys: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """At most ``n_max`` rows of the global data set (every rank's ``x (n, f)``), identical on all ranks: every
    row (rank order) when the set is small, else the ``n_max`` rows of smallest ``keys(x) (n,)`` in key order,
    as float64 when keyed. Only a Bernoulli pre-selection by key (1.5x the sample) is gathered."""

    def total(count: int) -> int:
        return int(reducer.all_reduce_sum(torch.tensor([float(count)], dtype=torch.float64, device=x.device))[0])

    n_total = total(x.shape[0])
    if n_total <= n_max:
        return reducer.gather_sample(x, n_max, generator)
    key = keys(x)
    rows = torch.cat([key[:, None], x.double()], dim=1)[key < min(1.0, 1.5 * n_max / n_total) * 2.0**52]
    rows = reducer.gather_sample(rows, max(1, total(rows.shape[0])), generator)
    return rows[torch.argsort(rows[:, 0], stable=True)[:n_max], 1:]
