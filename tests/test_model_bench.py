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
    keys = {"rotation_error", "rotation_error_stage1", "translation_error_voxels", "fraction_within_0.5"}
    assert set(metrics) == keys
    assert 1.0 < metrics["rotation_error"] < 2.83  # near-identity guesses against uniform random rotations


def test_curriculum_schedule():
    from jimray.bench.model import parse_curriculum, plan_of

    stages = parse_curriculum("30:5,180:3")
    s = LearningSettings(curriculum=stages)
    plan = plan_of(s)
    assert s.total_steps() == 8 and [plan.angle_at(i) for i in (1, 5, 6, 8)] == [30.0, 30.0, 180.0, 180.0]
    assert LearningSettings(steps=4).schedule() == [(180.0, 4)] and parse_curriculum("") is None
    for bad in ("30", "0:5", "30:0", "x:3"):
        try:
            parse_curriculum(bad)
        except ValueError as exc:
            assert "curriculum stage" in str(exc)
        else:
            raise AssertionError(f"{bad!r} was accepted")


def test_learning_check_runs_and_records_both_held_out_sets():
    """A 2-step curriculum run of a tiny net: the curve has the uniform-SO(3) and the curriculum-angle errors."""
    from jimray.bench.model import learning_check

    model = ModelConfig(channels=[4, 8], feature_size=4, dilations=[1], regressor_channels=8, feature_dim=8)
    s = LearningSettings(box_size=16, voxel_size_angstrom=20.0, curriculum=[(30.0, 1), (180.0, 1)], batch_size=2,
                         eval_pairs=4, eval_every=1, model=model)  # fmt: skip
    result = learning_check(s, "cpu")
    assert [row["max_relative_angle"] for row in result["curve"]] == [30.0, 30.0, 180.0]
    for row in result["curve"]:
        if row["max_relative_angle"] == 180.0:  # the curriculum's held-out set is then the uniform one
            assert math.isclose(row["rotation_error_at_angle"], row["rotation_error"], rel_tol=1e-9)
        else:  # pairs at most 30 degrees apart: far below the uniform-SO(3) error of a barely trained net
            assert row["rotation_error_at_angle"] < 0.5 * row["rotation_error"]
    assert result["curve"][1]["loss"] > 0 and 2.0 < result["identity_rotation_error"] < 2.83
