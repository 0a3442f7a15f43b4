"""FSC, soft spherical masks and FSC-threshold resolution (jimray.fourier.fsc)."""

from __future__ import annotations

import math

import pytest
import torch
from torch_fourier_shell_correlation import fsc as reference_fsc

from jimray.fourier.fsc import fsc, resolution_at, shell_frequencies_per_angstrom, soft_spherical_mask


@pytest.mark.parametrize("shape", [(16, 16, 16), (17, 17, 17), (24, 24, 24), (16, 20, 18)])
@pytest.mark.parametrize("noise", [None, 0.0, 0.3, 2.0])
def test_fsc_matches_reference_package(shape, noise):
    g = torch.Generator().manual_seed(sum(shape))
    a = torch.randn(shape, generator=g)
    b = torch.randn(shape, generator=g) if noise is None else a + noise * torch.randn(shape, generator=g)
    ours = fsc(a, b)
    theirs = reference_fsc(a, b).double()
    assert ours.shape == theirs.shape == (min(shape) // 2 + 1,)
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_fsc_of_smooth_correlated_maps_matches_reference():
    g = torch.Generator().manual_seed(3)
    base = torch.nn.functional.avg_pool3d(torch.randn(1, 1, 32, 32, 32, generator=g), 5, 1, 2)[0, 0]
    a = base + 0.05 * torch.randn(32, 32, 32, generator=g)
    b = base + 0.05 * torch.randn(32, 32, 32, generator=g)
    ours, theirs = fsc(a, b), reference_fsc(a, b).double()
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert ours[1] > 0.9 and ours[-1] < ours[1]  # correlated at low, decorrelated at high frequency


def test_identical_maps_give_fsc_one(rng):
    a = torch.as_tensor(rng.standard_normal((20, 20, 20)), dtype=torch.float32)
    assert torch.allclose(fsc(a, a), torch.ones(11, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(fsc(a, 3.0 * a), torch.ones(11, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(fsc(a, -a)[1:], -torch.ones(10, dtype=torch.float64), atol=1e-10)


def test_fsc_batched_equals_loop(rng):
    a = torch.as_tensor(rng.standard_normal((3, 16, 16, 16)))
    b = torch.as_tensor(rng.standard_normal((3, 16, 16, 16)))
    batched = fsc(a, b)
    assert batched.shape == (3, 9)
    for i in range(3):
        assert torch.allclose(batched[i], fsc(a[i], b[i]))


def test_fsc_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        fsc(torch.zeros(8, 8, 8), torch.zeros(8, 8, 9))


def test_soft_spherical_mask_profile():
    mask = soft_spherical_mask((32, 32, 32), radius_voxels=8, edge_voxels=4)
    assert mask.shape == (32, 32, 32)
    assert mask[16, 16, 16] == 1 and mask[16, 16, 24] == 1  # centre N//2 and r = radius
    assert 0 < mask[16, 16, 26] < 1  # inside the edge
    assert mask[16, 16, 28] == 0 and mask[0, 0, 0] == 0
    assert torch.all(mask[16, 16, 16:].diff() <= 0)  # falls monotonically outward
    hard = soft_spherical_mask((16, 16, 16), 4, 0)
    assert set(hard.unique().tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError):
        soft_spherical_mask((16, 16, 16), -1, 2)


def test_shell_frequencies_and_resolution():
    freq = shell_frequencies_per_angstrom(32, 2.0)
    assert freq.shape == (17,)
    assert math.isclose(float(freq[16]), 1 / 4.0)  # Nyquist 1 / (2 * voxel size)
    curve = torch.tensor([1.0] + [1.0 - 0.1 * k for k in range(1, 17)], dtype=torch.float64)  # crosses 0.143 at k=8..9
    res = resolution_at(curve, 0.143, voxel_size_angstrom=2.0, box_voxels=32)
    k_cross = 8 + (curve[8] - 0.143) / (curve[8] - curve[9])
    assert math.isclose(res, 32 * 2.0 / float(k_cross), rel_tol=1e-9)
    assert resolution_at(torch.ones(17), voxel_size_angstrom=2.0, box_voxels=32) == 4.0  # never crosses: Nyquist
    assert resolution_at(curve, 0.5, voxel_size_angstrom=2.0, box_voxels=32) > res
    with pytest.raises(ValueError, match="shells"):
        resolution_at(torch.ones(10), voxel_size_angstrom=2.0, box_voxels=32)
