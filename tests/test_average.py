"""Wedge-weighted averaging (jimray.average.wedge_average)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jimray.average.wedge_average import WedgeAccumulator, align_to_reference_frame, wedge_weighted_average
from jimray.conventions import random_rotations
from jimray.fourier.masks import wedge_masks
from jimray.geometry import transform_volumes
from jimray.simulate.subtomogram import simulate_subtomograms

N = 24


def blob_map(seed: int, size: int = N, n_blobs: int = 6) -> torch.Tensor:
    """A smooth, asymmetric test structure: a sum of Gaussian blobs near the box centre."""
    g = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(size) - size // 2] * 3, indexing="ij")
    v = np.zeros((size,) * 3)
    for _ in range(n_blobs):
        c = g.uniform(-size / 5, size / 5, 3)
        s = g.uniform(1.2, 2.5)
        v += np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s))
    return torch.tensor(v, dtype=torch.float32)


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def spectrum_energy(volume: torch.Tensor, region: torch.Tensor) -> float:
    """Fraction of the (non-DC) spectral energy of ``volume`` inside the fftshift-ed boolean ``region``."""
    power = torch.fft.fftshift(torch.fft.fftn(volume - volume.mean()), dim=(-3, -2, -1)).abs() ** 2
    return float(power[region].sum() / power.sum())


@pytest.fixture(scope="module")
def wedged_set():
    truth = blob_map(1)
    sim = simulate_subtomograms([truth], per_class=24, snr=float("inf"), tilt_range_degrees=60.0, seed=3)
    return truth, sim


def test_average_reproduces_map_and_fills_wedge(wedged_set):
    truth, sim = wedged_set
    average, weight = wedge_weighted_average(sim.volumes, sim.rotations, sim.shifts, 60.0)
    assert average.shape == weight.shape == truth.shape
    assert correlation(average, truth) > 0.95
    missing = wedge_masks(truth.shape, 60.0)[0] == 0
    # The truth has energy in the tomogram-frame missing wedge; every raw particle has none; the average has it back.
    assert spectrum_energy(sim.volumes[0], missing) < 1e-3
    assert spectrum_energy(average, missing) > 0.5 * spectrum_energy(truth, missing)
    # Naive averaging of the same aligned particles is visibly worse.
    naive = align_to_reference_frame(sim.volumes, sim.rotations, sim.shifts).mean(0)
    assert 1 - correlation(average, truth) < 0.6 * (1 - correlation(naive, truth))


def test_wedge_stays_empty_when_all_wedges_coincide():
    truth = blob_map(2)
    n = 6
    eye = torch.eye(3).expand(n, 3, 3).contiguous()
    shifts = torch.tensor(np.random.default_rng(0).uniform(-2, 2, (n, 3)), dtype=torch.float32)
    particles = transform_volumes(truth.expand(n, *truth.shape).contiguous(), eye, shifts)
    average, weight = wedge_weighted_average(particles, eye, shifts, 45.0)
    missing = wedge_masks(truth.shape, 45.0)[0] == 0
    assert float(weight[missing].max()) < 1e-4  # no particle sampled the wedge ...
    assert float(weight[~missing].min()) == pytest.approx(n, abs=1e-3)  # ... every particle sampled the rest
    assert spectrum_energy(average, missing) < 1e-3


def test_no_wedge_identity_poses_is_plain_mean(rng):
    particles = torch.as_tensor(rng.standard_normal((5, 16, 16, 16)), dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64).expand(5, 3, 3).contiguous()
    zero = torch.zeros(5, 3, dtype=torch.float64)
    average, weight = wedge_weighted_average(particles, eye, zero, 90.0)
    assert torch.allclose(weight, torch.full_like(weight, 5.0))
    assert torch.allclose(average, particles.mean(0), atol=1e-10)


def test_chunked_streamed_and_merged_agree(wedged_set):
    _, sim = wedged_set
    v, r, t = sim.volumes[:10], sim.rotations[:10], sim.shifts[:10]
    tilt = torch.linspace(40, 90, 10)
    one, w_one = wedge_weighted_average(v, r, t, tilt, chunk_size=64)
    small, w_small = wedge_weighted_average(v, r, t, tilt, chunk_size=3)
    a = WedgeAccumulator((N, N, N)).add(v[:4], r[:4], t[:4], tilt[:4])
    b = WedgeAccumulator((N, N, N)).add(v[4:7], r[4:7], t[4:7], tilt[4:7]).add(v[7:], r[7:], t[7:], tilt[7:])
    merged, w_merged = a.merge(b).result()
    assert a.merge(b).count == 10
    for avg, w in ((small, w_small), (merged, w_merged)):
        assert torch.allclose(avg, one, atol=1e-5)
        assert torch.allclose(w, w_one, atol=1e-4)


def test_wiener_floor_limits_amplification(wedged_set):
    _, sim = wedged_set
    v, r, t = sim.volumes[:3], sim.rotations[:3], sim.shifts[:3]
    low, _ = wedge_weighted_average(v, r, t, 60.0, wiener_floor=1e-3)
    high, _ = wedge_weighted_average(v, r, t, 60.0, wiener_floor=3.0)
    assert float(high.norm()) < float(low.norm())  # a floor above the counts shrinks every voxel


def test_input_errors():
    v = torch.zeros(2, 8, 8, 8)
    eye = torch.eye(3).expand(2, 3, 3)
    with pytest.raises(ValueError, match="rotations"):
        wedge_weighted_average(v, torch.eye(3).expand(3, 3, 3), torch.zeros(2, 3), 60.0)
    with pytest.raises(ValueError, match="tilt_range_degrees"):
        wedge_weighted_average(v, eye, torch.zeros(2, 3), torch.tensor([60.0, 60.0, 60.0]))
    with pytest.raises(ValueError, match="particles"):
        wedge_weighted_average(torch.zeros(8, 8, 8), eye, torch.zeros(2, 3), 60.0)
    with pytest.raises(ValueError, match="no particles"):
        WedgeAccumulator((8, 8, 8)).result()
    with pytest.raises(ValueError, match="box"):
        WedgeAccumulator((8, 8, 9)).add(v, eye, torch.zeros(2, 3), 60.0)


def test_random_rotations_fill_weight(rng):
    r = torch.tensor(random_rotations(32, rng), dtype=torch.float32)
    _, weight = wedge_weighted_average(torch.zeros(32, 16, 16, 16), r, torch.zeros(32, 3), 60.0)
    inner = torch.fft.fftshift(torch.fft.fftfreq(16)).abs() < 0.4
    region = inner[:, None, None] & inner[None, :, None] & inner[None, None, :]
    assert float(weight[region].min()) > 3.0  # every inner Fourier voxel seen by several particles


@pytest.mark.gpu
def test_cuda_matches_cpu(wedged_set):
    _, sim = wedged_set
    cpu, _ = wedge_weighted_average(sim.volumes[:8], sim.rotations[:8], sim.shifts[:8], 60.0)
    gpu, _ = wedge_weighted_average(sim.volumes[:8].cuda(), sim.rotations[:8].cuda(), sim.shifts[:8].cuda(), 60.0)
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-4)
