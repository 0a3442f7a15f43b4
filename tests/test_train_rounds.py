"""The per-round helpers of training, single process (LocalReducer): properties, no Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jimray.cluster import labels as matching
from jimray.cluster.reduce import LocalReducer
from jimray.config import GMMConfig
from jimray.conventions import clustering_accuracy
from jimray.train import rounds
from jimray.train.clustering import cluster_embeddings


def test_relabel_restores_previous_names(rng):
    previous = rng.integers(0, 4, size=200)
    perm = np.array([2, 0, 3, 1])
    new = perm[previous]
    new[:10] = (new[:10] + 1) % 4  # a few real changes
    relabelled, changed, lut = matching.relabel_to_previous(new, previous, 4, LocalReducer())
    assert np.array_equal(lut[new], relabelled)
    assert np.mean(relabelled == previous) >= 0.95
    assert changed == pytest.approx(np.mean(relabelled != previous))


def test_relabel_when_k_shrinks_stays_in_range(rng):
    previous = rng.integers(0, 5, size=300)
    new = np.minimum(previous, 2)  # 5 clusters merged into 3
    relabelled, _, _ = matching.relabel_to_previous(new, previous, 3, LocalReducer())
    assert relabelled.min() >= 0 and relabelled.max() <= 2
    assert len(np.unique(relabelled)) == 3


def test_global_accuracy_equals_paper_metric(rng):
    truth = rng.integers(0, 3, size=150)
    labels = (truth + 1) % 3
    labels[:30] = rng.integers(0, 3, size=30)
    acc = matching.global_accuracy(truth, labels, 3, LocalReducer())
    assert acc == pytest.approx(clustering_accuracy(truth, labels))


def test_reservoir_is_bounded_and_uniform():
    counts = np.zeros(100)
    for seed in range(400):
        r = rounds._Reservoir(10, seed)
        for start in range(0, 100, 7):
            ids = np.arange(start, min(start + 7, 100))
            r.offer(ids, np.zeros((len(ids), 1, 1, 1), np.float32), np.full(len(ids), 60.0))
        assert len(r.ids) == 10
        counts[r.ids] += 1
    # each id kept with probability 10/100 -> 40 times on average over 400 runs
    assert counts.min() > 15 and counts.max() < 70


def test_cluster_embeddings_separates_blobs_and_reorders(rng):
    centres = rng.normal(size=(3, 6)) * 8
    truth = rng.integers(0, 3, size=240)
    x = torch.as_tensor(centres[truth] + rng.normal(size=(240, 6)))
    config = GMMConfig(n_components=None, candidates=[2, 3, 4, 5], pca_dims=4, n_init=2)
    state = cluster_embeddings(x, config, LocalReducer(), None, None)
    assert state.n_clusters == 3
    assert clustering_accuracy(truth, state.labels) == 1.0
    lut = np.array([2, 0, 1])
    matching.reorder_to(state.gmm, lut)
    z = torch.as_tensor(state.pca.transform(x))
    assert np.array_equal(np.asarray(state.gmm.predict(z)), lut[state.labels])


def test_warm_start_from_previous_labels_keeps_clusters(rng):
    centres = rng.normal(size=(4, 5)) * 10
    truth = rng.integers(0, 4, size=200)
    x = torch.as_tensor(centres[truth] + rng.normal(size=(200, 5)))
    config = GMMConfig(n_components=4, pca_dims=None, n_init=1, consensus_dims=None)
    state = cluster_embeddings(x, config, LocalReducer(), truth, 4)
    assert np.array_equal(state.labels, truth)  # one mixture: started from the previous clusters' means
    consensus = cluster_embeddings(x, GMMConfig(n_components=4), LocalReducer(), truth, 4)
    assert clustering_accuracy(truth, consensus.labels) == 1.0  # fresh ensemble; the loop renames to last round


def test_clustering_does_not_depend_on_embedding_scale(rng):
    """Trained embeddings shrink by orders of magnitude; standardising + whitening keeps the GMM's reg_covar from
    swallowing them (which once put every subtomogram in one cluster)."""
    centres = rng.normal(size=(3, 6)) * 6
    truth = rng.integers(0, 3, size=150)
    x = torch.as_tensor(centres[truth] + rng.normal(size=(150, 6)))
    config = GMMConfig(n_components=3, pca_dims=4, n_init=2, reg_covar=1e-4)
    big = cluster_embeddings(x, config, LocalReducer(), None, None)
    tiny = cluster_embeddings(x * 1e-5, config, LocalReducer(), None, None)
    assert clustering_accuracy(truth, big.labels) == 1.0
    assert clustering_accuracy(truth, tiny.labels) == 1.0
