"""Classical baselines: constrained-CC search, MRA, PCA clustering (tiny boxes, seeded)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from jimray.baselines.mra import multi_reference_alignment
from jimray.baselines.pca_cluster import pca_gmm, pca_kmeans
from jimray.baselines.search import (
    align_pairs,
    align_to_reference,
    fourier_crop,
    local_rotation_grid,
    so3_grid,
)
from jimray.conventions import (
    MAX_ROTATION_ERROR,
    clustering_accuracy,
    random_rotations,
    rotation_error,
    translation_error,
)
from jimray.fourier.ccc import alignment_mask, constrained_ccc
from jimray.fourier.masks import wedge_masks
from jimray.fourier.xcorr import constrained_xcorr_all_shifts, mask_to_rfft, peak_shifts
from jimray.geometry.rigid import transform_volumes

DIMS = (-3, -2, -1)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny volumes gain nothing from intra-op threads, and on the shared 2-core machine oversubscribed
    threads make these tests 10x slower; restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def blobs(size: int, rng: np.random.Generator, k: int = 6) -> torch.Tensor:
    """An asymmetric volume: ``k`` Gaussian blobs of random centre and width."""
    axis = torch.arange(size, dtype=torch.float32) - size // 2
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)
    vol = torch.zeros(size, size, size)
    for _ in range(k):
        centre = torch.tensor(rng.uniform(-size / 5, size / 5, 3), dtype=torch.float32)
        sigma = rng.uniform(1.0, 2.0)
        vol += torch.exp(-((grid - centre) ** 2).sum(-1) / (2 * sigma**2))
    return vol


def apply_wedge(volumes: torch.Tensor, tilt_range_degrees: float) -> torch.Tensor:
    mask = torch.fft.ifftshift(wedge_masks(tuple(volumes.shape[-3:]), tilt_range_degrees), dim=DIMS)
    return torch.fft.ifftn(torch.fft.fftn(volumes, dim=DIMS) * mask, dim=DIMS).real


def angle_degrees(r_true, r_pred) -> np.ndarray:
    """Geodesic angle from the paper's Frobenius error: ``||R1 - R2||_F = 2 sqrt(2) sin(angle / 2)``."""
    err = rotation_error(r_true, r_pred)
    return np.degrees(2 * np.arcsin(np.clip(err / MAX_ROTATION_ERROR, 0, 1)))


def posed_particles(reference, n, rng, tilt=60.0, max_shift=2.0):
    rot = torch.tensor(random_rotations(n, rng), dtype=torch.float32)
    shift = torch.tensor(rng.uniform(-max_shift, max_shift, (n, 3)), dtype=torch.float32)
    size = reference.shape[-1]
    parts = apply_wedge(transform_volumes(reference.expand(n, size, size, size), rot, shift), tilt)
    return parts, rot, shift


def test_xcorr_matches_constrained_ccc_for_every_shift(rng):
    size = 12
    src, tgt = torch.randn(2, 1, size, size, size, generator=torch.Generator().manual_seed(0))
    rot = torch.tensor(random_rotations(1, rng), dtype=torch.float32)
    mask = alignment_mask(torch.tensor([60.0]), torch.tensor([50.0]), rot, (size,) * 3, 0.3)
    rotated = transform_volumes(src, rot)
    cc = constrained_xcorr_all_shifts(
        torch.fft.rfftn(tgt, dim=DIMS), torch.fft.rfftn(rotated, dim=DIMS), mask_to_rfft(mask), (size,) * 3
    )
    for shift in [(0, 0, 0), (2, -3, 1), (-5, 4, 5)]:  # x y z
        rolled = torch.roll(rotated, shifts=(shift[2], shift[1], shift[0]), dims=(1, 2, 3))
        expected = constrained_ccc(rolled, tgt, mask)
        got = cc[0, shift[2] % size, shift[1] % size, shift[0] % size]
        assert torch.allclose(got, expected[0], atol=1e-5)


