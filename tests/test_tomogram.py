"""simulate_tomogram: placement, poses in the conventions of jimray, missing wedge, SNR, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist

from jimray.conventions import box_center, euler_to_matrix
from jimray.fourier.masks import wedge_masks
from jimray.geometry.rigid import transform_volumes
from jimray.simulate.tomogram import simulate_tomogram

BOX = 12


def _maps(rng: np.random.Generator, k: int = 2) -> list[torch.Tensor]:
    """Asymmetric blobby maps (so a wrong rotation convention shows)."""
    from scipy.ndimage import gaussian_filter

    out = []
    for _ in range(k):
        vol = np.zeros((BOX,) * 3, np.float32)
        pts = rng.integers(3, BOX - 3, size=(4, 3))
        for z, y, x in pts:
            vol[z, y, x] += rng.uniform(1, 3)
        out.append(torch.from_numpy(gaussian_filter(vol, 1.0).astype(np.float32)))
    return out


def test_shapes_placement_and_balance(rng):
    maps = _maps(rng, 3)
    sim = simulate_tomogram(maps, (24, 64, 80), 12, tilt_range_degrees=60, snr=1.0, seed=3, min_distance=10)
    assert sim.tomogram.shape == (24, 64, 80) and sim.tomogram.dtype == torch.float32
    assert sim.coords.shape == (12, 3) and sim.euler_degrees.shape == (12, 3)
    assert np.bincount(sim.classes, minlength=3).tolist() == [4, 4, 4]
    c = box_center(BOX)
    lo, hi = c, np.array([80, 64, 24]) - 1 - c
    assert (sim.coords >= lo).all() and (sim.coords <= hi).all()
    assert pdist(sim.coords).min() >= 10
    again = simulate_tomogram(maps, (24, 64, 80), 12, tilt_range_degrees=60, snr=1.0, seed=3, min_distance=10)
    assert torch.equal(sim.tomogram, again.tomogram) and np.array_equal(sim.coords, again.coords)
    other = simulate_tomogram(maps, (24, 64, 80), 12, tilt_range_degrees=60, snr=1.0, seed=4, min_distance=10)
    assert not np.allclose(sim.coords, other.coords)


def test_particles_follow_the_pose_convention(rng):
    """Noise- and wedge-free: the box cut around each true coordinate is the map transformed by the
    pose (euler_to_matrix(euler), sub-voxel shift) of jimray.conventions."""
    maps = _maps(rng)
    sim = simulate_tomogram(
        maps, (BOX * 3, 64, 64), 5, tilt_range_degrees=90, snr=math.inf, seed=1, min_distance=BOX * math.sqrt(3) + 1
    )
    c = box_center(BOX)
    for coord, cls, euler in zip(sim.coords, sim.classes, sim.euler_degrees, strict=True):
        x0, y0, z0 = np.rint(coord).astype(int) - c
        cut = sim.tomogram[z0 : z0 + BOX, y0 : y0 + BOX, x0 : x0 + BOX]
        rot = torch.as_tensor(euler_to_matrix(euler)[None], dtype=torch.float32)
        shift = torch.as_tensor((coord - np.rint(coord))[None], dtype=torch.float32)
        expected = transform_volumes(maps[cls][None], rot, shift)[0]
        torch.testing.assert_close(cut, expected, atol=1e-4, rtol=1e-4)


def test_snr_matches_definition(rng):
    maps = _maps(rng)
    kwargs = dict(shape=(24, 48, 48), n_particles=6, tilt_range_degrees=90, seed=2, min_distance=BOX)
    clean = simulate_tomogram(maps, snr=math.inf, **kwargs)
    noisy = simulate_tomogram(maps, snr=0.25, **kwargs)
    variances = []
    for coord, cls in zip(clean.coords, clean.classes, strict=True):
        shift = torch.as_tensor((coord - np.rint(coord))[None], dtype=torch.float32)
        rot = torch.as_tensor(euler_to_matrix(clean.euler_degrees[len(variances)])[None], dtype=torch.float32)
        variances.append(float(transform_volumes(maps[cls][None], rot, shift).var(unbiased=False)))
    noise_variance = float((noisy.tomogram - clean.tomogram).var())
    assert noise_variance == pytest.approx(np.mean(variances) / 0.25, rel=0.05)


def test_missing_wedge_is_empty(rng):
    sim = simulate_tomogram(_maps(rng), (32, 32, 32), 2, tilt_range_degrees=45, snr=math.inf, seed=0)
    spectrum = torch.fft.fftshift(torch.fft.fftn(sim.tomogram)).abs()
    missing = wedge_masks((32, 32, 32), 45.0)[0] == 0
    assert spectrum[missing].max() < 1e-3 * spectrum.max()
    assert spectrum[~missing].max() > 0


def test_bad_requests_raise(rng):
    maps = _maps(rng)
    with pytest.raises(ValueError, match="fewer particles"):
        simulate_tomogram(maps, (2 * BOX, 40, 40), 50, seed=0)
    with pytest.raises(ValueError, match="too small"):
        simulate_tomogram(maps, (BOX, 40, 40), 1)
    with pytest.raises(ValueError, match=">= the map box"):
        simulate_tomogram(maps, (8, 40, 40), 1)
    with pytest.raises(ValueError, match="snr"):
        simulate_tomogram(maps, (24, 40, 40), 1, snr=0)
    with pytest.raises(ValueError, match="cubic"):
        simulate_tomogram([torch.zeros(4, 5, 6)], (24, 40, 40), 1)
