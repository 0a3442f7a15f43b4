"""Distributed PCA: equals a numpy PCA of all rows, on one process and across two (gloo)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from jimray.cluster.pca import PCAState, fit_pca
from jimray.cluster.reduce import TorchDistributedReducer


def _data(rng, n=500, d=6):
    scales = np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.2])[:d]
    rot, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return (rng.normal(size=(n, d)) * scales) @ rot.T + rng.normal(size=d) * 10


def _numpy_pca(x, k):
    mean = x.mean(0)
    evals, evecs = np.linalg.eigh(np.cov(x, rowvar=False))
    order = np.argsort(evals)[::-1][:k]
    comps = evecs[:, order].T
    idx = np.argmax(np.abs(comps), axis=1)
    comps *= np.sign(comps[np.arange(k), idx])[:, None]
    return mean, comps, evals[order]


def test_pca_matches_numpy_and_round_trips(rng):
    x = _data(rng)
    pca = fit_pca(x, 3)
    mean, comps, var = _numpy_pca(x, 3)
    np.testing.assert_allclose(pca.mean.numpy(), mean, rtol=1e-10)
    np.testing.assert_allclose(pca.components.numpy(), comps, atol=1e-10)
    np.testing.assert_allclose(pca.explained_variance.numpy(), var, rtol=1e-10)
    y = pca.transform(x)
    np.testing.assert_allclose(y, (x - mean) @ comps.T, atol=1e-9)
    np.testing.assert_allclose(np.var(y, axis=0, ddof=1), var, rtol=1e-9)
    full = fit_pca(x, 6)
    np.testing.assert_allclose(full.inverse_transform(full.transform(x)), x, atol=1e-9)
    yt = pca.transform(torch.as_tensor(x, dtype=torch.float32))
    assert isinstance(yt, torch.Tensor) and yt.dtype == torch.float32
    back = PCAState.from_state(pca.get_state())
    np.testing.assert_array_equal(back.transform(x), y)
    assert pca.backend == "torch"
    with pytest.raises(ValueError, match="n_dims"):
        fit_pca(x, 7)
    with pytest.raises(ValueError, match=r"\(n, 6\)"):
        pca.transform(x[:, :3])


def _worker(rank, world, init_file, out_dir, x, split):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        part = x[:split] if rank == 0 else x[split:]
        pca = fit_pca(torch.as_tensor(part), 4, TorchDistributedReducer())
        torch.save(pca.get_state(), os.path.join(out_dir, f"pca{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_pca_equals_numpy(tmp_path, rng):
    x = _data(rng, n=401)
    torch.multiprocessing.spawn(_worker, args=(2, str(tmp_path / "rdzv"), str(tmp_path), x, 150), nprocs=2)
    s0, s1 = (torch.load(tmp_path / f"pca{r}.pt") for r in range(2))
    assert torch.equal(s0["components"], s1["components"]) and torch.equal(s0["mean"], s1["mean"])
    mean, comps, var = _numpy_pca(x, 4)
    np.testing.assert_allclose(s0["mean"].numpy(), mean, rtol=1e-10)
    np.testing.assert_allclose(s0["components"].numpy(), comps, atol=1e-9)
    np.testing.assert_allclose(s0["explained_variance"].numpy(), var, rtol=1e-9)
    assert s0["n_samples"] == 401
