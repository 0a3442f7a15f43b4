"""Density maps from atoms, resolution definition, resampling, embedded maps, and gemmi parsing."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from jimray.io.structures import parse_structure_spec, read_atoms, structure_name
from jimray.simulate.density import (
    atoms_to_density,
    box_size_for_atoms,
    gaussian_lowpass,
    gaussian_sigma_angstrom,
    resample_map,
)
from jimray.simulate.embedded import embedded_maps, embedded_source_geometry, embedded_structure_names

STRUCTURES = Path(__file__).resolve().parents[2] / "shared" / "structures"


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.flatten().double() - a.double().mean()
    b = b.flatten().double() - b.double().mean()
    return float((a @ b) / (a.norm() * b.norm()))


def _moments(volume: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Centre (x, y, z voxel indices) and per-axis variance of a non-negative-ish map."""
    v = volume.double()
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in v.shape], indexing="ij")
    zyx = torch.stack(grids, -1)
    mean = (zyx * v[..., None]).sum((0, 1, 2)) / v.sum()
    var = (((zyx - mean) ** 2) * v[..., None]).sum((0, 1, 2)) / v.sum()
    return mean.numpy()[::-1], var.numpy()[::-1]


@pytest.fixture
def cluster(rng) -> tuple[np.ndarray, np.ndarray]:
    """A random 'molecule': 300 atoms (C, N, O, S) in an ellipsoid of ~40 x 25 x 15 Angstrom."""
    coords = rng.normal(size=(300, 3)) * np.array([20.0, 12.0, 7.0]) + np.array([5.0, -3.0, 40.0])
    numbers = rng.choice([6, 7, 8, 16], size=300)
    return coords, numbers


def test_single_atom_is_a_gaussian_of_the_defined_width():
    resolution, voxel = 16.0, 2.0  # sigma = 3.6 A = 1.8 voxels, far from the Nyquist cut
    volume = atoms_to_density(np.array([[1.0, 2.0, 3.0]]), np.array([6]), voxel, resolution, box_size=32)
    centre, var = _moments(volume)
    np.testing.assert_allclose(centre, [16, 16, 16], atol=1e-3)
    np.testing.assert_allclose(var, [(gaussian_sigma_angstrom(resolution) / voxel) ** 2] * 3, rtol=0.03)
    assert float(volume.sum()) == pytest.approx(6.0, rel=1e-4)


def test_resolution_definition_one_over_e_at_one_over_resolution():
    sigma = gaussian_sigma_angstrom(20.0)
    assert math.exp(-2 * math.pi**2 * sigma**2 * (1 / 20.0) ** 2) == pytest.approx(math.exp(-1))


