"""Pair sampler: labels lookup, within-cluster uniform pairs, bounded uniform reservoirs, state, Ray actor."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from scipy.stats import chisquare

from jimray.train.sampler import PairSampler, PairSamplerActor


def _labelled(rng, sizes=(5, 12, 30, 1)):
    labels = np.repeat(np.arange(len(sizes)), sizes)
    ids = rng.choice(10**9, size=len(labels), replace=False).astype(np.int64)
    perm = rng.permutation(len(labels))
    return ids[perm], labels[perm]


def test_labels_lookup_batches_and_errors(rng):
    ids, labels = _labelled(rng)
    s = PairSampler(4, seed=0)
    for part in np.array_split(np.arange(len(ids)), 3):
        s.add_labels(ids[part], labels[part])
    s.add_labels(ids[:5], labels[:5])  # repeating an id with the same label is harmless
    np.testing.assert_array_equal(s.labels_of(ids[::-1]), labels[::-1])
    assert s.cluster_sizes() == {0: 5, 1: 12, 2: 30, 3: 1} and len(s) == len(ids)
    with pytest.raises(KeyError, match="no label"):
        s.labels_of(np.array([ids[0], -5]))
    s.add_labels(ids[:1], labels[:1] + 1)
    with pytest.raises(ValueError, match=f"id {ids[0]} was given labels"):
        s.labels_of(ids[:1])
    with pytest.raises(ValueError, match="labels must be"):
        s.add_labels(ids[:2], np.array([0.5, 1.0]))


def test_sample_pairs_uniform_within_clusters(rng):
    ids, labels = _labelled(rng)
    s = PairSampler(4, seed=1)
    s.add_labels(ids, labels)
    n = 60000
    src, tgt, lab = s.sample_pairs(n)
    lut = dict(zip(ids.tolist(), labels.tolist(), strict=True))
    src_lab = np.array([lut[i] for i in src])
    tgt_lab = np.array([lut[i] for i in tgt])
    np.testing.assert_array_equal(src_lab, lab)
    np.testing.assert_array_equal(tgt_lab, lab)  # never crosses clusters
    single = lab == 3
    assert np.all(src[~single] != tgt[~single]) and np.all(src[single] == tgt[single])
    # sources uniform over all ids
    _, counts = np.unique(src, return_counts=True)
    assert len(counts) == len(ids) and chisquare(counts).pvalue > 1e-3
    # targets uniform over the other members: for sources in cluster 2, counts of each target
    members = ids[labels == 2]
    in2 = lab == 2
    counts2 = np.array([(tgt[in2] == m).sum() for m in members])
    assert chisquare(counts2).pvalue > 1e-3
    # a biased sampler would fail: half the draws on one member
    assert chisquare(np.concatenate([[counts2.sum()], counts2[1:]])).pvalue < 1e-3


def test_reservoir_bounded_and_uniform():
    cap, n_items, trials = 5, 25, 1500
    ids = np.arange(100, 100 + n_items)
    inclusion = np.zeros(n_items)
    for t in range(trials):
        s = PairSampler(cap, seed=t)
        batches = np.array_split(np.arange(n_items), [3, 4, 11, 19])
        for b in batches:
            vols = np.broadcast_to(ids[b, None, None, None].astype(np.float32), (len(b), 2, 2, 2))
            s.offer_targets(ids[b], np.zeros(len(b), dtype=np.int64), vols)
        kept = s.reservoir_ids(0)
        assert len(kept) == cap and len(set(kept.tolist())) == cap
        inclusion[kept - 100] += 1
    expected = trials * cap / n_items
    assert chisquare(inclusion, np.full(n_items, expected)).pvalue > 1e-3
    assert np.all(np.abs(inclusion - expected) < 5 * np.sqrt(expected))


def test_sample_targets_from_own_cluster_not_self(rng):
    ids, labels = _labelled(rng, sizes=(6, 20, 1))
    s = PairSampler(8, seed=2)
    s.add_labels(ids, labels)
    vols = ids[:, None, None, None].astype(np.float32) * np.ones((1, 3, 3, 3), dtype=np.float32)
    s.offer_targets(ids, labels, vols)
    assert len(s.reservoir_ids(1)) == 8 and len(s.reservoir_ids(0)) == 6
    src = np.repeat(ids, 200)
    lab, tgt, tv = s.sample_targets(src)
    assert tv.shape == (len(src), 3, 3, 3) and tv.dtype == np.float32
    np.testing.assert_array_equal(tv[:, 0, 0, 0], tgt.astype(np.float32))
    np.testing.assert_array_equal(lab, s.labels_of(src))
    np.testing.assert_array_equal(s.labels_of(tgt), lab)
    single = lab == 2
    assert np.all(tgt[~single] != src[~single]) and np.all(tgt[single] == src[single])
    # uniform over the reservoir of cluster 0 (all 6 members; 5 candidates per source)
    in0 = lab == 0
    _, counts = np.unique(tgt[in0], return_counts=True)
    assert len(counts) == 6 and chisquare(counts).pvalue > 1e-3
    lab2, tgt2, _ = s.sample_targets(src[:50], exclude_self=False)
    assert np.all(np.isin(tgt2[lab2 == 1], s.reservoir_ids(1)))
    s.reset_round(1)
    s.add_labels(ids, labels)
    with pytest.raises(RuntimeError, match="no target volumes"):
        s.sample_targets(ids[:1])


def test_memory_linear_and_state_round_trip(rng):
    n = 100_000
    s = PairSampler(4, seed=3)
    s.add_labels(np.arange(n, dtype=np.int64) * 3, rng.integers(0, 20, n))
    assert s.memory_bytes() == 12 * n  # int64 id + int32 label per id
    s.sample_pairs(10)
    assert s.memory_bytes() <= 16 * n + 8 * 21  # + int32 grouping index
    offered = np.arange(200) * 3
    s.offer_targets(offered, s.labels_of(offered), np.zeros((200, 2, 2, 2), dtype=np.float32))
    state = pickle.loads(pickle.dumps(s.get_state()))
    t = PairSampler(1, seed=99)
    t.set_state(state)
    for a, b in zip(s.sample_pairs(1000), t.sample_pairs(1000), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(s.sample_targets(np.arange(5) * 3), t.sample_targets(np.arange(5) * 3), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.ray
def test_pair_sampler_actor(ray_cluster, rng):
    ray = ray_cluster
    ids, labels = _labelled(rng, sizes=(10, 15))
    actor = PairSamplerActor.options(num_cpus=0).remote(6, 0)
    ray.get(actor.reset_round.remote(2))
    ray.get([actor.add_labels.remote(ids[p], labels[p]) for p in np.array_split(np.arange(len(ids)), 4)])
    vols = np.zeros((len(ids), 2, 2, 2), dtype=np.float32)
    ray.get(actor.offer_targets.remote(ids, labels, vols))
    assert ray.get(actor.cluster_sizes.remote()) == {0: 10, 1: 15}
    lab, tgt, tv = ray.get(actor.sample_targets.remote(ids))
    np.testing.assert_array_equal(lab, labels)
    np.testing.assert_array_equal(ray.get(actor.labels_of.remote(tgt)), labels)
    src, tgt, lab = ray.get(actor.sample_pairs.remote(100))
    np.testing.assert_array_equal(ray.get(actor.labels_of.remote(src)), ray.get(actor.labels_of.remote(tgt)))
    assert ray.get(actor.memory_bytes.remote()) > 0
    ray.kill(actor)
