"""Simulated alignment pairs: the returned pose carries the source onto the target."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from jimray.geometry import transform_volumes
from jimray.simulate.embedded import embedded_maps
from jimray.simulate.pairs import rotations_within, simulate_pairs


def test_rotations_within_respect_the_bound(rng):
    mats = rotations_within(500, 30.0, rng)
    angles = np.degrees(Rotation.from_matrix(mats).magnitude())
    assert angles.max() <= 30.0 + 1e-9 and angles.mean() > 15.0  # Haar density favours the larger angles
    assert np.allclose(np.linalg.det(mats), 1.0)
    full = rotations_within(4000, 180.0, rng)
    assert abs(np.trace(full, axis1=1, axis2=2).mean()) < 0.1  # uniform SO(3): E[tr R] = 0
    with pytest.raises(ValueError, match="max_angle_degrees"):
        rotations_within(3, 0.0, rng)


@pytest.mark.parametrize("max_angle", [40.0, 180.0])
def test_pose_carries_source_onto_target(max_angle):
    ref = embedded_maps(12.0, 24, names=["6zu5_ribosome"])["6zu5_ribosome"]
    pairs = simulate_pairs(ref, 3, math.inf, 90.0, seed=1, max_relative_angle_degrees=max_angle)
    warped = transform_volumes(pairs.source, pairs.rotations, pairs.shifts)
    for i in range(3):
        corr = torch.corrcoef(torch.stack([warped[i].flatten(), pairs.target[i].flatten()]))[0, 1]
        assert corr > 0.95
    angles = np.degrees(Rotation.from_matrix(pairs.rotations.numpy()).magnitude())
    assert angles.max() <= max_angle + 1e-3
    again = simulate_pairs(ref, 3, math.inf, 90.0, seed=1, max_relative_angle_degrees=max_angle)
    assert torch.equal(again.target, pairs.target)
