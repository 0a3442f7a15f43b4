"""Jim-Net 3D: correlation layers, forward contract, gradients, batching, head resizing, losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from jimray.config import ModelConfig
from jimray.conventions import random_rotations
from jimray.geometry import transform_volumes
from jimray.model import JimNet, global_correlation, jimnet_loss, local_correlation, parameter_count, rigid_regularizer
from jimray.model.blocks import FeatureExtractor, level_sizes

SMALL = {
    "channels": [4, 8],
    "feature_size": 4,
    "dilations": [1, 2],
    "regressor_channels": 8,
    "feature_dim": 8,
    "local_radius": 1,
}


def small_net(k: int = 3, seed: int = 0, **overrides) -> JimNet:
    torch.manual_seed(seed)
    return JimNet(ModelConfig(**{**SMALL, **overrides}), k)


def volumes(rng, b: int, n: int = 16) -> torch.Tensor:
    return torch.as_tensor(rng.standard_normal((b, n, n, n)), dtype=torch.float32)


# ---------------------------------------------------------------- correlation layers


def test_global_correlation_matches_naive_loop(rng):
    ft = torch.as_tensor(rng.standard_normal((2, 3, 2, 3, 2)))
    fs = torch.as_tensor(rng.standard_normal((2, 3, 2, 3, 2)))
    out = global_correlation(ft, fs)
    assert out.shape == (2, 12, 2, 3, 2)
    flat_t, flat_s = ft.reshape(2, 3, -1), fs.reshape(2, 3, -1)
    ref = torch.zeros(2, 12, 12, dtype=torch.float64)
    for b in range(2):
        for j in range(12):
            for n in range(12):
                a, c = flat_s[b, :, j], flat_t[b, :, n]
                ref[b, j, n] = max(float(a @ c / (a.norm() * c.norm())), 0.0)
    ref = ref / ref.norm(dim=1, keepdim=True)
    assert torch.allclose(out.reshape(2, 12, 12), ref, atol=1e-10)


def test_local_correlation_finds_a_shift(rng):
    ft = torch.as_tensor(rng.standard_normal((1, 5, 6, 6, 6)))
    fs = torch.roll(ft, shifts=1, dims=-1)  # source feature at p + e_x equals target feature at p
    out = local_correlation(ft, fs, radius=1)
    assert out.shape == (1, 27, 6, 6, 6)
    # channel of displacement (dz, dy, dx) = (0, 0, +1) is index 1*9 + 1*3 + 2
    assert torch.allclose(out[0, 14, :, :, :-1], torch.ones(6, 6, 5, dtype=torch.float64))
    assert torch.all(out[0, 14, :, :, -1] == 0)  # p + e_x leaves the grid: zero padding
    assert torch.allclose(out[0, 13, :, :, :], torch.nn.functional.cosine_similarity(ft, fs, dim=1)[0])
    assert out[0, 14].mean() > out[0].mean(dim=(-3, -2, -1)).sort().values[-2] + 0.5


def test_local_correlation_matches_naive_loop(rng):
    ft = torch.as_tensor(rng.standard_normal((2, 3, 4, 5, 3)))
    fs = torch.as_tensor(rng.standard_normal((2, 3, 4, 5, 3)))
    out = local_correlation(ft, fs, radius=2)
    assert out.shape == (2, 125, 4, 5, 3)
    k = 0
    for dz in range(-2, 3):
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                for z, y, x in np.ndindex(4, 5, 3):
                    zz, yy, xx = z + dz, y + dy, x + dx
                    inside = 0 <= zz < 4 and 0 <= yy < 5 and 0 <= xx < 3
                    a, c = ft[:, :, z, y, x], fs[:, :, zz, yy, xx] if inside else None
                    ref = torch.nn.functional.cosine_similarity(a, c, dim=1) if inside else torch.zeros(2)
                    assert torch.allclose(out[:, k, z, y, x], ref.double(), atol=1e-10)
                k += 1


def test_level_sizes():
    assert level_sizes(32, 8, 3) == [32, 16, 8]
    assert level_sizes(64, 8, 2) == [64, 8]
    assert level_sizes(16, 8, 1) == [8]
    assert level_sizes(6, 8, 2) == [6, 6]


def test_extractor_has_fixed_feature_grid(rng):
    ext = FeatureExtractor([4, 8], [1], feature_size=4)
    assert ext(volumes(rng, 2, 16)).shape == (2, 8, 4, 4, 4)
    assert ext(volumes(rng, 2, 20)).shape == (2, 8, 4, 4, 4)


# ---------------------------------------------------------------- the network


@pytest.mark.parametrize("decoder", ["procrustes", "regressor"])
@pytest.mark.parametrize("representation", ["6d", "quaternion"])
def test_forward_contract(rng, representation, decoder):
    net = small_net(k=5, stages=3, rotation_representation=representation, pose_decoder=decoder)
    s, t = volumes(rng, 2), volumes(rng, 2)
    out = net(s, t)
    assert out.features.shape == (2, net.embedding_dim) and out.logits.shape == (2, 5)
    assert net.embedding_dim == 3 * 8 + 2 * (4 + 8 + 8)  # stage features + statistics of 2 levels and the stack
    assert len(out.rotations) == len(out.shifts) == len(out.warped) == 3
    for r, sh, w in zip(out.rotations, out.shifts, out.warped, strict=True):
        assert r.shape == (2, 3, 3) and sh.shape == (2, 3) and w.shape == s.shape
        assert torch.allclose(r.transpose(1, 2) @ r, torch.eye(3).expand(2, 3, 3), atol=1e-5)
        assert torch.all(torch.linalg.det(r) > 0)
        # warped is the ORIGINAL source resampled once with the cumulative pose
        assert torch.allclose(w, transform_volumes(s, r, sh), atol=1e-6)
        assert sh.norm(dim=1).max() <= 3 * 3**0.5 * 0.25 * 16  # each stage moves at most max_shift_fraction * box
    assert net.embed(s).shape == (2, net.embedding_dim)


def test_regressor_decoder_starts_near_identity(rng):
    net = small_net(pose_decoder="regressor")
    out = net(volumes(rng, 2), volumes(rng, 2))
    for r, sh in zip(out.rotations, out.shifts, strict=True):
        assert (r - torch.eye(3)).abs().max() < 0.2
        assert sh.abs().max() < 0.5


def test_shift_is_bounded_by_the_box():
    net = small_net(max_shift_fraction=0.1)
    raw = torch.zeros(2, 9)
    raw[:, 6:] = torch.tensor([[100.0, -100.0, 0.0], [1e4, 3.0, -1e4]])
    _, shift = net._decode(raw, torch.tensor([16.0, 16.0, 16.0]))
    assert shift.abs().max() <= 1.6 + 1e-5 and shift[0, 0] == pytest.approx(1.6)


@pytest.mark.parametrize("decoder", ["procrustes", "regressor"])
def test_gradients_reach_every_stage_and_both_heads(rng, decoder):
    net = small_net(stages=3, pose_decoder=decoder)
    s, t = volumes(rng, 2), volumes(rng, 2)
    out = net(s, t)
    losses = jimnet_loss(out, s, t, torch.tensor([60.0, 45.0]), torch.tensor([60.0, 90.0]), torch.tensor([0, 2]),
                         gamma=[1.0, 1.0, 1.0], lambda_reg=0.1, lowpass_cycles_per_voxel=0.3)  # fmt: skip
    losses["total"].backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_alignment_loss_alone_trains_the_alignment_branch(rng):
    net = small_net()
    s, t = volumes(rng, 2), volumes(rng, 2)
    out = net(s, t)
    losses = jimnet_loss(out, s, t, torch.full((2,), 60.0), torch.full((2,), 60.0), None, [1.0, 0.5], 0.0, 0.3)
    assert losses["ce"] == 0
    losses["total"].backward()
    for i, reg in enumerate(net.regressors):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in reg.parameters()), f"stage {i + 1}"
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in net.cluster_head.parameters())


def test_batched_equals_per_item_in_eval(rng):
    net = small_net().eval()
    s, t = volumes(rng, 3), volumes(rng, 3)
    with torch.no_grad():
        batched = net(s, t)
        for i in range(3):
            one = net(s[i : i + 1], t[i : i + 1])
            assert torch.allclose(batched.features[i], one.features[0], atol=1e-4)
            assert torch.allclose(batched.logits[i], one.logits[0], atol=1e-4)
            assert torch.allclose(batched.rotations[-1][i], one.rotations[-1][0], atol=1e-5)
            assert torch.allclose(batched.warped[-1][i], one.warped[-1][0], atol=1e-4)


def test_resize_head_keeps_the_rest(rng):
    net = small_net(k=3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.resize_head(6)
    after = net.state_dict()
    assert net.n_clusters == 6
    for key, value in before.items():
        if key.startswith("cluster_head."):
            continue
        assert torch.equal(after[key], value), key
    s = volumes(rng, 2)
    out = net(s, s)
    assert out.logits.shape == (2, 6)
    assert torch.allclose(net.embed(s), out.features)
    with pytest.raises(ValueError, match="n_clusters"):
        net.resize_head(0)


def test_parameter_count_of_default_model():
    net = JimNet(ModelConfig(), 4)
    count = parameter_count(net)
    assert 1e5 < count < 2e6  # small enough for CPU training at box 32


def test_forward_rejects_mismatched_pairs():
    net = small_net()
    with pytest.raises(ValueError, match="one shape"):
        net(torch.zeros(1, 16, 16, 16), torch.zeros(2, 16, 16, 16))


# ---------------------------------------------------------------- losses


def test_rigid_regularizer_is_the_ball_integral(rng):
    r = torch.as_tensor(random_rotations(2, rng))
    t = torch.tensor([[0.3, -0.2, 0.1], [0.0, 0.5, 0.0]], dtype=torch.float64)
    # Monte Carlo over the unit ball of the squared displacement ||R x + t - x||^2, times the ball volume
    pts = torch.as_tensor(rng.uniform(-1, 1, (400_000, 3)))
    pts = pts[pts.norm(dim=1) <= 1]
    mc = [float(((pts @ r[i].T + t[i] - pts) ** 2).sum(1).mean()) * 4 * math.pi / 3 for i in range(2)]
    assert np.allclose(rigid_regularizer(r, t).numpy(), mc, rtol=0.02)
    assert torch.allclose(rigid_regularizer(torch.eye(3)[None], torch.zeros(1, 3)), torch.zeros(1))


def test_loss_keys_and_zero_alignment_loss_for_a_perfect_match(rng):
    net = small_net()
    s, t = volumes(rng, 2), volumes(rng, 2)
    out = net(s, t)
    tilts = torch.full((2,), 60.0)
    losses = jimnet_loss(out, s, t, tilts, tilts, torch.tensor([0, 1]), [1.0, 2.0], 0.5, 0.3)
    assert set(losses) == {"total", "ce", "align_1", "align_2", "reg"}
    assert all(v.ndim == 0 for v in losses.values())
    expected = losses["ce"] + losses["align_1"] + 2 * losses["align_2"] + 0.5 * losses["reg"]
    assert torch.allclose(losses["total"], expected)
    # a warped source equal to the target gives alignment loss 0
    out.warped = [t, t]
    out.rotations = [torch.eye(3).expand(2, 3, 3)] * 2
    perfect = jimnet_loss(out, s, t, tilts, tilts, None, [1.0, 1.0], 0.0, 0.3)
    assert perfect["align_1"].abs() < 1e-5 and perfect["align_2"].abs() < 1e-5
    with pytest.raises(ValueError, match="one weight per stage"):
        jimnet_loss(out, s, t, tilts, tilts, None, [1.0], 0.0, 0.3)


def test_pooled_statistics_barely_depend_on_where_the_particle_sits(rng):
    """F(x, x)'s statistics part changes little when the particle moves by whole feature cells (exactly so but
    for the zero padding at the box faces); the stage features, which see positions, change much more."""
    net = small_net(pose_decoder="procrustes", feature_size=8).eval()
    x = torch.zeros(1, 32, 32, 32)
    x[0, 12:20, 13:19, 12:21] = torch.as_tensor(rng.normal(size=(8, 6, 9)), dtype=torch.float32)
    moved = torch.roll(x, shifts=(4, -4, 4), dims=(-1, -2, -3))  # one cell of the 8^3 grid on every axis
    n_stats = net.embedding_dim - net.config.stages * net.config.feature_dim
    with torch.no_grad():
        a, b = net.embed(x), net.embed(moved)

    def change(u, v):
        return float((u - v).norm() / u.norm())

    assert change(a[:, -n_stats:], b[:, -n_stats:]) < 0.05
    assert change(a[:, :-n_stats], b[:, :-n_stats]) > 4 * change(a[:, -n_stats:], b[:, -n_stats:])


def test_initial_pose_is_composed_and_source_resampled_once(rng):
    from jimray.conventions import compose_poses

    net = small_net(stages=2).eval()
    s, t = volumes(rng, 2), volumes(rng, 2)
    r0 = torch.as_tensor(random_rotations(2, rng), dtype=torch.float32)
    t0 = torch.tensor([[1.0, 0.0, -0.5], [0.0, 2.0, 0.0]])
    with torch.no_grad():
        plain = net(s, t)
        same = net(s, t, initial=(torch.eye(3).expand(2, 3, 3), torch.zeros(2, 3)))
        out = net(s, t, initial=(r0, t0))
        moved = net(transform_volumes(s, r0, t0), t)  # the same first stage input, poses relative to it
    assert torch.allclose(same.rotations[-1], plain.rotations[-1], atol=1e-5)
    r1, t1 = compose_poses(r0, t0, moved.rotations[0], moved.shifts[0])
    assert torch.allclose(out.rotations[0], r1, atol=1e-5) and torch.allclose(out.shifts[0], t1, atol=1e-4)
    # every warped volume is the original source resampled once with the cumulative pose
    for r, sh, w in zip(out.rotations, out.shifts, out.warped, strict=True):
        assert torch.allclose(w, transform_volumes(s, r, sh), atol=1e-6)


def test_multistart_keeps_the_best_anchor(rng):
    from jimray.model.multistart import anchor_rotations, multistart_align

    assert anchor_rotations("identity").shape == (1, 3, 3)
    octa, ico = anchor_rotations("octahedral"), anchor_rotations("icosahedral")
    assert octa.shape == (24, 3, 3) and ico.shape == (60, 3, 3)
    assert torch.allclose(octa.transpose(1, 2) @ octa, torch.eye(3).expand(24, 3, 3), atol=1e-6)
    with pytest.raises(ValueError, match="unknown anchors"):
        anchor_rotations("cubic")
    net = small_net().eval()
    s, t = volumes(rng, 3), volumes(rng, 3)
    with torch.no_grad():
        single = net(s, t)
    r, sh, scores = multistart_align(net, s, t, 60.0, 60.0, anchor_rotations("identity"))
    assert torch.allclose(r, single.rotations[-1], atol=1e-6) and scores.shape == (3, 1)
    r, sh, scores = multistart_align(net, s, t, 60.0, 60.0, octa[:5])
    assert scores.shape == (3, 5)
    best = scores.argmax(dim=1)
    for i in range(3):  # the kept pose is the best anchor's run
        with torch.no_grad():
            run = net(s[i : i + 1], t[i : i + 1], initial=(octa[best[i]][None], torch.zeros(1, 3)))
        assert torch.allclose(r[i], run.rotations[-1][0], atol=1e-4)