def test_peak_shifts_finds_known_shift_with_subvoxel_and_radius():
    size = 16
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"), -1)
    signed = ((grid + size // 2) % size) - size // 2  # z y x
    true = torch.tensor([2.3, -1.4, 0.8])  # x y z
    cc = -((signed.flip(-1) - true) ** 2).sum(-1)  # a paraboloid peaked at the sub-voxel shift
    score, shift = peak_shifts(cc, None, subvoxel=True)
    assert torch.allclose(shift, true, atol=1e-4)
    _, integer = peak_shifts(cc, None, subvoxel=False)
    assert torch.equal(integer, torch.tensor([2.0, -1.0, 1.0]))
    _, limited = peak_shifts(cc, 1.0, subvoxel=False)
    assert limited.norm() <= 1.0


def test_so3_grid_is_rotations_and_covers_so3(rng):
    grid = so3_grid(30).double()
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(grid @ grid.transpose(1, 2), eye.expand_as(grid), atol=1e-5)
    assert torch.allclose(torch.linalg.det(grid), torch.ones(grid.shape[0], dtype=torch.float64), atol=1e-5)
    probes = torch.tensor(random_rotations(200, rng))
    nearest = angle_degrees(probes[:, None].expand(-1, len(grid), 3, 3), grid[None].expand(200, -1, 3, 3)).min(1)
    assert nearest.max() < 30.0  # covering radius below the step
    local = local_rotation_grid(5.0)
    assert local.shape == (27, 3, 3) and torch.allclose(local[0], torch.eye(3))
    assert angle_degrees(torch.eye(3).expand(27, 3, 3), local).max() < 5.0 * math.sqrt(3) + 1e-3


def test_search_recovers_known_pose_within_grid_step(rng):
    ref = blobs(20, rng)
    parts, rot, shift = posed_particles(ref, 3, rng)
    step = 30.0
    res = align_to_reference(parts, ref, 60.0, 90.0, angular_step_degrees=step)
    assert np.all(angle_degrees(rot, res.rotations) < step)
    assert np.all(translation_error(shift, res.shifts) < 1.0)
    # convention: the reference carried by the found pose reproduces the particle
    moved = apply_wedge(transform_volumes(ref.expand(3, 20, 20, 20), res.rotations, res.shifts), 60.0)
    for a, b in zip(moved, parts, strict=True):
        assert np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1] > 0.9


def test_align_pairs_per_pair_sources_and_tilts(rng):
    sources = torch.stack([blobs(16, rng) for _ in range(2)])
    rot = torch.tensor(random_rotations(2, rng), dtype=torch.float32)
    shift = torch.tensor(rng.uniform(-1.5, 1.5, (2, 3)), dtype=torch.float32)
    targets = torch.stack([apply_wedge(v[None], t)[0] for v, t in zip(transform_volumes(sources, rot, shift),
                                                                      (60.0, 45.0), strict=True)])
    res = align_pairs(sources, targets, 90.0, torch.tensor([60.0, 45.0]), angular_step_degrees=30.0)
    assert np.all(angle_degrees(rot, res.rotations) < 30.0)
    assert np.all(translation_error(shift, res.shifts) < 1.0)
    assert torch.all(res.scores > 0.9)


def test_search_with_wedged_sources(rng):
    """Both sides wedged: the target carries the source's rotated wedge and its own; the truth scores 1."""
    sources = apply_wedge(torch.stack([blobs(16, rng) for _ in range(2)]), 70.0)
    rot = torch.tensor(random_rotations(2, rng), dtype=torch.float32)
    shift = torch.tensor(rng.uniform(-1.5, 1.5, (2, 3)), dtype=torch.float32)
    targets = apply_wedge(transform_volumes(sources, rot, shift), 60.0)
    res = align_pairs(sources, targets, 70.0, 60.0, angular_step_degrees=30.0)
    assert np.all(angle_degrees(rot, res.rotations) < 30.0)
    assert np.all(translation_error(shift, res.shifts) < 1.0)
    assert torch.all(res.scores > 0.95)


def test_reported_score_is_constrained_ccc_at_the_pose(rng):
    """The search scores with constrained_ccc on alignment_mask (the Jim-Net loss's score), also for
    per-pair source wedges (rotated with the volumes), a shared one (rotated once per rotation) and none."""
    sources = apply_wedge(torch.stack([blobs(12, rng) for _ in range(2)]), 70.0)
    targets = apply_wedge(torch.stack([blobs(12, rng) for _ in range(2)]), 60.0)
    for source_tilt, lowpass in ((torch.tensor([70.0, 80.0]), 0.25), (70.0, 0.25), (90.0, 0.2)):
        res = align_pairs(sources, targets, source_tilt, 60.0, angular_step_degrees=60.0, refine_steps=1,
                          subvoxel=False, lowpass_cycles_per_voxel=lowpass)
        moved = transform_volumes(sources, res.rotations)
        moved = torch.stack([torch.roll(v, shifts=tuple(int(x) for x in t.flip(0)), dims=(0, 1, 2))
                             for v, t in zip(moved, res.shifts, strict=True)])
        mask = alignment_mask(torch.tensor(60.0), torch.as_tensor(source_tilt), res.rotations, (12,) * 3, lowpass)
        assert torch.allclose(res.scores, constrained_ccc(moved, targets, mask), atol=1e-4)


def test_coarse_binning_recovers_pose_and_fourier_crop_keeps_low_frequencies(rng):
    ref = blobs(24, rng, k=7)
    parts, rot, shift = posed_particles(ref, 2, rng)
    res = align_to_reference(parts, ref, 60.0, 90.0, coarse_binning=2, refine_steps=3)
    assert np.all(angle_degrees(rot, res.rotations) < 30.0)
    assert np.all(translation_error(shift, res.shifts) < 1.0)
    # a volume band-limited below the binned Nyquist is binned without aliasing: every 2nd voxel exactly
    freq = torch.fft.fftfreq(24).abs()
    keep = (freq[:, None, None] < 0.25) & (freq[None, :, None] < 0.25) & (freq[None, None, :] < 0.25)
    band_limited = torch.fft.ifftn(torch.fft.fftn(ref) * keep).real
    small = fourier_crop(band_limited[None], 2)[0]
    assert small.shape == (12, 12, 12)
    assert torch.allclose(small, band_limited[::2, ::2, ::2], atol=1e-5)
    with pytest.raises(ValueError, match="coarse_binning"):
        align_to_reference(parts, ref, coarse_binning=4)  # 0.25 * 4 > 0.5


def test_batched_equals_loop(rng):
    ref = blobs(12, rng)
    parts, _, _ = posed_particles(ref, 3, rng, max_shift=1.0)
    opts = dict(angular_step_degrees=60.0, refine_steps=1)
    batched = align_to_reference(parts, ref, 60.0, 90.0, chunk_size=64, **opts)
    for i in range(3):
        single = align_to_reference(parts[i : i + 1], ref, 60.0, 90.0, chunk_size=7, **opts)
        assert torch.allclose(single.rotations[0], batched.rotations[i], atol=1e-5)
        assert torch.allclose(single.shifts[0], batched.shifts[i], atol=1e-4)
        assert torch.allclose(single.scores[0], batched.scores[i], atol=1e-5)
    pairs = align_pairs(ref.expand(3, 12, 12, 12), parts, 90.0, 60.0, chunk_size=5, **opts)  # per-pair path
    assert torch.allclose(pairs.rotations, batched.rotations, atol=1e-5)
    assert torch.allclose(pairs.scores, batched.scores, atol=1e-5)


def test_search_rejects_bad_inputs():
    vols = torch.zeros(2, 8, 8, 8)
    with pytest.raises(ValueError, match="tilt_range"):
        align_to_reference(vols, vols[0], [60.0, 60.0, 60.0])
    with pytest.raises(ValueError, match="sources"):
        align_pairs(torch.zeros(3, 8, 8, 8), vols)
    with pytest.raises(ValueError, match="angular_step"):
        so3_grid(0.0)


def test_mra_separates_two_structures(rng):
    size, per_class = 16, 5
    refs = [blobs(size, rng, k=3), blobs(size, rng, k=7)]
    parts, truth = [], []
    for label, ref in enumerate(refs):
        p, _, _ = posed_particles(ref, per_class, rng, max_shift=1.0)
        parts.append(p)
        truth += [label] * per_class
    particles = torch.cat(parts)
    res = multi_reference_alignment(particles, 60.0, 2, iterations=3, angular_step_degrees=40.0, seed=0,
                                    refine_steps=1)
    assert clustering_accuracy(np.array(truth), res.labels) == 1.0
    assert res.references.shape == (2, size, size, size) and res.rotations.shape == (10, 3, 3)
    with pytest.raises(ValueError, match="init_references"):
        multi_reference_alignment(particles, 60.0, 2, iterations=1, init_references="template")


def test_pca_clustering_separates_unrotated_classes(rng):
    a, b = blobs(12, rng, k=3), blobs(12, rng, k=5)
    noise = torch.randn(12, 12, 12, 12, generator=torch.Generator().manual_seed(1))
    vols = torch.stack([a] * 6 + [b] * 6) + 0.3 * noise
    truth = np.array([0] * 6 + [1] * 6)
    assert clustering_accuracy(truth, pca_kmeans(vols, 2, n_components=4, seed=0)) == 1.0
    assert clustering_accuracy(truth, pca_gmm(vols, 2, n_components=2, seed=0, covariance_type="diag")) == 1.0
    with pytest.raises(ValueError, match="n_classes"):
        pca_kmeans(vols, 20)


@pytest.mark.gpu
def test_search_and_mra_on_cuda_match_cpu(rng):
    ref = blobs(16, rng)
    parts, _, _ = posed_particles(ref, 2, rng, max_shift=1.0)
    opts = dict(angular_step_degrees=45.0, refine_steps=2)
    cpu = align_to_reference(parts, ref, 60.0, 90.0, **opts)
    gpu = align_to_reference(parts.cuda(), ref.cuda(), 60.0, 90.0, **opts)
    assert gpu.rotations.is_cuda
    assert torch.allclose(gpu.scores.cpu(), cpu.scores, atol=1e-3)
    res = multi_reference_alignment(parts.cuda(), 60.0, 1, iterations=1, angular_step_degrees=60.0, refine_steps=1)
    assert res.references.is_cuda and res.labels.shape == (2,)
