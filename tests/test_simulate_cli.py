"""``jimray simulate`` on the embedded structures and on a structure file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from jimray.cli.app import app
from jimray.cli.errors import UserError
from jimray.io.shards import list_shards, read_shard
from jimray.io.star import read_particles

runner = CliRunner()

TINY_PDB = "\n".join(
    f"ATOM  {i + 1:5d}  CA  ALA A{i + 1:4d}    {x:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00           C"
    for i, (x, y, z) in enumerate([(0, 0, 0), (12, 0, 0), (0, 20, 0), (0, 0, 8), (6, 6, 6)])
) + "\nEND\n"


def _run(*args: str):
    return runner.invoke(app, ["simulate", *args])


def test_cli_embedded_is_deterministic(tmp_path):
    common = ["--per-class", "1", "--snr", "0.5", "--box", "16", "--voxel-size", "20", "--seed", "7"]
    first = _run("--out", str(tmp_path / "a"), *common)
    assert first.exit_code == 0, first.output
    second = _run("--out", str(tmp_path / "b"), *common)
    assert second.exit_code == 0, second.output
    table = read_particles(tmp_path / "a" / "particles.star")
    assert len(table.particles) == 6 and table.voxel_size_angstrom == 20.0
    assert sorted(table.particles["rlnClassNumber"]) == [1, 2, 3, 4, 5, 6]
    assert all((tmp_path / "a" / name).is_file() for name in table.particles["rlnImageName"])
    vol_a = read_shard(list_shards(tmp_path / "a" / "shards")[0])["volume"]
    vol_b = read_shard(list_shards(tmp_path / "b" / "shards")[0])["volume"]
    np.testing.assert_array_equal(vol_a, vol_b)
    info = json.loads((tmp_path / "a" / "simulation.json").read_text())
    assert info["class_names"][0] == "6zu5_ribosome" and info["seed"] == 7
    again = _run("--out", str(tmp_path / "a"), *common)
    assert isinstance(again.exception, UserError) and "--overwrite" in str(again.exception)


def test_cli_structure_file_ctf_and_figure(tmp_path):
    pdb = tmp_path / "tiny.pdb"
    pdb.write_text(TINY_PDB)
    figure = tmp_path / "slices.png"
    result = _run("--out", str(tmp_path / "out"), "--structure", str(pdb), "--structure", str(pdb),
                  "--per-class", "2", "--snr", "inf", "--box", "16", "--voxel-size", "4", "--tilt-range", "90",
                  "--ctf", "--defocus-um", "2", "--figure", str(figure))
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "out" / "simulation.json").read_text())
    assert info["class_names"] == ["tiny", "tiny_2"] and info["snr"] == "inf"
    assert info["ctf"] is not None
    assert figure.is_file() and figure.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--structure", "no_such_file.cif"], "no_such_file.cif"),
        (["--snr", "-1"], "snr"),
        (["--tilt-range", "120"], "tilt_range"),
    ],
)
def test_cli_user_errors_are_one_line(tmp_path, args, match):
    result = _run("--out", str(tmp_path / "x"), "--per-class", "1", "--box", "16", "--voxel-size", "20", *args)
    assert isinstance(result.exception, UserError), result.output
    assert match in str(result.exception) and "\n" not in str(result.exception)
