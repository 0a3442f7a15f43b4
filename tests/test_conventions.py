"""The conventions module against scipy and against the definitions it writes down."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from jimray import conventions as cv


def test_euler_matrix_is_relion_scipy_inverse(rng):
    angles = rng.uniform([-180, 0, -180], [180, 180, 180], size=(20, 3))
    expected = Rotation.from_euler("ZYZ", angles, degrees=True).inv().as_matrix()
    assert np.allclose(cv.euler_to_matrix(angles), expected, atol=1e-12)


def test_euler_round_trip_and_batch_shapes(rng):
    angles = rng.uniform([-180, 5, -180], [180, 175, 180], size=(4, 5, 3))
    mats = cv.euler_to_matrix(angles)
    assert mats.shape == (4, 5, 3, 3)
    assert np.allclose(cv.euler_to_matrix(cv.matrix_to_euler(mats)), mats, atol=1e-9)


def test_rot_only_is_a_rotation_about_z_that_moves_x_to_minus_y():
    # RELION: rot=90 alone; matrix = Rz(90)^-1, so the reference x axis goes to -y in the particle
    m = cv.euler_to_matrix(np.array([90.0, 0.0, 0.0]))
    assert np.allclose(m @ np.array([1.0, 0, 0]), [0, -1, 0], atol=1e-12)


def test_random_rotations_are_uniform_and_reproducible():
    a = cv.random_rotations(4000, np.random.default_rng(3))
    b = cv.random_rotations(4000, np.random.default_rng(3))
    assert np.array_equal(a, b)
    assert np.allclose(a @ a.transpose(0, 2, 1), np.eye(3), atol=1e-9)
    assert np.abs(a.mean(axis=0)).max() < 0.05  # Haar measure: E[R] = 0


def test_origin_and_shift_are_opposite_and_scaled(rng):
    shift = rng.normal(size=(7, 3))
    origin = cv.shift_to_origin_angstrom(shift, 13.68)
    assert np.allclose(origin, -shift * 13.68)
    assert np.allclose(cv.origin_angstrom_to_shift(origin, 13.68), shift)
    with pytest.raises(ValueError, match="voxel size"):
        cv.origin_angstrom_to_shift(origin, 0.0)


def test_box_centre_is_n_over_two():
    assert [cv.box_center(n) for n in (1, 16, 17, 32)] == [0, 8, 8, 16]


def test_compose_and_invert_poses(rng):
    r = torch.as_tensor(cv.random_rotations(5, rng))
    t = torch.as_tensor(rng.normal(size=(5, 3)))
    r2 = torch.as_tensor(cv.random_rotations(5, rng))
    t2 = torch.as_tensor(rng.normal(size=(5, 3)))
    x = torch.as_tensor(rng.normal(size=(5, 3)))
    rc, tc = cv.compose_poses(r, t, r2, t2)
    step = (r2 @ ((r @ x[..., None]).squeeze(-1) + t)[..., None]).squeeze(-1) + t2
    assert torch.allclose((rc @ x[..., None]).squeeze(-1) + tc, step)
    ri, ti = cv.invert_pose(r, t)
    back = (ri @ ((r @ x[..., None]).squeeze(-1) + t)[..., None]).squeeze(-1) + ti
    assert torch.allclose(back, x)


def test_rotation_error_range_and_translation_error(rng):
    r = cv.random_rotations(3, rng)
    assert np.allclose(cv.rotation_error(r, r), 0)
    flip = Rotation.from_euler("z", 180, degrees=True).as_matrix()
    assert cv.rotation_error(np.eye(3), flip) == pytest.approx(cv.MAX_ROTATION_ERROR)
    assert cv.translation_error(np.zeros(3), np.array([3.0, 4.0, 0.0])) == pytest.approx(5.0)


def test_clustering_accuracy_uses_hungarian_matching():
    truth = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    assert cv.clustering_accuracy(truth, np.array([5, 5, 5, 3, 3, 9, 9, 9])) == 1.0
    assert cv.clustering_accuracy(truth, np.array([1, 1, 0, 0, 0, 2, 2, 2])) == pytest.approx(7 / 8)
    assert cv.clustering_accuracy(truth, np.zeros(8, int)) == pytest.approx(3 / 8)
