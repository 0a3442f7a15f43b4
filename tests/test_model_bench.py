"""The learning check's ground truth: the relative pose of a simulated pair carries source onto target."""

from __future__ import annotations

import math

import torch

from jimray.bench.model import LearningSettings, evaluate, simulate_pairs
from jimray.config import ModelConfig
from jimray.fourier import alignment_mask, constrained_ccc
from jimray.geometry import transform_volumes
from jimray.model import JimNet


def _blob(n: int = 24) -> torch.Tensor:
    idx = torch.arange(n, dtype=torch.float32) - n // 2
    z, y, x = torch.meshgrid(idx, idx, idx, indexing="ij")
    blobs = [(3.0, 0.0, 0.0, 2.5), (-2.0, 4.0, 1.0, 2.0), (0.0, -3.0, 4.0, 1.5)]  # asymmetric: x, y, z, sigma
    return sum(torch.exp(-((x - a) ** 2 + (y - b) ** 2 + (z - c) ** 2) / (2 * s**2)) for a, b, c, s in blobs)


def test_true_relative_pose_aligns_the_pair():
    settings = LearningSettings(snr=math.inf, tilt_range_degrees=90.0)
    pairs = simulate_pairs(_blob(), 4, settings, seed=3)
    full = torch.full((4,), 90.0)
    mask = alignment_mask(full, full, pairs.rotations, (24,) * 3, 0.25)
    aligned = constrained_ccc(transform_volumes(pairs.source, pairs.rotations, pairs.shifts), pairs.target, mask)
    unaligned = constrained_ccc(pairs.source, pairs.target, mask)
    assert aligned.min() > 0.97
    assert unaligned.max() < aligned.min() - 0.05


def test_evaluate_reports_errors_near_random_for_an_untrained_net():
    settings = LearningSettings(snr=1.0, tilt_range_degrees=60.0)
    pairs = simulate_pairs(_blob(16), 6, settings, seed=1)
    torch.manual_seed(0)
    net = JimNet(ModelConfig(channels=[4, 8], feature_size=4, dilations=[1], regressor_channels=8, feature_dim=8), 1)
    metrics = evaluate(net, pairs, batch_size=4)
    assert set(metrics) == {"rotation_error", "rotation_error_stage1", "translation_error_voxels"}
    assert 1.0 < metrics["rotation_error"] < 2.83  # near-identity guesses against uniform random rotations