def test_density_is_centred_mass_preserving_and_fits(cluster):
    coords, numbers = cluster
    box = box_size_for_atoms(coords, numbers, 4.0, 8.0)
    assert box % 2 == 0
    volume = atoms_to_density(coords, numbers, 4.0, 8.0)
    assert volume.shape == (box, box, box) and volume.dtype == torch.float32
    assert float(volume.sum()) == pytest.approx(float(numbers.sum()), rel=1e-4)
    centre, _ = _moments(volume)
    np.testing.assert_allclose(centre, [box // 2] * 3, atol=0.05)


def test_gaussian_lowpass_adds_variances(cluster):
    coords, numbers = cluster
    direct = atoms_to_density(coords, numbers, 3.0, 15.0, box_size=40)
    staged = gaussian_lowpass(atoms_to_density(coords, numbers, 3.0, 9.0, box_size=40), 3.0, 15.0, 9.0)
    assert _corr(direct, staged) > 0.995
    with pytest.raises(ValueError, match="sharpen"):
        gaussian_lowpass(direct, 3.0, 9.0, 15.0)


def test_resample_matches_direct_computation(cluster):
    coords, numbers = cluster
    fine = atoms_to_density(coords, numbers, 3.0, 20.0, box_size=48)
    direct = atoms_to_density(coords, numbers, 5.0, 20.0, box_size=24)
    resampled = resample_map(fine, 3.0, 5.0, 24)
    assert resampled.shape == (24, 24, 24)
    assert _corr(resampled, direct) > 0.98
    assert float(resampled.sum()) == pytest.approx(float(direct.sum()), rel=0.02)
    same = resample_map(fine, 3.0, 3.0, 48)
    torch.testing.assert_close(same, fine, atol=1e-4, rtol=1e-4)
    batch = resample_map(torch.stack([fine, 2 * fine]), 3.0, 5.0, 24)
    torch.testing.assert_close(batch[1], 2 * resampled, atol=1e-3, rtol=1e-4)


def test_embedded_maps_resample_to_any_geometry():
    names = embedded_structure_names()
    assert len(names) == 6 and names[0] == "6zu5_ribosome"
    voxel, resolution = embedded_source_geometry()
    assert (voxel, resolution) == (6.0, 12.0)
    maps = embedded_maps(10.0, 32)
    assert list(maps) == names
    masses = []
    for name, volume in maps.items():
        assert volume.shape == (32, 32, 32) and torch.isfinite(volume).all(), name
        centre, _ = _moments(volume.clamp(min=0))
        np.testing.assert_allclose(centre, [16, 16, 16], atol=0.5, err_msg=name)
        masses.append(float(volume.sum()))
    assert masses[0] == max(masses)  # the ribosome is the heaviest
    small = embedded_maps(20.0, 16, names=["7ddo_ace2_rbd"])
    assert list(small) == ["7ddo_ace2_rbd"] and small["7ddo_ace2_rbd"].shape == (16, 16, 16)
    with pytest.raises(ValueError, match="12 A"):
        embedded_maps(6.0, 32, resolution_angstrom=8.0)
    with pytest.raises(ValueError, match="unknown embedded"):
        embedded_maps(10.0, 32, names=["nope"])


def test_bad_atoms_are_explained():
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        atoms_to_density(np.zeros((4, 2)), np.ones(4), 5.0)
    with pytest.raises(ValueError, match="atomic numbers"):
        atoms_to_density(np.zeros((4, 3)), np.zeros(4), 5.0)
    with pytest.raises(ValueError, match="voxel_size"):
        atoms_to_density(np.zeros((4, 3)), np.ones(4), -1.0)


def test_read_atoms_of_a_real_file():
    path = STRUCTURES / "7ddo.pdb.gz"
    if not path.is_file():
        pytest.skip(f"{path} not present (the shared structures folder is only in the development checkout)")
    coords, numbers = read_atoms(path)
    assert coords.shape == (6461, 3) and coords.dtype == np.float64
    assert numbers.shape == (6461,) and set(np.unique(numbers)) <= {6, 7, 8, 16, 30}
    chain_a, _ = read_atoms(path, chain_prefix="A")
    assert 0 < len(chain_a) < len(coords)
    with pytest.raises(ValueError, match="7ddo.pdb.gz.*chain"):
        read_atoms(path, chain_prefix="Q")
    assert structure_name(path) == "7ddo"


def test_read_atoms_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.cif"
    with pytest.raises(FileNotFoundError, match="missing.cif"):
        read_atoms(missing)
    bad = tmp_path / "bad.pdb"
    bad.write_text("this is not a structure\n")
    with pytest.raises(ValueError, match="bad.pdb"):
        read_atoms(bad)


def test_read_atoms_of_a_written_pdb(tmp_path):
    """A tiny hand-written PDB file (runs without the shared folder)."""
    lines = [
        "ATOM      1  N   ALA A   1      11.104   6.134  -6.504  1.00  0.00           N",
        "ATOM      2  CA  ALA A   1      11.639   6.071  -5.147  1.00  0.00           C",
        "ATOM      3  H   ALA A   1      10.500   6.000  -6.900  1.00  0.00           H",
        "ATOM      4  O   ALA B   1      12.000   7.000  -4.000  1.00  0.00           O",
        "HETATM    5  O   HOH C   1       0.000   0.000   0.000  1.00  0.00           O",
        "END",
    ]
    path = tmp_path / "tiny.pdb"
    path.write_text("\n".join(lines) + "\n")
    coords, numbers = read_atoms(path)
    assert numbers.tolist() == [7, 6, 8]  # hydrogen and water dropped
    np.testing.assert_allclose(coords[1], [11.639, 6.071, -5.147])
    coords_a, numbers_a = read_atoms(path, chain_prefix="A")
    assert numbers_a.tolist() == [7, 6]


def test_structure_spec_with_chain_prefix(tmp_path):
    assert parse_structure_spec("models/4v8r.pdb.gz:A") == (Path("models/4v8r.pdb.gz"), "A")
    assert parse_structure_spec("models/4v8r.pdb.gz") == (Path("models/4v8r.pdb.gz"), None)
    odd = tmp_path / "a:b"
    odd.write_text("")
    assert parse_structure_spec(str(odd)) == (odd, None)  # an existing file name wins
