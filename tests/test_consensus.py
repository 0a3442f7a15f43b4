"""Consensus of mixtures: the labels' M-step, k-means on member labels, distributed == single process."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from sklearn.datasets import make_blobs

from jimray.cluster.consensus import (
    best_consensus,
    consensus_kmeans,
    consensus_labels,
    consensus_mixture,
    ensemble_labels,
    select_k,
)
from jimray.cluster.gmm import GaussianMixture
from jimray.cluster.pca import whitened_projection
from jimray.cluster.reduce import LocalReducer, TorchDistributedReducer
from jimray.config import GMMConfig
from jimray.conventions import clustering_accuracy
from jimray.train.clustering import cluster_embeddings


def _blobs(n=600, d=10, k=4, seed=0, std=1.0):
    x, y = make_blobs(n, n_features=d, centers=k, cluster_std=std, random_state=seed)
    return torch.as_tensor(x), y


def test_fit_labels_is_the_m_step_of_the_labels():
    x, y = _blobs(n=300, d=3, k=3, seed=1)
    gmm = GaussianMixture(3, covariance_type="diag", reg_covar=1e-3).fit_labels(x, y)
    for c in range(3):
        member = x[y == c]
        torch.testing.assert_close(gmm.means_[c], member.mean(0))
        torch.testing.assert_close(gmm.covariances_[c], member.var(0, unbiased=False) + 1e-3)
        assert abs(float(gmm.weights_[c]) - float((y == c).mean())) < 1e-9
    np.testing.assert_array_equal(gmm.predict(x), y)  # separated blobs: the rule reproduces the labels
    full = GaussianMixture(3, covariance_type="full").fit_labels(x, y)
    torch.testing.assert_close(full.covariances_[0], torch.cov(x[y == 0].T, correction=0) + 1e-6 * torch.eye(3))


def test_fit_labels_rejects_bad_labels():
    x, _ = _blobs(n=20, d=2, k=2)
    for bad in (np.zeros(19, np.int64), np.full(20, 2)):
        try:
            GaussianMixture(2).fit_labels(x, bad)
        except ValueError as exc:
            assert "labels must have shape (20,)" in str(exc)
        else:
            raise AssertionError("bad labels were accepted")


def test_consensus_kmeans_recovers_the_partition_the_members_share():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, 400)
    members = []
    for _ in range(10):  # each member: the truth under its own label names, 25 % of points relabelled at random
        noisy = rng.permutation(4)[truth]
        flip = rng.random(400) < 0.25
        noisy[flip] = rng.integers(0, 4, int(flip.sum()))
        members.append(noisy)
        assert clustering_accuracy(truth, noisy) < 0.85
    labels = consensus_kmeans(members, 4, seed=0)
    assert clustering_accuracy(truth, labels) >= 0.99
    same = consensus_kmeans([members[0]] * 3, 4, seed=1)  # members that agree: their partition, exactly
    assert clustering_accuracy(members[0], same) == 1.0


def test_consensus_mixture_on_blobs_and_its_rule_reproduces_the_labels():
    x, y = _blobs(std=2.0, seed=3)
    members = ensemble_labels(x, 4, dims=(2, 4, 8, 100), n_seeds=2)
    assert len(members) == 8  # PCA sizes are capped at the 10 features: 2, 4, 8, 10
    labels, gmm, pca = consensus_mixture(x, 4, dims=(2, 4, 8), n_seeds=2)
    assert clustering_accuracy(y, labels) >= 0.98
    np.testing.assert_array_equal(gmm.predict(pca.transform(x)), labels)


def test_train_clustering_uses_the_consensus_and_stores_its_rule():
    x, y = _blobs(std=2.0, seed=5)
    state = cluster_embeddings(x, GMMConfig(n_components=4), LocalReducer(), None, None)
    assert state.n_clusters == 4 and clustering_accuracy(y, state.labels) >= 0.98
    np.testing.assert_array_equal(state.gmm.predict(state.pca.transform(x)), state.labels)
    single = cluster_embeddings(x, GMMConfig(n_components=4, consensus_dims=None, covariance_type="diag"),
                                LocalReducer(), None, None)
    assert single.pca.components.shape[0] == 10 and state.pca.components.shape[0] == 10  # whitened, all dims
    chosen = cluster_embeddings(x, GMMConfig(candidates=[2, 4, 6], covariance_type="diag"), LocalReducer(), None, None)
    assert chosen.n_clusters == 4


# ---------------------------------------------------------------------------- distributed (2 processes, gloo)
def _worker(rank: int, world: int, init_file: str, out_dir: str, x: torch.Tensor, split: int):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        part = x[:split] if rank == 0 else x[split:]
        labels, gmm, _ = consensus_mixture(part, 4, dims=(2, 6), n_seeds=2, reducer=TorchDistributedReducer())
        torch.save({"labels": labels, "means": gmm.means_}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_consensus_equals_single_process(tmp_path):
    x, _ = _blobs(n=500, std=2.5, seed=7)
    split = 193
    torch.multiprocessing.spawn(_worker, args=(2, str(tmp_path / "rdzv"), str(tmp_path), x, split), nprocs=2,
                                join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    labels, gmm, _ = consensus_mixture(x, 4, dims=(2, 6), n_seeds=2)
    np.testing.assert_array_equal(np.concatenate([r0["labels"], r1["labels"]]), labels)
    assert torch.equal(r0["means"], r1["means"])
    torch.testing.assert_close(r0["means"], gmm.means_, rtol=1e-6, atol=1e-8)


def test_select_k_by_held_out_likelihood_finds_the_blobs():
    x, _ = _blobs(n=400, k=5, std=1.5, seed=11)
    k, table = select_k(x, [2, 3, 5, 8], dims=(2, 4, 8), n_seeds=1)
    assert k == 5 and [row["k"] for row in table] == [2, 3, 5, 8]
    assert max(table, key=lambda r: r["heldout_loglik"])["k"] == 5
    try:
        select_k(x[:10], [8, 9])
    except ValueError as exc:
        assert "exceeds the points of a cross-validation fold" in str(exc)
    else:
        raise AssertionError("candidates larger than a fold were accepted")


def _train_worker(rank: int, world: int, init_file: str, out_dir: str, x: torch.Tensor, split: int):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        part = x[:split] if rank == 0 else x[split:]
        state = cluster_embeddings(part, GMMConfig(candidates=[2, 4, 6]), TorchDistributedReducer(), None, None)
        torch.save({"labels": state.labels, "k": state.n_clusters}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_train_clustering_on_two_ranks_equals_one_process(tmp_path):
    """A small set is gathered and fitted on every rank: the same K and labels as in one process."""
    x, _ = _blobs(n=300, std=2.0, seed=9)
    torch.multiprocessing.spawn(_train_worker, args=(2, str(tmp_path / "rdzv"), str(tmp_path), x, 120), nprocs=2,
                                join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    single = cluster_embeddings(x, GMMConfig(candidates=[2, 4, 6]), LocalReducer(), None, None)
    assert r0["k"] == r1["k"] == single.n_clusters == 4
    np.testing.assert_array_equal(np.concatenate([r0["labels"], r1["labels"]]), single.labels)


def _split_worker(rank: int, world: int, init_file: str, out_dir: str, x: torch.Tensor, ids: np.ndarray,
                  split: int, config: GMMConfig):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        part = slice(0, split) if rank == 0 else slice(split, None)
        state = cluster_embeddings(x[part], config, TorchDistributedReducer(), None, None, ids=ids[part])
        torch.save({"labels": state.labels, "ids": ids[part]}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("init_sample,consensus", [(20000, True), (150, True), (20000, False), (150, False)])
def test_train_clustering_depends_on_the_ids_not_on_the_split(tmp_path, init_sample, consensus):
    """Rows spread over two ranks in another order and split (as Ray Data may hand them out) get the labels one
    process gives them, by id: the consensus for a set gathered whole and for one larger than gmm.init_sample
    (fitted on the rows chosen by id), and one distributed mixture (gmm.consensus_dims: null) seeded from all
    rows or from the rows chosen by a hash of their values."""
    x, _ = _blobs(n=300, std=2.0, seed=9)
    ids = np.arange(1000, 1300)
    config = GMMConfig(n_components=4, init_sample=init_sample, **({} if consensus else {"consensus_dims": None}))
    single = cluster_embeddings(x, config, LocalReducer(), None, None, ids=ids)
    order = np.random.default_rng(3).permutation(300)
    torch.multiprocessing.spawn(_split_worker, args=(2, str(tmp_path / "rdzv"), str(tmp_path), x[order], ids[order],
                                                     77, config), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    by_id = dict(zip(np.concatenate([p["ids"] for p in parts]).tolist(),
                     np.concatenate([p["labels"] for p in parts]).tolist(), strict=True))
    np.testing.assert_array_equal([by_id[i] for i in ids], single.labels)


def test_best_consensus_keeps_the_restart_whose_mixture_fits_best():
    x, _ = _blobs(n=240, d=12, k=6, std=4.0, seed=13)  # overlapping blobs: restarts disagree
    z, _ = whitened_projection(x.double(), None)
    scores = []
    for i in range(3):
        labels = consensus_labels(x, 6, (2, 4), 1, seed=10 * i)
        scores.append(GaussianMixture(6, covariance_type="diag", reg_covar=1e-3).fit_labels(z, labels).score(z))
    labels, gmm = best_consensus(x, z, 6, (2, 4), 1, seed=0, restarts=3)
    assert abs(gmm.score(z) - max(scores)) < 1e-9
    one, _ = best_consensus(x, z, 6, (2, 4), 1, seed=0, restarts=1)
    np.testing.assert_array_equal(one, consensus_labels(x, 6, (2, 4), 1, seed=0))
    try:
        best_consensus(x, z, 6, restarts=0)
    except ValueError as exc:
        assert "restarts" in str(exc)
    else:
        raise AssertionError("restarts=0 was accepted")


def test_select_k_with_the_default_settings_finds_k_on_an_embedding_sized_set():
    """Six clusters of 40 in 45 dimensions (the size of a common-frame embedding of the demo), K by the
    defaults of `jimray train` (restarts, held-out likelihood on the whitened PCA 16)."""
    x, _ = _blobs(n=240, d=45, k=6, std=6.0, seed=17)
    defaults = GMMConfig()
    k, table = select_k(x, defaults.candidates, restarts=defaults.consensus_restarts,
                        score_dims=defaults.selection_pca_dims)
    assert k == 6, table
