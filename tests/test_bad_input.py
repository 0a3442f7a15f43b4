"""Issue 13: every command checks its input up front (one line per bad file naming it and the fix, exit code 2, no
traceback, earlier outputs untouched), and run directories / output folders are never damaged.

All without Ray: the refusals happen before any Ray work. Volumes are 8^3, sets of 6 particles.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from jimray.cli.app import app
from jimray.cli.errors import run_app
from jimray.config import load_job
from jimray.io.mrc import write_volume
from jimray.io.star import read_particles, write_particles

BOX, VOXEL, N = 8, 10.0, 6
TINY = ["model.channels=[4, 8]", "model.feature_size=4", "model.feature_dim=8", "model.regressor_channels=8",
        "model.local_radius=1", "model.dilations=[1, 2]", "gmm.pca_dims=2", f"data.box_size={BOX}"]


def cli(capsys, monkeypatch, *args) -> tuple[int | None, str]:
    """Run ``jimray ARGS`` as the console script does (run_app): (exit code, stdout + stderr + any traceback)."""
    monkeypatch.setattr(sys, "argv", ["jimray", *map(str, args)])
    code, extra = 0, ""
    try:
        run_app(app)
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # noqa: BLE001 -- an escaping exception is what the test must see
        code, extra = None, traceback.format_exc()
    captured = capsys.readouterr()
    return code, captured.out + captured.err + extra


def make_set(root: Path, rng, names: list[str] | None = None) -> Path:
    """``root/particles.star`` (classes and poses) over ``N`` good 8^3 volumes ``root/parts/pK.mrc`` at 10 A."""
    (root / "parts").mkdir(parents=True, exist_ok=True)
    for k in range(N):
        write_volume(root / "parts" / f"p{k}.mrc", rng.normal(size=(BOX,) * 3).astype(np.float32), VOXEL)
    names = names or [f"parts/p{k}.mrc" for k in range(N)]
    table = pd.DataFrame({"rlnImageName": names, "rlnClassNumber": [1 + k % 2 for k in range(len(names))],
                          "rlnAngleRot": 0.0, "rlnAngleTilt": 0.0, "rlnAnglePsi": 0.0})
    write_particles(root / "particles.star", table, VOXEL, box_size=BOX)
    return root / "particles.star"


def _truncate(path: Path, rng) -> None:
    path.write_bytes(path.read_bytes()[:1500])


def _corrupt(path: Path, rng) -> None:
    path.write_bytes(b"\x00garbage" * 300)


def _nan(path: Path, rng) -> None:
    volume = rng.normal(size=(BOX,) * 3).astype(np.float32)
    volume[2, 3, 4] = np.nan
    with pytest.warns(RuntimeWarning):
        write_volume(path, volume, VOXEL)


def _constant(path: Path, rng) -> None:
    write_volume(path, np.zeros((BOX,) * 3, np.float32), VOXEL)


def _wrong_box(path: Path, rng) -> None:
    write_volume(path, rng.normal(size=(BOX + 2,) * 3).astype(np.float32), VOXEL)


def _wrong_voxel(path: Path, rng) -> None:
    write_volume(path, rng.normal(size=(BOX,) * 3).astype(np.float32), VOXEL / 2)


def _missing(path: Path, rng) -> None:
    path.unlink()


BAD = {  # class -> (how to break parts/p3.mrc, words the message must hold)
    "missing": (_missing, "file not found"),
    "truncated": (_truncate, "truncated"),
    "corrupt": (_corrupt, "unreadable MRC"),
    "non-finite": (_nan, "1 non-finite values"),
    "constant": (_constant, "constant volume"),
    "wrong box": (_wrong_box, "box 10 differs from the set's 8"),
    "wrong voxel size": (_wrong_voxel, "voxel size 5 A in its header differs from the set's 10 A"),
}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run directory as `jimray train` writes it (untrained tiny net, PCA + GMM fitted on its embeddings)."""
    from jimray.cluster.gmm import GaussianMixture
    from jimray.cluster.pca import fit_pca
    from jimray.model.jimnet import JimNet
    from jimray.train.state import RoundState, save_round_state

    config = load_job(None, TINY)
    torch.manual_seed(0)
    model = JimNet(config.model, 2).eval()
    with torch.no_grad():
        embeddings = model.embed(torch.randn(12, BOX, BOX, BOX)).double()
    pca = fit_pca(embeddings, 2)
    gmm = GaussianMixture(2, reg_covar=1e-3, random_state=0).fit(pca.transform(embeddings))
    run = tmp_path_factory.mktemp("run")
    save_round_state(run / "model", RoundState(1, 2, model.state_dict(), None, gmm.get_state(), pca.get_state(),
                                               config=config.model_dump(mode="json")))
    (run / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return run


def _job(root: Path, extra: dict | None = None) -> Path:
    job = {"data": {"box_size": BOX}, "model": {"channels": [4, 8], "feature_size": 4, "feature_dim": 8,
                                                "regressor_channels": 8, "local_radius": 1, "dilations": [1, 2]},
           "gmm": {"pca_dims": 2}} | (extra or {})
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _commands(root: Path, star: Path, run: Path) -> dict[str, tuple[list, Path]]:
    """command -> (arguments, the folder whose earlier contents must survive)."""
    return {
        "average": (["average", "--particles", star, "--out", root / "avg", "--no-refine", "--overwrite"],
                    root / "avg"),
        "ingest": (["ingest", star, "--out", root / "shards"], root / "shards"),
        "train": (["train", _job(root), "--data", star, "--out", root / "newrun"], root / "newrun"),
        "predict": (["predict", run, "--data", star, "--out", root / "pred", "--overwrite"], root / "pred"),
    }


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("command", ["average", "ingest", "train", "predict"])
def test_bad_volume_is_one_line_naming_the_file_exit_2(bad, command, tmp_path, rng, capsys, monkeypatch,
                                                       trained_run):
    star = make_set(tmp_path, rng)
    BAD[bad][0](tmp_path / "parts" / "p3.mrc", rng)
    args, kept = _commands(tmp_path, star, trained_run)[command]
    if command != "train":  # an earlier output in the folder: a refused run must leave it as it was
        kept.mkdir()
        (kept / "earlier.txt").write_text("earlier output")
    before = sorted(p.name for p in trained_run.rglob("*"))
    code, output = cli(capsys, monkeypatch, *args)
    assert code == 2, output
    assert "Traceback" not in output
    assert "p3.mrc" in output and BAD[bad][1] in output, output
    assert "--skip-bad" in output
    if command == "train":
        assert not kept.exists()  # nothing written, not even the run directory
    else:
        assert [p.name for p in kept.iterdir()] == ["earlier.txt"]
    assert sorted(p.name for p in trained_run.rglob("*")) == before


@pytest.mark.parametrize("bad", ["truncated", "non-finite", "constant"])
def test_pick_refuses_a_bad_tomogram_before_ray(bad, tmp_path, rng, capsys, monkeypatch):
    import jimray.ray_setup as ray_setup

    monkeypatch.setattr(ray_setup, "init_ray", lambda *a, **k: pytest.fail("Ray started before the input check"))
    tomogram = tmp_path / "tomo.mrc"
    write_volume(tomogram, rng.normal(size=(8, 12, 12)).astype(np.float32), VOXEL)
    {"truncated": _truncate, "non-finite": _nan, "constant": _constant}[bad](tomogram, rng)
    code, output = cli(capsys, monkeypatch, "pick", tomogram, "--particle-diameter", "40", "--out", tmp_path / "o")
    assert code == 2 and "Traceback" not in output and "tomo.mrc" in output and BAD[bad][1] in output, output


def test_average_skip_bad_leaves_the_bad_out_and_star_reads_from_out(tmp_path, rng, capsys, monkeypatch):
    star = make_set(tmp_path / "in", rng)
    _nan(tmp_path / "in" / "parts" / "p3.mrc", rng)
    out = tmp_path / "elsewhere" / "avg"
    code, output = cli(capsys, monkeypatch, "average", "--particles", star, "--out", out, "--no-refine",
                       "--skip-bad")
    assert code == 0, output
    assert "skipping" in output and "p3.mrc" in output and "skipped 1 of 6" in output
    for c in (1, 2):  # no class is all NaN
        from jimray.io.mrc import read_volume

        assert np.isfinite(read_volume(out / f"class_00{c}.mrc")[0]).all()
    written = read_particles(out / "particles.star").particles
    assert len(written) == N - 1
    for name in written["rlnImageName"]:  # relative to the STAR's own folder
        assert not Path(name).is_absolute() and (out / name).is_file(), name


def test_average_refuses_star_without_classes_or_poses(tmp_path, rng, capsys, monkeypatch):
    star = make_set(tmp_path, rng)
    table = read_particles(star).particles
    for drop, word in (("rlnClassNumber", "no rlnClassNumber column"), ("rlnAngleTilt", "no pose columns")):
        write_particles(tmp_path / "p.star", table.drop(columns=[drop]), VOXEL)
        code, output = cli(capsys, monkeypatch, "average", "--particles", tmp_path / "p.star", "--out",
                           tmp_path / "o")
        assert code == 2 and word in output and "Traceback" not in output, output
        assert not (tmp_path / "o").exists()


def test_non_empty_out_is_refused_unless_overwrite_and_never_clears_an_input(tmp_path, rng, capsys, monkeypatch,
                                                                            trained_run):
    star = make_set(tmp_path, rng)
    out = tmp_path / "avg"
    out.mkdir()
    (out / "class_005.mrc").write_text("stale")
    code, output = cli(capsys, monkeypatch, "average", "--particles", star, "--out", out, "--no-refine")
    assert code == 2 and "not empty" in output and "--overwrite" in output
    code, output = cli(capsys, monkeypatch, "predict", trained_run, "--data", star, "--out", out)
    assert code == 2 and "not empty" in output
    code, output = cli(capsys, monkeypatch, "average", "--particles", star, "--out", tmp_path, "--overwrite")
    assert code == 2 and "would delete" in output and star.is_file()
    code, output = cli(capsys, monkeypatch, "average", "--particles", star, "--out", out, "--no-refine",
                       "--overwrite")
    assert code == 0, output
    assert not (out / "class_005.mrc").exists() and (out / "class_001.mrc").is_file()


def test_ingest_skip_bad_with_every_file_bad_exits_2(tmp_path, rng, capsys, monkeypatch):
    star = make_set(tmp_path, rng)
    for k in range(N):
        _constant(tmp_path / "parts" / f"p{k}.mrc", rng)
    code, output = cli(capsys, monkeypatch, "ingest", star, "--out", tmp_path / "shards", "--skip-bad")
    assert code == 2 and "every one of the 6" in output and "Traceback" not in output, output
    assert not (tmp_path / "shards").exists()


def test_empty_job_file_is_refused(tmp_path, capsys, monkeypatch):
    job = tmp_path / "empty.yaml"
    job.write_text("# nothing here yet\n")
    code, output = cli(capsys, monkeypatch, "train", job, "--out", tmp_path / "run")
    assert code == 2 and "empty.yaml: the job file is empty" in output, output
    assert not (tmp_path / "run").exists()


def test_train_hints_use_the_cli_spelling(tmp_path, rng, capsys, monkeypatch):
    star = make_set(tmp_path, rng)
    job = _job(tmp_path, {"data": {"box_size": 16}})
    code, output = cli(capsys, monkeypatch, "train", job, "--data", star, "--out", tmp_path / "run")
    assert code == 2 and "--set data.box_size=8" in output and "Traceback" not in output, output
    code, output = cli(capsys, monkeypatch, "train", _job(tmp_path), "--data", tmp_path / "nope.star", "--out",
                       tmp_path / "run")
    assert code == 2 and "nope.star" in output and "Traceback" not in output, output


def test_changed_rerun_refuses_and_the_run_stays_predictable(trained_run, tmp_path, capsys, monkeypatch):
    from jimray.predict.run import load_trained_run

    files = {p: p.read_bytes() for p in trained_run.rglob("*") if p.is_file()}
    changed = _job(tmp_path)
    raw = yaml.safe_load(changed.read_text())
    raw["model"]["channels"] = [4, 16]
    changed.write_text(yaml.safe_dump(raw))
    code, output = cli(capsys, monkeypatch, "train", changed, "--out", trained_run)
    assert code == 2 and "Traceback" not in output, output
    assert "model.channels: [4, 8] -> [4, 16]" in output and "--out NEW_DIR" in output and "--force" in output
    assert {p: p.read_bytes() for p in trained_run.rglob("*") if p.is_file()} == files  # nothing rewritten
    assert load_trained_run(trained_run).n_clusters == 2  # still predictable


def test_rerun_on_changed_data_refuses_and_force_starts_a_new_run(tmp_path, rng):
    from jimray.errors import RunDirError
    from jimray.train.rundir import prepare_run, write_data_record

    star = make_set(tmp_path, rng)
    config = load_job(None, [*TINY, f"data.path={star}", f"output.dir={tmp_path / 'run'}"])
    config, skip, data = prepare_run(config)
    assert skip == set() and data["n_volumes"] == N
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    write_data_record(tmp_path / "run", data)
    assert prepare_run(config)[0].output.dir == config.output.dir  # the same job on the same data: resumes
    table = read_particles(star).particles
    write_particles(star, table.iloc[:-1], VOXEL)  # the same path, other data
    with pytest.raises(RunDirError, match=r"trained on other data .*6 volumes\) than .*5 volumes"):
        prepare_run(config)
    moved, _, _ = prepare_run(config, force=True)
    assert moved.output.dir == str(tmp_path / "run-2")


def test_tilt_range_of_the_job_reaches_the_reader_for_star_input(tmp_path, rng, monkeypatch):
    import jimray.train.driver as driver
    from jimray.predict.pipeline import _check_data

    star = make_set(tmp_path, rng)
    config = load_job(None, [*TINY, "data.tilt_range_degrees=45"])
    seen = {}
    monkeypatch.setattr(driver, "read_subtomograms", lambda path, **kwargs: seen.update(kwargs))
    driver.build_dataset(config, star)
    assert seen["tilt_range_degrees"] == 45.0
    voxel, tilt, skip = _check_data(star, config.data, None, False, lambda _line: None)
    assert (voxel, tilt, skip) == (VOXEL, 45.0, set())


def test_predict_without_any_voxel_size_refuses(tmp_path, rng):
    from jimray.errors import DataError
    from jimray.predict.pipeline import _check_data

    (tmp_path / "mrc").mkdir()
    for k in range(3):
        write_volume(tmp_path / "mrc" / f"v{k}.mrc", rng.normal(size=(BOX,) * 3), None)
    config = load_job(None, TINY)
    with pytest.raises(DataError, match="no voxel size.*--voxel-size"):
        _check_data(tmp_path / "mrc", config.data, None, False, lambda _line: None)
    assert _check_data(tmp_path / "mrc", config.data, 7.0, False, lambda _line: None)[0] == 7.0
