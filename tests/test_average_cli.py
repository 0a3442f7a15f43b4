"""``jimray average`` end to end on a tiny simulated data set (STAR + MRC in, maps, FSC, figures, report out)."""

from __future__ import annotations

import base64
import re

import mrcfile
import numpy as np
import pandas as pd
import pytest
import torch
from test_average import blob_map, correlation
from typer.testing import CliRunner

from jimray.cli.app import app
from jimray.cli.errors import UserError
from jimray.fourier.masks import wedge_masks
from jimray.geometry import transform_volumes
from jimray.io.mrc import read_volume
from jimray.io.simulated import write_simulated_dataset
from jimray.io.star import image_specs, poses_from_particles, read_particles
from jimray.simulate.subtomogram import apply_fourier_filter, simulate_subtomograms

VOXEL = 8.0
BOX = 16
EXPECTED = [f"class_00{c}{s}.mrc" for c in (1, 2) for s in ("", "_half1", "_half2")] + [
    "fsc.csv", "fsc.png", "gallery.png", "cluster_sizes.png", "report.html", "particles.star"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("avg")
    maps = [blob_map(1, BOX, 4), blob_map(2, BOX, 4)]
    sim = simulate_subtomograms(maps, per_class=8, snr=float("inf"), tilt_range_degrees=60.0, seed=1)
    star = write_simulated_dataset(root / "data", sim, VOXEL, 60.0, ["a", "b"])
    return root, star, sim, maps


def run(*args):
    result = CliRunner().invoke(app, ["average", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result


def test_average_no_refine_writes_everything_and_poses_reproduce_particles(dataset):
    root, star, sim, maps = dataset
    out = root / "plain"
    result = run("--particles", star, "--out", out, "--no-refine", "--tilt-range", "60")
    assert "class_001: 8 particles" in result.output
    for name in EXPECTED:
        assert (out / name).is_file(), name
    with mrcfile.open(out / "class_001_half1.mrc") as mrc:
        assert mrc.data.shape == (BOX,) * 3 and float(mrc.voxel_size.x) == pytest.approx(VOXEL)
    table = pd.read_csv(out / "fsc.csv")
    assert list(table.columns) == ["class", "shell", "frequency_per_angstrom", "resolution_angstrom", "fsc"]
    assert len(table) == 2 * (BOX // 2 + 1) and set(table["class"]) == {1, 2}
    assert table["frequency_per_angstrom"].max() == pytest.approx(1 / (2 * VOXEL))
    assert table["fsc"].between(-1.0, 1.0).all()
    # Noise-free particles under their true poses: the half maps agree at low resolution.
    assert (table.loc[table["shell"].between(1, 3), "fsc"] > 0.9).all(), table
    # The pose in the STAR applied to the class average gives back each (wedged, clean) particle.
    written = read_particles(out / "particles.star")
    rotations, shifts = poses_from_particles(written.particles, written.voxel_size_angstrom)
    assert set(written.particles["rlnRandomSubset"]) == {1, 2}
    wedge = wedge_masks((BOX,) * 3, 60.0)[0]
    classes = sim.classes.numpy()
    for c in (0, 1):
        average = torch.from_numpy(read_volume(out / f"class_00{c + 1}.mrc")[0])
        assert correlation(average, maps[c]) > 0.9
        rows = np.flatnonzero(classes == c)
        n = len(rows)
        posed = transform_volumes(average.expand(n, *average.shape).contiguous(),
                                  torch.as_tensor(rotations[rows], dtype=torch.float32),
                                  torch.as_tensor(shifts[rows], dtype=torch.float32))
        posed = apply_fourier_filter(posed, wedge)
        for k, i in enumerate(rows):
            assert correlation(posed[k], sim.volumes[i]) > 0.9


def test_halves_depend_on_the_star_not_on_where_it_lies(dataset):
    """The gold-standard halves hash the image names as written, so a moved data set gives the same halves
    (they once hashed the resolved absolute paths, and CI's temporary folder changed the FSC)."""
    import shutil

    root, star, _, _ = dataset
    moved = root / "elsewhere" / "deeper"
    shutil.copytree(star.parent, moved)
    subsets = []
    for source, out in ((star, root / "here"), (moved / star.name, root / "there")):
        run("--particles", source, "--out", out, "--no-refine")
        subsets.append(read_particles(out / "particles.star").particles["rlnRandomSubset"].to_numpy())
    np.testing.assert_array_equal(subsets[0], subsets[1])


def test_averaging_normalises_volumes_like_training(dataset):
    from jimray.average.run import load_class_particles
    from jimray.data.reader import normalize_batch

    _, star, _, _ = dataset
    specs = image_specs(read_particles(star).particles, star)[:3]
    got = load_class_particles(specs).numpy()
    raw = np.stack([read_volume(s)[0] for s in specs])
    np.testing.assert_array_equal(got, normalize_batch({"volume": raw})["volume"])
    np.testing.assert_allclose(got.mean(axis=(1, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(got.std(axis=(1, 2, 3)), 1.0, atol=1e-4)
    np.testing.assert_array_equal(load_class_particles(specs, normalize=False).numpy(), raw)


def test_average_with_refinement_and_report_images(dataset):
    root, star, _, maps = dataset
    out = root / "refined"
    run("--particles", star, "--out", out, "--iterations", "1", "--angular-step", "20", "--mask-radius", "6")
    for name in EXPECTED:
        assert (out / name).is_file(), name
    average = torch.from_numpy(read_volume(out / "class_002.mrc")[0])
    assert correlation(average, maps[1]) > 0.85
    html = (out / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert len(sources) == 3
    for src in sources:
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG")


def test_average_bad_input_is_one_line_error(tmp_path):
    bad = tmp_path / "missing.star"
    result = CliRunner().invoke(app, ["average", "--particles", str(bad), "--out", str(tmp_path / "o")])
    assert isinstance(result.exception, UserError) and "file not found" in str(result.exception)
    star = tmp_path / "broken.star"
    star.write_text("data_particles\n\nloop_\n_rlnImageName #1\n_rlnClassNumber #2\n_rlnAngleRot #3\n"
                    "_rlnAngleTilt #4\n_rlnAnglePsi #5\nnothere.mrc 1 0 0 0\n")
    result = CliRunner().invoke(app, ["average", "--particles", str(star), "--out", str(tmp_path / "o")])
    assert isinstance(result.exception, UserError) and "nothere.mrc" in str(result.exception)
