"""Simulation kernels: SNR, determinism, wedge, CTF, and the pose round trip through the written files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from jimray.conventions import invert_pose
from jimray.fourier.masks import wedge_masks
from jimray.geometry.rigid import transform_volumes
from jimray.io.shards import list_shards, read_shard
from jimray.io.simulated import simulate_dataset, write_simulated_dataset
from jimray.io.star import poses_from_particles, read_particles, resolve_image_path
from jimray.simulate.embedded import embedded_maps
from jimray.simulate.subtomogram import (
    CTFParams,
    ctf_volume,
    electron_wavelength_angstrom,
    simulate_subtomograms,
)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.flatten().double() - a.double().mean()
    b = b.flatten().double() - b.double().mean()
    return float((a @ b) / (a.norm() * b.norm()))


@pytest.fixture(scope="module")
def small_maps() -> list[torch.Tensor]:
    """Three embedded structures in a 24 box at 12 A (keeps the tests fast)."""
    maps = embedded_maps(12.0, 24, names=["4v8r_tric", "6msm_cftr", "7ddo_ace2_rbd"])
    return list(maps.values())


def test_pose_round_trip_through_files(tmp_path):
    """Write a data set, read its STAR, undo each particle's pose: it matches the clean embedded map."""
    sim, names = simulate_dataset(None, per_class=2, snr=math.inf, box=32, voxel_size_angstrom=10.0,
                                  tilt_range_degrees=90.0, seed=3, max_shift_voxels=2.5)
    star_path = write_simulated_dataset(tmp_path / "ds", sim, 10.0, 90.0, names)
    table = read_particles(star_path)
    assert table.voxel_size_angstrom == pytest.approx(10.0)
    rotations, shifts = poses_from_particles(table.particles, table.voxel_size_angstrom)
    from jimray.io.mrc import read_volume

    volumes = torch.stack([torch.from_numpy(read_volume(resolve_image_path(name, star_path))[0])
                           for name in table.particles["rlnImageName"]])
    inv_r, inv_t = invert_pose(torch.as_tensor(rotations, dtype=torch.float32),
                               torch.as_tensor(shifts, dtype=torch.float32))
    restored = transform_volumes(volumes, inv_r, inv_t)
    clean = embedded_maps(10.0, 32)
    classes = table.particles["rlnClassNumber"].to_numpy() - 1
    for i, cls in enumerate(classes):
        reference = clean[names[cls]]
        assert _corr(restored[i], reference) > 0.9, names[cls]
        # the unrestored particle is not simply the reference (the test can fail)
    assert np.mean([_corr(volumes[i], clean[names[c]]) for i, c in enumerate(classes)]) < 0.9
    assert sorted(np.bincount(classes).tolist()) == [2] * len(names)


