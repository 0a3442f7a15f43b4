"""Template refinement and gold-standard halves (jimray.average.refine)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation
from test_average import blob_map, correlation

from jimray.average.refine import gold_standard_refine, local_aligner, refine_template, split_halves
from jimray.average.wedge_average import wedge_weighted_average
from jimray.conventions import rotation_error
from jimray.simulate.subtomogram import simulate_subtomograms


@pytest.fixture(scope="module")
def clean_set():
    truth = blob_map(1, 20)
    sim = simulate_subtomograms([truth], per_class=12, snr=float("inf"), tilt_range_degrees=60.0, seed=3)
    g = np.random.default_rng(0)
    perturb = torch.tensor(Rotation.from_rotvec(g.normal(size=(12, 3)) * np.deg2rad(12)).as_matrix(),
                           dtype=torch.float32)
    start_r = perturb @ sim.rotations
    start_t = sim.shifts + torch.tensor(g.normal(size=(12, 3)), dtype=torch.float32)
    return truth, sim, start_r, start_t


def oracle(sim):
    """An aligner that knows the true poses (tests the loop, not the search)."""
    calls = []

    def align(particles, reference, tilt, rotations, shifts):
        calls.append(particles.shape[0])
        index = [int(torch.argmin((sim.volumes - p).abs().flatten(1).sum(1))) for p in particles]
        return sim.rotations[index], sim.shifts[index]

    align.calls = calls
    return align


def test_split_halves_deterministic_balanced_order_free():
    ids = [f"sub/particle_{i:04d}.mrc" for i in range(101)]
    halves = split_halves(ids, seed=7)
    assert set(np.unique(halves)) == {0, 1} and abs(int(halves.sum()) - 50) <= 1
    assert np.array_equal(halves, split_halves(ids, seed=7))
    order = np.random.default_rng(0).permutation(101)
    assert np.array_equal(split_halves([ids[i] for i in order], seed=7), halves[order])
    assert not np.array_equal(split_halves(ids, seed=8), halves)
    assert sorted(split_halves([5, 9], seed=0).tolist()) == [0, 1]
    with pytest.raises(ValueError, match="unique"):
        split_halves(["a", "a"])


def test_refine_with_oracle_reaches_true_average(clean_set):
    truth, sim, start_r, start_t = clean_set
    aligner = oracle(sim)
    res = refine_template(sim.volumes, 60.0, start_r, start_t, aligner=aligner, iterations=2)
    expected, _ = wedge_weighted_average(sim.volumes, sim.rotations, sim.shifts, 60.0)
    assert aligner.calls == [12, 12] and len(res.history) == 2
    assert torch.allclose(res.average, expected, atol=1e-5)
    assert torch.equal(res.rotations, sim.rotations)
    assert res.history[-1] == pytest.approx(1.0)  # converged: the template did not change in the last round


def test_no_refinement_averages_under_given_poses(clean_set):
    _, sim, start_r, start_t = clean_set
    res = refine_template(sim.volumes, 60.0, start_r, start_t, aligner=None)
    expected, _ = wedge_weighted_average(sim.volumes, start_r, start_t, 60.0)
    assert torch.allclose(res.average, expected, atol=1e-6) and res.history == []


def test_local_aligner_improves_perturbed_poses(clean_set):
    truth, sim, start_r, start_t = clean_set
    before_avg = refine_template(sim.volumes, 60.0, start_r, start_t, aligner=None).average
    res = refine_template(sim.volumes, 60.0, start_r, start_t, aligner=local_aligner(15.0, 3, max_shift_voxels=4),
                          iterations=1)
    assert rotation_error(sim.rotations, res.rotations).mean() < 0.6 * rotation_error(sim.rotations, start_r).mean()
    assert (sim.shifts - res.shifts).norm(dim=1).mean() < 0.6 * (sim.shifts - start_t).norm(dim=1).mean()
    assert correlation(res.average, truth) > correlation(before_avg, truth)


def test_gold_standard_true_poses(clean_set):
    truth, sim, _, _ = clean_set
    ids = [f"p{i}" for i in range(12)]
    res = gold_standard_refine(sim.volumes, 60.0, sim.rotations, sim.shifts, ids, aligner=None, iterations=0)
    assert np.array_equal(res.halves, split_halves(ids, 0))
    assert res.half_maps.shape == (2, 20, 20, 20) and res.fsc.shape == (11,)
    assert float(res.fsc[1:6].min()) > 0.9  # clean, correctly posed halves agree
    assert correlation(res.average, truth) > 0.95
    given = np.array([0, 1] * 6)
    assert np.array_equal(gold_standard_refine(sim.volumes, 60.0, sim.rotations, sim.shifts, ids, aligner=None,
                                               halves=given).halves, given)
    with pytest.raises(ValueError, match="one id per particle"):
        gold_standard_refine(sim.volumes, 60.0, sim.rotations, sim.shifts, ids[:3], aligner=None)


def test_gold_standard_noisy_halves_fsc_falls(clean_set):
    truth, _, _, _ = clean_set
    sim = simulate_subtomograms([truth], per_class=16, snr=0.05, tilt_range_degrees=60.0, seed=5)
    res = gold_standard_refine(sim.volumes, 60.0, sim.rotations, sim.shifts, list(range(16)), aligner=None)
    assert float(res.fsc[1]) > 0.5 > float(res.fsc[-3:].mean())  # signal at low, noise at high frequency
