"""K by held-out class averages (jimray.cluster.distinct): different structures are told apart, a random split
of one structure is not, the scan returns the number of structures, and the halves depend on ids only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jimray.align.multiref import score_at_poses
from jimray.cluster.distinct import (
    class_half_averages,
    cluster_frames,
    distinct_k,
    id_halves,
    pair_distinctness,
    pose_half_scores,
    search_half_scores,
)
from jimray.cluster.frame import FrameOptions, frame_scores
from jimray.cluster.reduce import LocalReducer
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


def _test(volumes, tilts, labels, halves, k, frame, score):
    frames = cluster_frames(frame.scores.scores, labels, k)
    averages = class_half_averages(volumes, tilts, labels, halves, k, frame.scores, frames=frames)
    return pair_distinctness(labels, score(volumes, tilts, averages, frame.scores.rotations[:, frames], halves))


@pytest.mark.parametrize("scoring", ["pose", "search"])
def test_structures_are_distinct_and_a_random_split_is_not(scoring):
    volumes, tilts, ids, truth, frame = _rounds()
    halves = id_halves(ids)
    if scoring == "pose":
        score = pose_half_scores(0.25, OPTIONS.max_shift_voxels)
    else:
        score = search_half_scores(lambda v, t, r: frame_scores(v, t, r, frame.options).scores)
    true_test = _test(volumes, tilts, truth, halves, 2, frame, score)
    assert true_test.distinct(), true_test.weakest()
    split = _split_one(truth)
    split_test = _test(volumes, tilts, split, halves, 3, frame, score)
    assert not split_test.distinct()
    a, b, t, _effect = split_test.weakest()
    assert {a, b} == {1, 2} and t < 4.0  # eight particles a side: chance, not a structure
    for other in (1, 2):  # the real difference stays distinct
        assert split_test.t[0, other] >= 4.0 and split_test.effect[0, other] >= 0.6


def test_scoring_at_the_true_pose_recognises_the_particle():
    """score_at_poses: a particle scores ~1 against its map at its true pose (any shift within range) and far
    less at a pose turned by 90 degrees; a batched call equals a call per particle; pose_half_scores without
    refinement scores each particle against the other half's average at the pose given."""
    maps = embedded_maps(voxel_size_angstrom=20.0, box_size=16, names=["6zu5_ribosome", "4v8r_tric"])
    refs = torch.stack([torch.as_tensor(m, dtype=torch.float32) for m in maps.values()])
    sim = simulate_subtomograms(list(maps.values()), 3, 100.0, 60.0, max_shift_voxels=1.0, seed=2)
    n = len(sim.classes)
    true = sim.rotations[:, None].expand(n, 2, 3, 3)
    scores, shifts = score_at_poses(sim.volumes, refs, true, 60.0, max_shift_voxels=2.0)
    own = scores[torch.arange(n), sim.classes]
    assert own.min() > 0.9, own
    turned = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]) @ torch.tensor(
        [[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    wrong, _ = score_at_poses(sim.volumes, refs, (turned @ sim.rotations)[:, None].expand(n, 2, 3, 3), 60.0,
                              max_shift_voxels=2.0)
    gap = own - wrong[torch.arange(n), sim.classes]  # blobs at 20 A: some turns still correlate well
    assert (gap > 0.03).all() and gap.mean() > 0.1, gap
    torch.testing.assert_close(shifts[torch.arange(n), sim.classes], sim.shifts, atol=0.5, rtol=0.0)
    for i in (0, n - 1):  # a batched call equals a loop
        one, _ = score_at_poses(sim.volumes[i : i + 1], refs, true[i : i + 1], 60.0, max_shift_voxels=2.0)
        torch.testing.assert_close(one[0], scores[i], atol=1e-5, rtol=0.0)
    halves = np.arange(n) % 2
    other = pose_half_scores(0.25, 2.0, refine_degrees=0.0)(sim.volumes, 60.0, refs.reshape(1, 2, *refs.shape[-3:]),
                                                            true[:, :1], halves)
    assert other.shape == (n, 1)  # each particle against the average of the half it is not in
    torch.testing.assert_close(other[:, 0], scores[torch.arange(n), torch.as_tensor(1 - halves)], atol=1e-5, rtol=0.0)
    with pytest.raises(ValueError, match="rotations must have shape"):
        score_at_poses(sim.volumes, refs, true[:, :1], 60.0)


@pytest.mark.parametrize("scoring,lowpass", [("pose", None), ("pose", 0.35), ("search", None), ("search", 0.35)])
def test_the_scan_returns_the_number_of_structures(scoring, lowpass):
    """The default (pose scoring at the frame's own low-pass), the global search, each also at 0.35."""
    volumes, tilts, ids, truth, frame = _rounds()
    partitions = {1: np.zeros_like(truth), 2: truth, 3: _split_one(truth), 4: _split_one(_split_one(truth), 1)}
    choose = frame_k_chooser(volumes, tilts, ids, frame, [1, 2, 3, 4], LocalReducer(),
                             lowpass_cycles_per_voxel=lowpass, scoring=scoring)
    k, table = choose(lambda k: partitions[k])
    assert k == 2, table
    assert [row["k"] for row in table] == [1, 2, 3, 4] and table[1]["distinct"] and not table[2]["distinct"]
    with pytest.raises(ValueError, match="candidates"):
        distinct_k([], lambda k: truth, volumes, tilts, ids, frame.scores)
    with pytest.raises(ValueError, match="scoring"):
        frame_k_chooser(volumes, tilts, ids, frame, [1, 2], LocalReducer(), scoring="grid")


def test_a_cluster_too_small_to_verify_is_not_distinct():
    volumes, tilts, ids, truth, frame = _rounds()
    labels = truth.copy()
    labels[np.flatnonzero(truth == 1)[:1]] = 2  # one particle alone: no half-set average to test it against
    partitions = {2: truth, 3: labels}
    choose = frame_k_chooser(volumes, tilts, ids, frame, [2, 3], LocalReducer())
    k, table = choose(lambda k: partitions[k])
    assert k == 2 and not table[1]["distinct"], table


def test_the_local_refinement_recovers_a_pose_off_by_a_few_degrees():
    """pose_half_scores refines the frame's pose locally: started 8 degrees off the true pose, it scores about
    as at the true pose, and clearly above the unrefined score."""
    maps = embedded_maps(voxel_size_angstrom=10.0, box_size=32, names=["6zu5_ribosome"])
    ref = torch.as_tensor(next(iter(maps.values())), dtype=torch.float32)
    sim = simulate_subtomograms([ref], 6, 100.0, 60.0, max_shift_voxels=1.0, seed=4)
    n = len(sim.classes)
    angle = np.deg2rad(8.0)
    off = torch.tensor([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]],
                       dtype=torch.float32)
    averages = torch.stack([ref, ref])[None]  # (1, 2, d, h, w)
    halves = np.arange(n) % 2
    start = (off @ sim.rotations)[:, None]
    true_score = pose_half_scores(refine_degrees=0.0)(sim.volumes, 60.0, averages, sim.rotations[:, None], halves)
    unrefined = pose_half_scores(refine_degrees=0.0)(sim.volumes, 60.0, averages, start, halves)
    refined = pose_half_scores(refine_degrees=10.0)(sim.volumes, 60.0, averages, start, halves)
    assert (refined > unrefined + 0.02).all() and (refined > true_score - 0.03).all(), (refined, unrefined, true_score)