def test_shards_hold_the_ground_truth(tmp_path):
    sim, names = simulate_dataset(None, per_class=1, snr=1.0, box=16, voxel_size_angstrom=20.0, seed=1)
    write_simulated_dataset(tmp_path, sim, 20.0, 60.0, names, rows_per_shard=4)
    shards = list_shards(tmp_path / "shards")
    assert len(shards) == 2
    rows = [read_shard(p) for p in shards]
    cls = np.concatenate([r["true_class"] for r in rows])
    vol = np.concatenate([r["volume"] for r in rows])
    shift = np.stack([np.concatenate([r[f"true_shift_{a}"] for r in rows]) for a in "xyz"], axis=1)
    np.testing.assert_array_equal(cls, sim.classes.numpy())
    np.testing.assert_allclose(vol, sim.volumes.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(shift, sim.shifts.numpy(), atol=1e-5)


def test_snr_definition(small_maps):
    """Noise is added at var(signal) / var(noise) = snr, measured per particle."""
    clean = simulate_subtomograms(small_maps, 4, math.inf, 60.0, seed=5)
    for snr in (0.5, 0.05):
        noisy = simulate_subtomograms(small_maps, 4, snr, 60.0, seed=5)
        noise = noisy.volumes - clean.volumes
        ratio = clean.volumes.var(dim=(1, 2, 3)) / noise.var(dim=(1, 2, 3))
        assert torch.allclose(ratio, torch.full_like(ratio, snr), rtol=0.05), ratio


def test_deterministic_for_a_seed_and_any_batch_size(small_maps):
    a = simulate_subtomograms(small_maps, 3, 0.1, 60.0, seed=11, batch_size=4)
    b = simulate_subtomograms(small_maps, 3, 0.1, 60.0, seed=11, batch_size=64)
    c = simulate_subtomograms(small_maps, 3, 0.1, 60.0, seed=12)
    for field in ("volumes", "classes", "rotations", "shifts", "euler_degrees"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not torch.equal(a.volumes, c.volumes)
    assert not torch.equal(a.rotations, c.rotations)


def test_poses_are_within_bounds_and_classes_balanced(small_maps):
    sim = simulate_subtomograms(small_maps, 5, math.inf, 90.0, max_shift_voxels=1.5, seed=2)
    assert sim.volumes.shape == (15, 24, 24, 24) and sim.volumes.dtype == torch.float32
    assert sim.shifts.abs().max() <= 1.5
    eye = torch.eye(3).expand(15, 3, 3)
    assert torch.allclose(sim.rotations @ sim.rotations.transpose(1, 2), eye, atol=1e-5)
    assert torch.bincount(sim.classes).tolist() == [5, 5, 5]


def test_wedge_removes_the_missing_region(small_maps):
    tilt = 45.0
    sim = simulate_subtomograms(small_maps, 2, math.inf, tilt, seed=0)
    power = torch.fft.fftshift(torch.fft.fftn(sim.volumes.double(), dim=(1, 2, 3)), dim=(1, 2, 3)).abs() ** 2
    kept = wedge_masks((24, 24, 24), tilt)[0].bool()
    assert float(power[:, ~kept].sum() / power.sum()) < 1e-12
    full = simulate_subtomograms(small_maps, 2, math.inf, 90.0, seed=0)
    power_full = torch.fft.fftshift(torch.fft.fftn(full.volumes.double(), dim=(1, 2, 3)), dim=(1, 2, 3)).abs() ** 2
    assert float(power_full[:, ~kept].sum() / power_full.sum()) > 0.01


def test_ctf_zero_frequency_and_first_zero():
    params = CTFParams(defocus_um=2.0, voltage_kv=300.0, cs_mm=0.0, amplitude_contrast=0.1)
    ctf = ctf_volume((64, 64, 64), params, voxel_size_angstrom=4.0, dtype=torch.float64)
    assert float(ctf[32, 32, 32]) == pytest.approx(-0.1)
    # along x: first zero where pi*lambda*dz*k^2 = pi - atan(A / sqrt(1 - A^2))
    lam = electron_wavelength_angstrom(300.0)
    assert lam == pytest.approx(0.019687, rel=1e-3)
    k = torch.fft.fftshift(torch.fft.fftfreq(64, dtype=torch.float64))[32:] / 4.0
    line = ctf[32, 32, 32:]
    first = int(torch.nonzero(line[1:] * line[:-1] < 0)[0])
    expected = math.sqrt((math.pi - math.atan(0.1 / math.sqrt(0.99))) / (math.pi * lam * 2e4))
    assert float(k[first]) <= expected <= float(k[first + 1])


def test_ctf_is_applied_and_needs_voxel_size(small_maps):
    with pytest.raises(ValueError, match="voxel_size_angstrom"):
        simulate_subtomograms(small_maps, 1, math.inf, 90.0, ctf=CTFParams())
    plain = simulate_subtomograms(small_maps, 1, math.inf, 90.0, seed=4)
    with_ctf = simulate_subtomograms(small_maps, 1, math.inf, 90.0, seed=4, ctf=CTFParams(), voxel_size_angstrom=12.0)
    # contrast inversion at low frequency: the CTF-filtered particle anti-correlates with the plain one
    assert all(_corr(p, q) < 0 for p, q in zip(plain.volumes, with_ctf.volumes, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"per_class": 0}, "per_class"),
        ({"snr": 0.0}, "snr"),
        ({"snr": float("nan")}, "snr"),
        ({"tilt_range_degrees": 0.0}, "tilt_range"),
        ({"max_shift_voxels": -1.0}, "max_shift"),
    ],
)
def test_bad_arguments_are_explained(small_maps, kwargs, match):
    args = {"per_class": 1, "snr": 1.0, "tilt_range_degrees": 60.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        simulate_subtomograms(small_maps, **args)


def test_maps_of_different_shapes_are_refused():
    with pytest.raises(ValueError, match="one shape"):
        simulate_subtomograms([torch.zeros(8, 8, 8), torch.zeros(10, 10, 10)], 1, 1.0, 60.0)


def test_rewriting_leaves_no_stale_files(tmp_path):
    big, names = simulate_dataset(None, per_class=2, snr=1.0, box=16, voxel_size_angstrom=20.0, seed=1)
    write_simulated_dataset(tmp_path, big, 20.0, 60.0, names, rows_per_shard=4)
    assert len(list_shards(tmp_path / "shards")) == 3
    small, names = simulate_dataset(None, per_class=1, snr=1.0, box=16, voxel_size_angstrom=20.0, seed=2)
    write_simulated_dataset(tmp_path, small, 20.0, 60.0, names, rows_per_shard=4)
    assert len(list_shards(tmp_path / "shards")) == 2
    assert len(list((tmp_path / "subtomograms").glob("*.mrc"))) == 6


def test_structure_too_big_for_the_box_warns(tmp_path):
    pdb = tmp_path / "long.pdb"
    atoms = [(x, 0.0, 0.0) for x in np.linspace(-200, 200, 41)]
    pdb.write_text("\n".join(
        f"ATOM  {i + 1:5d}  CA  ALA A{i + 1:4d}    {x:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00           C"
        for i, (x, y, z) in enumerate(atoms)) + "\nEND\n")
    with pytest.warns(UserWarning, match="long.pdb.*increase --box"):
        simulate_dataset([pdb], per_class=1, snr=math.inf, box=16, voxel_size_angstrom=10.0)
