"""``jimray ingest``: every bad file reported by name; nothing written unless --skip-bad; good rows converted."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from jimray.cli.app import app
from jimray.cli.errors import UserError
from jimray.io.ingest import check_particles, ingest_star
from jimray.io.mrc import write_stack, write_volume
from jimray.io.shards import list_shards, read_shard
from jimray.io.star import write_particles

BOX = 16


def _particle_set(root: Path, rng, bad: bool = True) -> tuple[Path, np.ndarray]:
    """7 particles: 3 in a stack, 4 single files; with ``bad``: #4 truncated, #5 NaN, #6 wrong box."""
    data = root / "parts"
    data.mkdir(parents=True)
    volumes = rng.normal(size=(7, BOX, BOX, BOX)).astype(np.float32)
    write_stack(data / "stack.mrcs", volumes[:3], 2.0)
    for i in range(3, 7):
        write_volume(data / f"p{i}.mrc", volumes[i], 2.0)
    if bad:
        raw = (data / "p4.mrc").read_bytes()
        (data / "p4.mrc").write_bytes(raw[: len(raw) // 2])
        nan_volume = volumes[5].copy()
        nan_volume[3, 3, 3] = np.nan
        with pytest.warns(RuntimeWarning):
            write_volume(data / "p5.mrc", nan_volume, 2.0)
        write_volume(data / "p6.mrc", rng.normal(size=(BOX + 2,) * 3), 2.0)
    names = [f"{i + 1}@parts/stack.mrcs" for i in range(3)] + [f"parts/p{i}.mrc" for i in range(3, 7)]
    write_particles(root / "particles.star", pd.DataFrame({"rlnImageName": names}), 2.0, box_size=BOX)
    return root / "particles.star", volumes


def test_check_finds_the_three_bad_files(tmp_path, rng):
    star, _ = _particle_set(tmp_path, rng)
    report = check_particles(star)
    assert report.box_size == BOX and report.voxel_size_angstrom == 2.0
    reasons = {Path(spec).name: reason for spec, reason in report.bad}
    assert set(reasons) == {"p4.mrc", "p5.mrc", "p6.mrc"}
    assert "truncated" in reasons["p4.mrc"]
    assert "non-finite" in reasons["p5.mrc"]
    assert "box 18" in reasons["p6.mrc"] and "16" in reasons["p6.mrc"]


def test_cli_reports_all_bad_files_by_name_and_writes_nothing(tmp_path, rng):
    star, _ = _particle_set(tmp_path, rng)
    out = tmp_path / "shards"
    exe = Path(sys.executable).parent / "jimray"
    proc = subprocess.run([str(exe), "ingest", str(star), "--out", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for name in ("p4.mrc", "p5.mrc", "p6.mrc"):
        assert name in proc.stderr
    assert "--skip-bad" in proc.stderr
    assert not out.exists()  # nothing written, not even the folder


def test_cli_skip_bad_converts_the_good_ones(tmp_path, rng):
    star, volumes = _particle_set(tmp_path, rng)
    out = tmp_path / "shards"
    result = CliRunner().invoke(app, ["ingest", str(star), "--out", str(out), "--skip-bad", "--tilt-range", "45",
                                      "--rows-per-shard", "2"])
    assert result.exit_code == 0, result.output
    shards = list_shards(out)
    assert len(shards) == 2  # 4 good particles, 2 per shard
    rows = [read_shard(p) for p in shards]
    ids = np.concatenate([r["id"] for r in rows])
    np.testing.assert_array_equal(ids, [0, 1, 2, 3])  # STAR row order; bad rows 4..6 left out
    np.testing.assert_array_equal(np.concatenate([r["volume"] for r in rows]), volumes[:4])
    assert set(np.concatenate([r["tilt_range_degrees"] for r in rows])) == {45.0}
    assert list(np.concatenate([r["image_name"] for r in rows]))[0] == "1@parts/stack.mrcs"
    with open(out / "skipped.csv") as fh:
        skipped = list(csv.DictReader(fh))
    assert sorted(Path(r["file"]).name for r in skipped) == ["p4.mrc", "p5.mrc", "p6.mrc"]
    assert all(r["reason"] for r in skipped)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_clean_set_converts_without_skip_bad(tmp_path, rng):
    star, volumes = _particle_set(tmp_path, rng, bad=False)
    report = ingest_star(star, tmp_path / "out")
    assert report.ok and report.n_converted == 7 and not (tmp_path / "out" / "skipped.csv").exists()
    data = read_shard(report.shards[0])
    np.testing.assert_array_equal(data["volume"], volumes)
    np.testing.assert_allclose(data["voxel_size_angstrom"], 2.0)


def test_voxel_size_from_headers_or_option(tmp_path, rng):
    (tmp_path / "a").mkdir()
    write_volume(tmp_path / "a" / "x.mrc", rng.normal(size=(8, 8, 8)), 0.0)
    pd_star = tmp_path / "p.star"
    import starfile

    starfile.write({"particles": pd.DataFrame({"rlnImageName": ["a/x.mrc"]})}, pd_star)
    assert "voxel size" in check_particles(pd_star).bad[0][1]
    report = ingest_star(pd_star, tmp_path / "out", voxel_size_angstrom=4.0)
    assert report.ok and read_shard(report.shards[0])["voxel_size_angstrom"][0] == 4.0


def test_refuses_folder_with_shards_and_missing_star(tmp_path, rng):
    star, _ = _particle_set(tmp_path, rng, bad=False)
    ingest_star(star, tmp_path / "out")
    with pytest.raises(FileExistsError, match="already holds"):
        ingest_star(star, tmp_path / "out")
    result = CliRunner().invoke(app, ["ingest", str(tmp_path / "none.star"), "--out", str(tmp_path / "o2")],
                                standalone_mode=False)
    assert isinstance(result.exception, UserError) and "none.star" in str(result.exception)
