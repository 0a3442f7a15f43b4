"""Spectral pooling and the missing-wedge-constrained correlation (Jim-Net's alignment loss)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from jimray.conventions import random_rotations
from jimray.fourier import alignment_mask, constrained_ccc, lowpass_mask, spectral_pool, wedge_masks
from jimray.fourier.ccc import hermitian_symmetric
from jimray.geometry import rotate_fourier_masks

DIMS = (-3, -2, -1)


def fft_c(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.fftn(x, dim=DIMS), dim=DIMS)


def ifft_c(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.ifftn(torch.fft.ifftshift(x, dim=DIMS), dim=DIMS).real


def lowpassed_noise(rng, b: int, n: int, cutoff: float = 0.3) -> torch.Tensor:
    noise = torch.as_tensor(rng.standard_normal((b, n, n, n)), dtype=torch.float64)
    return ifft_c(fft_c(noise) * lowpass_mask((n, n, n), cutoff, dtype=torch.float64))


# ---------------------------------------------------------------- spectral pooling


def test_spectral_pool_resamples_band_limited_signal_exactly():
    n, m = 32, 16
    idx = torch.arange(n, dtype=torch.float64)
    z, y, x = torch.meshgrid(idx, idx, idx, indexing="ij")
    signal = torch.cos(2 * math.pi * (3 * x + 2 * y - 1 * z) / n) + 0.5 * torch.sin(2 * math.pi * 5 * z / n) + 2.0
    pooled = spectral_pool(signal[None, None], m)[0, 0]
    # the coarse grid samples every (n / m)-th fine voxel
    assert pooled.shape == (m, m, m)
    assert torch.allclose(pooled, signal[:: n // m, :: n // m, :: n // m], atol=1e-10)


def test_spectral_pool_keeps_mean_and_removes_high_frequencies(rng):
    x = torch.as_tensor(rng.standard_normal((2, 3, 20, 20, 20)))
    pooled = spectral_pool(x, (10, 9, 7))
    assert pooled.shape == (2, 3, 10, 9, 7)
    assert torch.allclose(pooled.mean(dim=DIMS), x.mean(dim=DIMS), atol=1e-10)
    # a checkerboard (Nyquist only) pools to its mean
    idx = torch.arange(16)
    checker = ((idx[:, None, None] + idx[None, :, None] + idx[None, None, :]) % 2).double()
    assert torch.allclose(spectral_pool(checker[None, None], 8), torch.full((1, 1, 8, 8, 8), 0.5, dtype=torch.float64))


def test_spectral_pool_is_differentiable(rng):
    x = torch.as_tensor(rng.standard_normal((1, 1, 6, 6, 6))).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: spectral_pool(v, 4), (x,), fast_mode=True)


def test_spectral_pool_rejects_upsampling():
    with pytest.raises(ValueError, match="spectral_pool size"):
        spectral_pool(torch.zeros(1, 1, 8, 8, 8), 9)
    with pytest.raises(ValueError, match=r"\(b, c, d, h, w\)"):
        spectral_pool(torch.zeros(8, 8, 8), 4)


# ---------------------------------------------------------------- constrained correlation


def test_ccc_is_one_for_identical_inputs(rng):
    v = lowpassed_noise(rng, 3, 16)
    mask = alignment_mask(torch.full((3,), 60.0), torch.full((3,), 45.0), torch.eye(3).expand(3, 3, 3), (16,) * 3, 0.3)
    ccc = constrained_ccc(v, v, mask.double())
    assert ccc.shape == (3,)
    assert torch.allclose(ccc, torch.ones(3, dtype=torch.float64), atol=1e-8)


def test_ccc_invariant_to_scale_and_offset(rng):
    s, t = lowpassed_noise(rng, 2, 16), lowpassed_noise(rng, 2, 16)
    s = 0.5 * s + 0.5 * t  # correlated, so the value is not near 0 by chance
    mask = wedge_masks((16,) * 3, 60.0).double()
    ccc = constrained_ccc(s, t, mask)
    scaled = constrained_ccc(3.7 * s - 2.0, 0.2 * t + 11.0, mask)
    assert ccc.abs().min() > 0.3
    assert torch.allclose(ccc, scaled, atol=1e-10)
    assert torch.allclose(constrained_ccc(-s, t, mask), -ccc, atol=1e-10)


def test_ccc_ignores_what_lies_in_the_missing_wedge(rng):
    n = 16
    s, t = lowpassed_noise(rng, 2, n), lowpassed_noise(rng, 2, n)
    rotations = torch.as_tensor(random_rotations(2, rng))
    tilts = torch.tensor([60.0, 45.0])
    mask = alignment_mask(tilts, tilts, rotations, (n,) * 3, 0.4).double()
    target_wedge = wedge_masks((n,) * 3, tilts, dtype=torch.float64)
    source_wedge = rotate_fourier_masks(wedge_masks((n,) * 3, tilts, dtype=torch.float64), rotations) > 0.5
    junk_t = fft_c(torch.as_tensor(rng.standard_normal((2, n, n, n)))) * (1 - target_wedge)
    junk_s = fft_c(torch.as_tensor(rng.standard_normal((2, n, n, n)))) * (~source_wedge)
    t_changed = ifft_c(fft_c(t) + 5 * junk_t)
    s_changed = ifft_c(fft_c(s) + 5 * junk_s)
    before = constrained_ccc(s, t, mask)
    after = constrained_ccc(s_changed, t_changed, mask)
    assert torch.allclose(before, after, atol=1e-10)
    # the same junk inside the measured region does change it
    like_s = ifft_c(fft_c(s) * mask)
    assert (constrained_ccc(s, t + 5 * like_s, mask) - before).min() > 0.3


def test_ccc_matches_real_space_pearson_for_symmetric_mask(rng):
    n = 15  # odd box: fftshift-ed masks are Hermitian-symmetric, s* and t* are real
    s, t = lowpassed_noise(rng, 2, n), lowpassed_noise(rng, 2, n)
    mask = (wedge_masks((n,) * 3, 50.0, dtype=torch.float64) * lowpass_mask((n,) * 3, 0.3, dtype=torch.float64))
    s_star, t_star = ifft_c(fft_c(s) * mask), ifft_c(fft_c(t) * mask)
    ref = []
    for a, b in zip(s_star, t_star, strict=True):
        a, b = (a - a.mean()).flatten(), (b - b.mean()).flatten()
        ref.append(float(a @ b / (a.norm() * b.norm())))
    assert np.allclose(constrained_ccc(s, t, mask).numpy(), ref, atol=1e-8)


def test_ccc_batched_equals_per_item(rng):
    s, t = lowpassed_noise(rng, 3, 16), lowpassed_noise(rng, 3, 16)
    rotations = torch.as_tensor(random_rotations(3, rng))
    tilt_t, tilt_s = torch.tensor([60.0, 50.0, 90.0]), torch.tensor([40.0, 60.0, 60.0])
    mask = alignment_mask(tilt_t, tilt_s, rotations, (16,) * 3, 0.25)
    batched = constrained_ccc(s, t, mask.double())
    for i in range(3):
        one = alignment_mask(tilt_t[i : i + 1], tilt_s[i : i + 1], rotations[i : i + 1], (16,) * 3, 0.25)
        assert torch.allclose(batched[i], constrained_ccc(s[i : i + 1], t[i : i + 1], one.double())[0], atol=1e-10)


def test_ccc_is_differentiable(rng):
    s = lowpassed_noise(rng, 1, 8).requires_grad_(True)
    t = lowpassed_noise(rng, 1, 8)
    mask = wedge_masks((8,) * 3, 60.0).double()
    assert torch.autograd.gradcheck(lambda v: constrained_ccc(v, t, mask), (s,), fast_mode=True)


def test_alignment_mask_is_the_intersection(rng):
    n = 16
    rotations = torch.as_tensor(random_rotations(2, rng), dtype=torch.float32)
    mask = alignment_mask(torch.tensor([60.0, 30.0]), torch.tensor([45.0, 60.0]), rotations, (n,) * 3, 0.25)
    target = wedge_masks((n,) * 3, torch.tensor([60.0, 30.0]))
    source = rotate_fourier_masks(wedge_masks((n,) * 3, torch.tensor([45.0, 60.0])), rotations) > 0.5
    low = lowpass_mask((n,) * 3, 0.25)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    expected = hermitian_symmetric((target.bool() & source & low.bool()).float())
    assert torch.equal(mask, expected)
    assert mask.sum() > 0.9 * (target.bool() & source & low.bool()).sum()  # symmetrising drops little
    # identity and no wedge: just the low-pass
    full = alignment_mask(torch.tensor([90.0]), torch.tensor([90.0]), torch.eye(3)[None], (n,) * 3, 0.25)
    assert torch.equal(full[0], low)


def test_hermitian_symmetric_keeps_masked_volumes_real(rng):
    for n in (15, 16):
        mask = (torch.as_tensor(rng.random((n, n, n))) > 0.5).double()
        sym = hermitian_symmetric(mask)
        assert torch.all(sym <= mask)
        spectrum = fft_c(torch.as_tensor(rng.standard_normal((n, n, n))))
        filtered = torch.fft.ifftn(torch.fft.ifftshift(spectrum * sym))
        assert filtered.imag.abs().max() < 1e-10 * filtered.real.abs().max()


def test_alignment_mask_checks_shapes():
    with pytest.raises(ValueError, match="tilt_range_degrees"):
        alignment_mask(torch.ones(3) * 60, torch.ones(2) * 60, torch.eye(3).expand(2, 3, 3), (8,) * 3, 0.25)
    with pytest.raises(ValueError, match="one shape"):
        constrained_ccc(torch.zeros(1, 8, 8, 8), torch.zeros(2, 8, 8, 8), torch.ones(8, 8, 8))
