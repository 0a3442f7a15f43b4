"""Properties of the rigid transforms of volume batches and of the rotation parameterisations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from jimray.conventions import compose_poses, invert_pose, random_rotations
from jimray.fourier.masks import frequency_grid, wedge_masks
from jimray.geometry import quaternion_to_matrix, rotate_fourier_masks, six_d_to_matrix, transform_volumes
from jimray.geometry.rigid import voxel_grid


def smooth_volume(
    size: int, rng: np.random.Generator, n_blobs: int = 6, sigma: float = 3.0, spread: float = 1 / 8
) -> torch.Tensor:
    """A sum of Gaussian blobs well inside the box (nothing reaches the edge, so nothing is cut off by a
    rotation) and smooth, so trilinear interpolation is accurate."""
    grid = voxel_grid((size, size, size), dtype=torch.float64)
    vol = torch.zeros(size, size, size, dtype=torch.float64)
    for _ in range(n_blobs):
        centre = torch.as_tensor(rng.uniform(-size * spread, size * spread, 3))
        vol += rng.uniform(0.5, 1.5) * torch.exp(-((grid - centre) ** 2).sum(-1) / (2 * sigma**2))
    return vol.float()


def rot_z(degrees: float) -> torch.Tensor:
    return torch.as_tensor(Rotation.from_euler("z", degrees, degrees=True).as_matrix(), dtype=torch.float32)


def test_identity_returns_input(rng):
    vol = torch.as_tensor(rng.standard_normal((2, 16, 16, 16)), dtype=torch.float32)
    eye = torch.eye(3).expand(2, 3, 3)
    out = transform_volumes(vol, eye, torch.zeros(2, 3))
    assert torch.allclose(out, vol, atol=1e-5)


def test_composed_pose_equals_transforms_in_turn(rng):
    vol = smooth_volume(24, rng)[None]
    r1, r2 = (torch.as_tensor(random_rotations(1, rng), dtype=torch.float32) for _ in range(2))
    t1, t2 = torch.tensor([[1.5, -0.7, 0.4]]), torch.tensor([[-0.8, 1.1, 0.6]])
    in_turn = transform_volumes(transform_volumes(vol, r1, t1), r2, t2)
    r, t = compose_poses(r1, t1, r2, t2)
    once = transform_volumes(vol, r, t)
    assert (once - in_turn).abs().max() < 0.05 * vol.abs().max()  # two trilinear passes against one
    assert (once - in_turn).norm() < 0.04 * in_turn.norm()
    # and the composition is not the other order (the test can fail)
    r_bad, t_bad = compose_poses(r2, t2, r1, t1)
    assert (transform_volumes(vol, r_bad, t_bad) - in_turn).abs().max() > 0.1 * vol.abs().max()


def test_rotate_then_inverse_is_identity(rng):
    vol = smooth_volume(24, rng)[None]
    r = torch.as_tensor(random_rotations(1, rng), dtype=torch.float32)
    t = torch.tensor([[1.0, 2.0, -1.5]])
    ri, ti = invert_pose(r, t)
    back = transform_volumes(transform_volumes(vol, r, t), ri, ti)
    assert (back - vol).abs().max() < 0.05 * vol.abs().max()
    assert (back - vol).norm() < 0.04 * vol.norm()


def test_rot90_about_z_moves_feature_at_r_to_R_r():
    n = 17  # odd box: the centre N // 2 is also the centre of np.rot90
    vol = torch.zeros(1, n, n, n)
    c = n // 2
    vol[0, c + 1, c, c + 4] = 1.0  # feature at (x, y, z) = c + (4, 0, 1)
    r = rot_z(90.0)[None]  # R e_x = e_y
    out = transform_volumes(vol, r)
    moved = (r[0] @ torch.tensor([4.0, 0.0, 1.0])).round().long()  # (0, 4, 1)
    assert out[0, c + moved[2], c + moved[1], c + moved[0]] == pytest.approx(1.0, abs=1e-5)
    assert out.sum() == pytest.approx(1.0, abs=1e-5)
    # the whole array: np.rot90 from the x axis towards the y axis of a (z, y, x) array
    rng = np.random.default_rng(1)
    arr = rng.standard_normal((n, n, n)).astype(np.float32)
    out = transform_volumes(torch.as_tensor(arr)[None], r)[0].numpy()
    np.testing.assert_allclose(out, np.rot90(arr, k=1, axes=(2, 1)), atol=1e-5)
    assert not np.allclose(out, np.rot90(arr, k=1, axes=(1, 2)), atol=1e-2)


def test_shift_moves_feature_by_t():
    n = 16
    vol = torch.zeros(1, n, n, n)
    c = n // 2
    vol[0, c, c, c] = 1.0
    out = transform_volumes(vol, torch.eye(3)[None], torch.tensor([[3.0, -2.0, 1.0]]))
    assert out[0, c + 1, c - 2, c + 3] == pytest.approx(1.0, abs=1e-5)


def test_batched_equals_loop(rng):
    vol = torch.as_tensor(rng.standard_normal((3, 16, 16, 16)), dtype=torch.float32)
    r = torch.as_tensor(random_rotations(3, rng), dtype=torch.float32)
    t = torch.as_tensor(rng.normal(0, 2, (3, 3)), dtype=torch.float32)
    batched = transform_volumes(vol, r, t)
    for i in range(3):
        assert torch.allclose(batched[i], transform_volumes(vol[i : i + 1], r[i : i + 1], t[i : i + 1])[0], atol=1e-5)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="rotations must be"):
        transform_volumes(torch.zeros(2, 8, 8, 8), torch.eye(3)[None])


def test_rotated_mask_matches_analytic_wedge(rng):
    n = 24
    r = torch.as_tensor(random_rotations(2, rng), dtype=torch.float32)
    rotated = rotate_fourier_masks(wedge_masks((n, n, n), [60.0, 45.0]), r) > 0.5
    # analytic: the rotated mask at k is the wedge at R^T k
    freq = frequency_grid((n, n, n))
    back = torch.einsum("zyxj,bjk->bzyxk", freq, r)  # rows: (R^T k)^T = k^T R
    tan = torch.tan(torch.deg2rad(torch.tensor([60.0, 45.0]))).view(2, 1, 1, 1)
    analytic = back[..., 2].abs() <= back[..., 0].abs() * tan
    inside = freq.norm(dim=-1) < 0.45  # the rotated corners leave the box
    agree = (rotated == analytic)[:, inside].float().mean()
    assert agree > 0.95


def test_wedge_of_rotated_volume_is_rotated_wedge(rng):
    """A volume with a missing wedge, rotated by R, has little power where ``rotate_fourier_masks(wedge, R)``
    is 0 (what leaks is interpolation and the box edge), far less than where the mask rotated by R^T is 0."""
    n = 24
    vol = smooth_volume(n, rng, n_blobs=12, sigma=1.5, spread=1 / 5)
    wedge = wedge_masks((n, n, n), 45.0)
    spectrum = torch.fft.fftshift(torch.fft.fftn(vol), dim=(-3, -2, -1))
    wedged = torch.fft.ifftn(torch.fft.ifftshift(spectrum * wedge, dim=(-3, -2, -1))).real
    r = torch.as_tensor(Rotation.from_euler("yzx", [30, 40, 70], degrees=True).as_matrix(), dtype=torch.float32)
    moved = transform_volumes(wedged, r[None])
    power = torch.fft.fftshift(torch.fft.fftn(moved[0]), dim=(-3, -2, -1)).abs().square()

    def leak(rotation: torch.Tensor) -> float:
        mask = rotate_fourier_masks(wedge, rotation[None])[0]
        return float(power[mask < 0.02].sum() / power[mask > 0.98].sum())

    assert leak(r) < 0.2
    assert leak(r.T) > 5 * leak(r)


def test_six_d_identity_and_orthonormal(rng):
    assert torch.allclose(six_d_to_matrix(torch.tensor([[1.0, 0, 0, 0, 1, 0]])), torch.eye(3)[None])
    mats = six_d_to_matrix(torch.as_tensor(rng.standard_normal((5, 6)), dtype=torch.float64))
    eye = torch.eye(3, dtype=torch.float64).expand(5, 3, 3)
    assert torch.allclose(mats.transpose(-1, -2) @ mats, eye, atol=1e-10)
    assert torch.allclose(torch.linalg.det(mats), torch.ones(5, dtype=torch.float64))


def test_six_d_recovers_a_matrix_from_its_first_two_columns(rng):
    r = torch.as_tensor(random_rotations(4, rng))
    six = torch.cat([r[:, :, 0], r[:, :, 1]], dim=1)
    assert torch.allclose(six_d_to_matrix(six), r, atol=1e-10)


def test_quaternion_matches_scipy(rng):
    q = rng.standard_normal((5, 4))
    ours = quaternion_to_matrix(torch.as_tensor(q)).numpy()
    ref = Rotation.from_quat(q[:, [1, 2, 3, 0]]).as_matrix()  # scipy is scalar-last
    np.testing.assert_allclose(ours, ref, atol=1e-10)
    assert torch.allclose(quaternion_to_matrix(torch.tensor([[1.0, 0, 0, 0]])), torch.eye(3)[None])


def test_rotation_repr_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(b, 6\)"):
        six_d_to_matrix(torch.zeros(6))
    with pytest.raises(ValueError, match=r"\(b, 4\)"):
        quaternion_to_matrix(torch.zeros(2, 3))
