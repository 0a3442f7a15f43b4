"""STAR particle files: pose round trips (via starfile), optics block, voxel size, image paths, errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import starfile

from jimray.conventions import euler_to_matrix, random_rotations, rotation_error
from jimray.io.mrc import write_stack
from jimray.io.star import (
    StarError,
    image_specs,
    pose_columns,
    poses_from_particles,
    read_particles,
    resolve_image_path,
    write_particles,
)


def test_pose_round_trip_through_a_star_file(tmp_path, rng):
    rotations = random_rotations(20, rng)
    shifts = rng.normal(scale=2.0, size=(20, 3))
    particles = pd.DataFrame({"rlnImageName": [f"{i + 1}@stack.mrcs" for i in range(20)],
                              **pose_columns(rotations, shifts, 4.5)})
    write_particles(tmp_path / "p.star", particles, 4.5, box_size=32)
    table = read_particles(tmp_path / "p.star")
    assert table.voxel_size_angstrom == pytest.approx(4.5)
    back_r, back_t = poses_from_particles(table.particles, table.voxel_size_angstrom)
    assert rotation_error(rotations, back_r).max() < 1e-5  # starfile writes 6 decimals
    np.testing.assert_allclose(back_t, shifts, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == ["p.star"]


def test_written_file_is_relion_31_style(tmp_path):
    write_particles(tmp_path / "p.star", pd.DataFrame({"rlnImageName": ["a.mrc", "b.mrc"]}), 2.0, box_size=24)
    blocks = starfile.read(tmp_path / "p.star", always_dict=True)
    optics, particles = blocks["optics"], blocks["particles"]
    assert optics["rlnOpticsGroupName"].iloc[0] == "opticsGroup1"
    assert optics["rlnImagePixelSize"].iloc[0] == pytest.approx(2.0)
    assert optics["rlnImageSize"].iloc[0] == 24 and optics["rlnImageDimensionality"].iloc[0] == 3
    assert (particles["rlnOpticsGroup"] == 1).all()


def test_box_size_taken_from_first_image_when_not_given(tmp_path, rng):
    write_stack(tmp_path / "s.mrcs", rng.normal(size=(2, 16, 16, 16)), 1.0)
    write_particles(tmp_path / "p.star", pd.DataFrame({"rlnImageName": ["1@s.mrcs", "2@s.mrcs"]}), 1.0)
    assert read_particles(tmp_path / "p.star").optics["rlnImageSize"].iloc[0] == 16


def test_convention_of_angles_and_origins(rng):
    df = pd.DataFrame({"rlnAngleRot": [10.0], "rlnAngleTilt": [20.0], "rlnAnglePsi": [30.0],
                       "rlnOriginXAngst": [3.0], "rlnOriginYAngst": [-6.0], "rlnOriginZAngst": [0.0]})
    rotations, shifts = poses_from_particles(df, 3.0)
    np.testing.assert_allclose(rotations[0], euler_to_matrix(np.array([10.0, 20.0, 30.0])))
    np.testing.assert_allclose(shifts[0], [-1.0, 2.0, 0.0])  # origin = -t * voxel size


def test_missing_pose_columns_give_identity_and_zero():
    rotations, shifts = poses_from_particles(pd.DataFrame({"rlnImageName": ["a", "b"]}), 1.0)
    np.testing.assert_allclose(rotations, np.broadcast_to(np.eye(3), (2, 3, 3)), atol=1e-12)
    np.testing.assert_array_equal(shifts, np.zeros((2, 3)))


def test_legacy_pixel_origins(rng):
    rotations, shifts = poses_from_particles(pd.DataFrame({"rlnOriginX": [1.5], "rlnOriginY": [0.0],
                                                           "rlnOriginZ": [-2.0]}), 5.0)
    np.testing.assert_allclose(shifts[0], [-1.5, 0.0, 2.0])


def test_relion30_file_without_optics(tmp_path):
    starfile.write(pd.DataFrame({"rlnImageName": ["a.mrc"], "rlnPixelSize": [1.7]}), tmp_path / "old.star")
    table = read_particles(tmp_path / "old.star")
    assert table.optics is None and table.voxel_size_angstrom == pytest.approx(1.7)


def test_voxel_size_none_when_absent(tmp_path):
    starfile.write({"particles": pd.DataFrame({"rlnImageName": ["a.mrc"]})}, tmp_path / "p.star")
    assert read_particles(tmp_path / "p.star").voxel_size_angstrom is None


def test_errors_name_the_file(tmp_path):
    with pytest.raises(StarError, match="missing.star"):
        read_particles(tmp_path / "missing.star")
    starfile.write({"a": pd.DataFrame({"x": [1]}), "b": pd.DataFrame({"y": [2]})}, tmp_path / "two.star")
    with pytest.raises(StarError, match="two.star.*no particles block"):
        read_particles(tmp_path / "two.star")
    with pytest.raises(StarError, match="rlnImageName"):
        image_specs(pd.DataFrame({"x": [1]}), tmp_path / "two.star")


def test_resolve_image_path(tmp_path):
    star = tmp_path / "sub" / "p.star"
    assert resolve_image_path("3@stacks/a.mrcs", star) == f"3@{(tmp_path / 'sub' / 'stacks' / 'a.mrcs').resolve()}"
    assert resolve_image_path("/abs/b.mrc", star) == "/abs/b.mrc"
    assert resolve_image_path("c.mrc", star) == str((tmp_path / "sub" / "c.mrc").resolve())


def test_pose_columns_checks_shapes():
    with pytest.raises(ValueError, match="shifts_voxels"):
        pose_columns(np.eye(3)[None], np.zeros((2, 3)), 1.0)
