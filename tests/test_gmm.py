"""Gaussian mixture: agreement with scikit-learn, distributed EM == single-process EM, warm start, state."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from sklearn.datasets import make_blobs
from sklearn.mixture import GaussianMixture as SkGaussianMixture

from jimray.cluster.gmm import GaussianMixture
from jimray.cluster.labels import match_components, relabel
from jimray.cluster.reduce import LocalReducer, TorchDistributedReducer
from jimray.cluster.select import fit_best_k, gmm_kwargs
from jimray.config import GMMConfig
from jimray.conventions import clustering_accuracy


def _blobs(n=1500, d=4, k=3, seed=0):
    x, y = make_blobs(n, n_features=d, centers=k, cluster_std=[0.6, 1.0, 1.5][:k] if k == 3 else 1.0,
                      random_state=seed)
    return x, y


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_matches_sklearn_loglik_and_labels(covariance_type):
    x, _ = _blobs()
    ours = GaussianMixture(3, covariance_type=covariance_type, tol=1e-6, max_iter=300, random_state=0).fit(x)
    ref = SkGaussianMixture(3, covariance_type=covariance_type, tol=1e-6, max_iter=300, random_state=0).fit(x)
    assert ours.converged_ and ours.init_backend_ == "torch"
    assert abs(ours.score(x) - ref.score(x)) <= 1e-3 * abs(ref.score(x))
    assert clustering_accuracy(ref.predict(x), ours.predict(x)) > 0.99


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_bic_and_score_samples_equal_sklearn_on_same_parameters(covariance_type):
    x, _ = _blobs(k=3, d=3)
    ours = GaussianMixture(3, covariance_type=covariance_type, max_iter=5, random_state=1).fit(x)
    ref = SkGaussianMixture(3, covariance_type=covariance_type)
    ref.weights_ = ours.weights_.numpy()
    ref.means_ = ours.means_.numpy()
    ref.covariances_ = ours.covariances_.numpy()
    ref.precisions_cholesky_ = ours.precisions_cholesky_.numpy()
    ref.converged_, ref.n_iter_, ref.n_features_in_ = True, 1, 3
    np.testing.assert_allclose(ours.score_samples(x), ref.score_samples(x), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ours.bic(x), ref.bic(x), rtol=1e-10)
    np.testing.assert_allclose(ours.aic(x), ref.aic(x), rtol=1e-10)
    # and the Cholesky precisions are the ones sklearn would compute from the covariances
    from sklearn.mixture._gaussian_mixture import _compute_precision_cholesky

    prec = _compute_precision_cholesky(ours.covariances_.numpy(), covariance_type)
    np.testing.assert_allclose(ours.precisions_cholesky_.numpy(), prec, rtol=1e-10, atol=1e-12)


def test_predict_proba_score_samples_consistent_numpy_and_torch():
    x, _ = _blobs()
    gmm = GaussianMixture(3, random_state=0).fit(torch.as_tensor(x, dtype=torch.float32))
    proba = gmm.predict_proba(x)
    assert isinstance(proba, np.ndarray) and proba.shape == (len(x), 3)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(gmm.predict(x), proba.argmax(1))
    wlp = np.log(proba) + gmm.score_samples(x)[:, None]
    np.testing.assert_allclose(logsumexp(wlp, axis=1), gmm.score_samples(x), atol=1e-9)
    labels_t = gmm.predict(torch.as_tensor(x))
    assert isinstance(labels_t, torch.Tensor) and labels_t.dtype == torch.int64
    np.testing.assert_array_equal(labels_t.numpy(), gmm.predict(x))
    np.testing.assert_array_equal(gmm.fit_predict(x), gmm.predict(x))
    assert gmm.score(x) == pytest.approx(gmm.score_samples(x).mean(), rel=1e-12)


def test_warm_start_continues_em():
    x, _ = _blobs(seed=3)
    cold = GaussianMixture(3, max_iter=6, tol=0.0, random_state=5).fit(x)
    warm = GaussianMixture(3, max_iter=1, tol=0.0, random_state=5, warm_start=True)
    bounds = []
    for _ in range(6):
        warm.fit(x)
        bounds.append(warm.lower_bound_)
    torch.testing.assert_close(warm.means_, cold.means_, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(warm.covariances_, cold.covariances_, rtol=1e-12, atol=1e-12)
    assert all(b2 >= b1 - 1e-12 for b1, b2 in zip(bounds, bounds[1:], strict=False))  # EM never decreases it


def test_state_round_trip_and_reorder():
    x, _ = _blobs()
    gmm = GaussianMixture(3, covariance_type="full", random_state=0).fit(x)
    state = pickle.loads(pickle.dumps(gmm.get_state()))
    back = GaussianMixture.from_state(state)
    np.testing.assert_array_equal(back.predict(x), gmm.predict(x))
    assert back.score(x) == gmm.score(x)
    assert (back.n_iter_, back.converged_, back.init_backend_) == (gmm.n_iter_, gmm.converged_, "torch")
    before = gmm.predict(x)
    gmm.reorder_components([2, 0, 1])
    np.testing.assert_array_equal(np.array([1, 2, 0])[before], gmm.predict(x))
    with pytest.raises(ValueError, match="permutation"):
        gmm.reorder_components([0, 0, 1])


def test_empty_component_is_reseeded():
    x, _ = _blobs(k=3)
    far = np.array([[1e3] * 4])
    init = np.concatenate([x[:2], far, x[-1:]])  # the far centre gets no point
    gmm = GaussianMixture(4, means_init=init, random_state=0, max_iter=200).fit(x)
    assert gmm.n_reseeded_ >= 1
    assert bool((gmm.weights_ > 1e-3).all()) and bool(torch.isfinite(gmm.means_).all())
    assert np.isfinite(gmm.score(x))


def test_random_init_and_input_errors():
    x, _ = _blobs()
    gmm = GaussianMixture(3, init_params="random", random_state=0, max_iter=500).fit(x)
    ref = SkGaussianMixture(3, random_state=0).fit(x)
    assert abs(gmm.score(x) - ref.score(x)) <= 1e-3 * abs(ref.score(x))
    with pytest.raises(ValueError, match="at least K rows"):
        GaussianMixture(5).fit(x[:3])
    with pytest.raises(ValueError, match="features"):
        gmm.predict(x[:, :2])
    with pytest.raises(ValueError, match="covariance_type"):
        GaussianMixture(2, covariance_type="tied")
    with pytest.raises(RuntimeError, match="not fitted"):
        GaussianMixture(2).predict(x)
    with pytest.raises(ValueError, match="NaN"):
        GaussianMixture(2).fit(np.full((5, 2), np.nan))


def test_fit_best_k_picks_true_k_and_relabel():
    x, y = make_blobs(900, n_features=3, centers=3, cluster_std=0.5, random_state=2)
    cfg = GMMConfig(seed=0, n_init=1)
    gmm, table = fit_best_k(x, [1, 2, 3, 5], **gmm_kwargs(cfg))
    assert gmm.n_components == 3 and [row["k"] for row in table] == [1, 2, 3, 5]
    assert min(table, key=lambda r: r["bic"])["k"] == 3
    labels = gmm.predict(x)
    np.testing.assert_array_equal(relabel(labels, y), y)  # separated blobs: relabel recovers the truth
    matched = match_components(gmm, labels, y)
    np.testing.assert_array_equal(matched, y)
    np.testing.assert_array_equal(gmm.predict(x), y)


# ---------------------------------------------------------------------------- distributed (2 processes, gloo)
def _distributed_worker(rank: int, world: int, init_file: str, out_dir: str, x: np.ndarray, split: int):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        part = x[:split] if rank == 0 else x[split:]
        reducer = TorchDistributedReducer()
        gen = torch.Generator().manual_seed(7)
        sample = reducer.gather_sample(torch.as_tensor(part), 300, gen)
        out = {"sample": sample}
        for cov in ("full", "diag"):
            gmm = GaussianMixture(3, covariance_type=cov, random_state=11, tol=1e-8, max_iter=50, init_sample=400)
            gmm.fit(part, reducer=reducer)
            out[cov] = {**gmm.get_state(), "precisions_cholesky": gmm.precisions_cholesky_,
                        "score": gmm.score(part, reducer), "bic": gmm.bic(part, reducer)}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_em_equals_single_process(tmp_path):
    x, _ = _blobs(n=1200, d=4, k=3, seed=4)
    split = 451  # uneven halves
    torch.multiprocessing.spawn(_distributed_worker, args=(2, str(tmp_path / "rdzv"), str(tmp_path), x, split),
                                nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    local = LocalReducer()
    torch.testing.assert_close(r0["sample"], local.gather_sample(torch.as_tensor(x), 300,
                                                                  torch.Generator().manual_seed(7)), rtol=0, atol=0)
    for cov in ("full", "diag"):
        ref = GaussianMixture(3, covariance_type=cov, random_state=11, tol=1e-8, max_iter=50, init_sample=400).fit(x)
        a, b = r0[cov], r1[cov]
        for key in ("weights", "means", "covariances", "precisions_cholesky"):
            assert torch.equal(a[key], b[key]), f"ranks differ in {key}"  # bit-identical on every rank
        torch.testing.assert_close(a["weights"], ref.weights_, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(a["means"], ref.means_, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(a["covariances"], ref.covariances_, rtol=1e-5, atol=1e-8)
        assert a["n_iter"] == ref.n_iter_ and a["score"] == pytest.approx(ref.score(x), rel=1e-8)
        assert a["bic"] == pytest.approx(ref.bic(x), rel=1e-8) and a["bic"] == b["bic"]


@pytest.mark.gpu
def test_cuda_fit_matches_cpu_and_stays_on_device():
    x, _ = _blobs()
    xc = torch.as_tensor(x, device="cuda")
    gpu = GaussianMixture(3, random_state=0, tol=1e-8, max_iter=200).fit(xc)
    cpu = GaussianMixture(3, random_state=0, tol=1e-8, max_iter=200).fit(x)
    assert gpu.means_.is_cuda and gpu.predict(xc).is_cuda and gpu.init_backend_ in ("cuml", "torch")
    assert gpu.score(xc) == pytest.approx(cpu.score(x), rel=1e-6)
    assert clustering_accuracy(gpu.predict(x), cpu.predict(x)) > 0.99


def test_seeding_sample_depends_on_the_rows_not_their_order():
    """The rows the mixture seeds from: all of a small set, n_max of a large one, the same for the same rows in
    any order (last-bit noise included), in one order."""
    from jimray.cluster.gmm import seeding_sample

    x = torch.randn(500, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    perm = torch.randperm(500, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator
    small = seeding_sample(x, 1000, LocalReducer(), gen().manual_seed(0))
    assert small.shape == (500, 4)
    torch.testing.assert_close(seeding_sample(x[perm], 1000, LocalReducer(), gen().manual_seed(0)), small)
    large = seeding_sample(x, 100, LocalReducer(), gen().manual_seed(0))
    assert large.shape == (100, 4)
    noisy = x[perm] * (1.0 + 1e-15)
    torch.testing.assert_close(seeding_sample(noisy, 100, LocalReducer(), gen().manual_seed(5)), large)
    assert not torch.equal(large, seeding_sample(x[:400], 100, LocalReducer(), gen().manual_seed(0)))


def _nccl_worker(rank: int, world: int, init_file: str, out_dir: str):
    torch.distributed.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.cuda.set_device(0)
        reducer = TorchDistributedReducer()
        cpu = torch.arange(6, dtype=torch.float64).reshape(3, 2)
        total = reducer.all_reduce_sum(cpu)
        rows = reducer.gather_sample(cpu, 10, torch.Generator().manual_seed(0))
        both = reducer.all_reduce_sum(torch.ones(2, dtype=torch.complex128))
        torch.save({"total": total, "rows": rows, "both": both}, os.path.join(out_dir, "nccl.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.gpu
def test_nccl_reducer_takes_cpu_tensors_and_returns_them_on_the_cpu(tmp_path):
    """The rounds keep embeddings, counts and averages on the CPU: under NCCL (GPU training) the reducer moves
    them to the GPU for the collective and back."""
    torch.multiprocessing.spawn(_nccl_worker, args=(1, str(tmp_path / "rdzv"), str(tmp_path)), nprocs=1, join=True)
    out = torch.load(tmp_path / "nccl.pt", weights_only=False)
    assert all(t.device.type == "cpu" for t in out.values())
    torch.testing.assert_close(out["total"], torch.arange(6, dtype=torch.float64).reshape(3, 2))
    assert out["rows"].shape == (3, 2) and torch.equal(out["both"], torch.ones(2, dtype=torch.complex128))
