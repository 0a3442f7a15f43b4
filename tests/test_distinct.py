"""K by held-out class averages (jimray.cluster.distinct): different structures are told apart, a random split
of one structure is not, the scan returns the number of structures, and the halves depend on ids only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jimray.cluster.distinct import class_half_averages, distinct_k, id_halves, pair_distinctness
from jimray.cluster.frame import FrameOptions, frame_scores
from jimray.cluster.reduce import LocalReducer
from jimray.config import GMMConfig
from jimray.simulate.embedded import embedded_maps
from jimray.simulate.subtomogram import simulate_subtomograms
from jimray.train.frame_step import frame_k_chooser, frame_step

OPTIONS = FrameOptions(n_references=6, members_per_reference=4, max_shift_voxels=2.0)


def _rounds(per_class=16, snr=1.0):
    maps = embedded_maps(voxel_size_angstrom=20.0, box_size=16, names=["6zu5_ribosome", "4v8r_tric"])
    sim = simulate_subtomograms(list(maps.values()), per_class, snr, 60.0, max_shift_voxels=1.0, seed=5)
    ids, tilts = np.arange(len(sim.classes)), np.full(len(sim.classes), 60.0, np.float32)
    frame = None
    for _ in range(2):
        _, frame = frame_step(sim.volumes, tilts, ids, 16, OPTIONS, LocalReducer(), frame)
    return sim.volumes, tilts, ids, sim.classes.numpy(), frame


def _split_one(truth: np.ndarray, seed: int = 0) -> np.ndarray:
    """Three clusters: structure 0, and structure 1 cut in two at random."""
    labels = truth.copy()
    members = np.flatnonzero(truth == 1)
    labels[np.random.default_rng(seed).permutation(members)[: len(members) // 2]] = 2
    return labels


def test_id_halves_depend_on_the_id_alone():
    ids = np.arange(200)
    halves = id_halves(ids, seed=1)
    assert set(halves.tolist()) == {0, 1} and 60 < halves.sum() < 140
    np.testing.assert_array_equal(id_halves(ids[::-1], seed=1), halves[::-1])
    assert not np.array_equal(id_halves(ids, seed=2), halves)


def test_structures_are_distinct_and_a_random_split_is_not():
    volumes, tilts, ids, truth, frame = _rounds()
    halves = id_halves(ids)

    def score(v, t, r):
        return frame_scores(v, t, r, frame.options).scores

    true_test = pair_distinctness(volumes, tilts, truth, halves,
                                  class_half_averages(volumes, tilts, truth, halves, 2, frame.scores), score)
    assert true_test.distinct(), true_test.weakest()
    split = _split_one(truth)
    split_test = pair_distinctness(volumes, tilts, split, halves,
                                   class_half_averages(volumes, tilts, split, halves, 3, frame.scores), score)
    assert not split_test.distinct()
    a, b, t, _effect = split_test.weakest()
    assert {a, b} == {1, 2} and t < 4.0  # eight particles a side: chance, not a structure
    for other in (1, 2):  # the real difference stays distinct
        assert split_test.t[0, other] >= 4.0 and split_test.effect[0, other] >= 0.6


@pytest.mark.parametrize("lowpass", [GMMConfig().distinct_lowpass_cycles_per_voxel, 0.35])
def test_the_scan_returns_the_number_of_structures(lowpass):
    """With the default (the frame's own low-pass) and the finer gmm.distinct_lowpass_cycles_per_voxel=0.35."""
    volumes, tilts, ids, truth, frame = _rounds()
    partitions = {1: np.zeros_like(truth), 2: truth, 3: _split_one(truth), 4: _split_one(_split_one(truth), 1)}
    choose = frame_k_chooser(volumes, tilts, ids, frame, [1, 2, 3, 4], LocalReducer(), lowpass_cycles_per_voxel=lowpass)
    k, table = choose(lambda k: partitions[k])
    assert k == 2, table
    assert [row["k"] for row in table] == [1, 2, 3, 4] and table[1]["distinct"] and not table[2]["distinct"]
    try:
        distinct_k([], lambda k: truth, volumes, tilts, ids, frame.scores, lambda v, t, r: torch.zeros(0))
    except ValueError as exc:
        assert "candidates" in str(exc)
    else:
        raise AssertionError("an empty candidate list was accepted")


def test_a_cluster_too_small_to_verify_is_not_distinct():
    volumes, tilts, ids, truth, frame = _rounds()
    labels = truth.copy()
    labels[np.flatnonzero(truth == 1)[:1]] = 2  # one particle alone: no half-set average to test it against
    partitions = {2: truth, 3: labels}
    choose = frame_k_chooser(volumes, tilts, ids, frame, [2, 3], LocalReducer())
    k, table = choose(lambda k: partitions[k])
    assert k == 2 and not table[1]["distinct"], table
