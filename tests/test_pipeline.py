"""``jimray run``: the pipeline config, the pick-to-truth matching, the capacity arithmetic, and one end-to-end
run of the smoke job (shrunk) on a local Ray cluster, then a rerun that skips every stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import accuracy_from_files

import jimray.pipeline as pipeline_module
from jimray.config import ConfigError, ModelConfig, load_job
from jimray.pipeline import (
    ANGLES,
    COORDINATES,
    PipelineError,
    _pick_truth,
    resolve_tomograms,
    run_pipeline,
    stage_names,
)

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs" / "synechocystis_smoke.yaml"

# The smoke job shrunk further: one 32 x 112 x 112 tomogram at 27.36 A (ribosomes and TRiC), 16^3 boxes, a
# tiny net, one round.
SHRUNK = [
    "data.box_size=16", "data.voxel_size_angstrom=27.36",
    "pipeline.simulate_tomograms.count=1", "pipeline.simulate_tomograms.shape=[32, 112, 112]",
    "pipeline.simulate_tomograms.particles_per_tomogram=16", "pipeline.simulate_tomograms.min_distance_voxels=13",
    "pipeline.simulate_tomograms.structures=[6zu5_ribosome, 4v8r_tric]",  # CFTR is ~3 voxels across at 27 A
    "pipeline.pick.edge_margin_voxels=6", "pipeline.pick.threshold=4",
    "model.channels=[4, 8]", "model.feature_size=4", "model.feature_dim=8", "model.regressor_channels=8",
    "gmm.n_components=2", "gmm.pca_dims=4", "gmm.n_init=1",
    "train.rounds=1", "train.batch_size=4", "train.reservoir_per_cluster=8",
    "pipeline.predict.actors=1", "pipeline.predict.iterations=1", "pipeline.average.refine=false",
]


def test_smoke_job_validates_and_synechocystis_has_a_pipeline():
    smoke = load_job(SMOKE)
    assert smoke.pipeline.simulate_tomograms.count >= 1 and smoke.train.rounds == 2
    real = load_job(ROOT / "jobs" / "synechocystis.yaml")
    assert real.pipeline is not None and real.pipeline.simulate_tomograms is None
    assert real.data.path == f"{real.output.dir}/particles"  # `jimray train` reads what the extract stage writes


def test_pipeline_config_rejects_bad_sections():
    with pytest.raises(ConfigError, match="either pipeline.tomograms"):
        load_job(SMOKE, ["pipeline.tomograms=[a.mrc]"])  # both sources
    with pytest.raises(ConfigError, match="pipeline.extract.box"):
        load_job(SMOKE, ["pipeline.extract.box=24"])  # disagrees with data.box_size
    with pytest.raises(ConfigError, match="unknown key 'pipeline.pick.diameter'"):
        load_job(SMOKE, ["pipeline.pick.diameter=100"])


def test_resolve_tomograms_globs_and_errors(tmp_path):
    for name in ("b.mrc", "a.mrc"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in resolve_tomograms([str(tmp_path / "*.mrc"), str(tmp_path / "a.mrc")])] == ["a.mrc", "b.mrc"]
    with pytest.raises(PipelineError, match="matches no file"):
        resolve_tomograms([str(tmp_path / "*.rec")])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.mrc").write_bytes(b"")
    with pytest.raises(PipelineError, match="share a file name"):
        resolve_tomograms([str(tmp_path / "**" / "a.mrc")] + [str(tmp_path / "a.mrc")])


def test_pick_truth_matches_within_radius(rng):
    true_xyz = rng.uniform(10, 90, size=(5, 3))
    truth = pd.DataFrame(true_xyz, columns=COORDINATES)
    truth["rlnClassNumber"] = [1, 2, 3, 1, 2]
    truth[ANGLES] = rng.uniform(-180, 180, size=(5, 3))
    # picks: true 3, 0 and 4 (perturbed by < 1 voxel) and one false pick far from all
    picked = np.vstack([true_xyz[[3, 0, 4]] + rng.uniform(-0.7, 0.7, size=(3, 3)), [[200.0, 200.0, 200.0]]])
    out = _pick_truth(pd.DataFrame(picked, columns=COORDINATES), truth, radius=3.0, n_structures=3)
    assert out["class"].tolist() == [0, 0, 1, 3]  # 1-based STAR classes -> 0-based; the false pick -> 3
    np.testing.assert_allclose(out["euler_degrees"][:3], truth[ANGLES].to_numpy()[[3, 0, 4]])
    np.testing.assert_allclose(out["shift_voxels"][:3], true_xyz[[3, 0, 4]] - np.rint(picked[:3]))
    assert np.all(out["shift_voxels"][3] == 0)


def test_capacity_arithmetic():
    from jimray.bench.capacity import collection_needs, flop_budget, per_gpu_hour, sampler_index_bytes

    tiny = ModelConfig(channels=[4, 8], feature_size=4, feature_dim=8, regressor_channels=8)
    budget = flop_budget(tiny, 8, epochs_per_round=2)
    assert budget["train_step_gflop"] > 2 * budget["forward_gflop"] > 0  # backward costs about twice the forward
    assert budget["train_round_gflop_per_subtomogram"] == pytest.approx(
        budget["forward_gflop"] + 2 * budget["train_step_gflop"])
    assert budget["predict_gflop_per_subtomogram"] == pytest.approx(2 * budget["forward_gflop"])
    assert per_gpu_hour(1.0, 10.0, 0.5) == pytest.approx(5e12 * 3600 / 1e9)
    assert sampler_index_bytes(1000, 4) == 16 * 1000 + 8 * 5  # 16 B per id + the K + 1 offsets
    job = load_job(SMOKE)
    needs = collection_needs(job, budget, 10**6, 60.0, 0.35, 0)
    assert needs["shard_gib"] == pytest.approx(10**6 * 4 * 32**3 / 2**30)
    assert needs["train_gpu_hours"] == pytest.approx(job.train.rounds * needs["train_gpu_hours_per_round"])


def _fake_stages(calls: list[str]) -> dict:
    """Stages that write ``<stage folder>/done`` and log their name: the resume logic without the real work."""
    def make(name):
        def stage(job, lay, say):
            lay.stage_dir(name).mkdir(parents=True, exist_ok=True)
            (lay.stage_dir(name) / "done").write_text(name)
            calls.append(name)
            return {"stage": name}
        return stage, lambda job, lay: (lay.stage_dir(name) / "done").is_file()
    return {name: make(name) for name in pipeline_module.STAGES}


def test_rerun_skips_done_stages_and_redoes_everything_after_a_missing_one(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(pipeline_module, "STAGES", _fake_stages(calls))
    monkeypatch.setattr("jimray.ray_setup.init_ray", lambda: None)
    job = load_job(SMOKE, [f"output.dir={tmp_path}"])
    assert list(run_pipeline(job)["stages"]) == list(stage_names(job)) == calls
    calls.clear()
    assert all(s["status"].startswith("skipped") for s in run_pipeline(job)["stages"].values()) and not calls
    (tmp_path / "particles" / "stale.parquet").write_text("")  # an old output of a stage that will rerun
    (tmp_path / "picks" / "done").unlink()
    stages = run_pipeline(job)["stages"]
    assert calls == ["pick", "extract", "train", "predict", "average", "report"]
    assert stages["tomograms"]["status"].startswith("skipped")
    assert stages["tomograms"]["counts"] == {"stage": "tomograms"}  # kept from the first run
    assert not (tmp_path / "particles" / "stale.parquet").exists()  # cleared before extract ran again
    calls.clear()
    (tmp_path / "train" / "done").unlink()
    (tmp_path / "train" / "checkpoint").write_text("")  # an interrupted training run resumes: not cleared
    run_pipeline(job)
    assert calls == ["train", "predict", "average", "report"] and (tmp_path / "train" / "checkpoint").is_file()
    assert json.loads((tmp_path / "pipeline.json").read_text())["job"]["name"] == "synechocystis_smoke"


def test_run_without_pipeline_section_is_a_user_error():
    from typer.testing import CliRunner

    from jimray.cli.app import app
    from jimray.cli.errors import UserError

    result = CliRunner().invoke(app, ["run", str(ROOT / "jobs" / "quickstart.yaml")])
    assert isinstance(result.exception, UserError)  # run_app prints it as one line, exit code 2
    assert "quickstart.yaml" in str(result.exception) and "no pipeline: section" in str(result.exception)


@pytest.mark.ray
def test_smoke_pipeline_end_to_end_and_resume(ray_cluster, tmp_path):
    job = load_job(SMOKE, [*SHRUNK, f"output.dir={tmp_path / 'run'}"])
    record = run_pipeline(job)
    root = tmp_path / "run"
    stages = record["stages"]
    assert [stages[s]["status"] for s in stages] == ["ran"] * 7
    assert (root / "tomograms" / "tomo_01.mrc").is_file() and (root / "tomograms" / "tomo_01_truth.star").is_file()
    assert (root / "picks" / "picks.star").is_file() and (root / "picks" / "tomo_01_picks.star").is_file()
    assert stages["pick"]["counts"]["recall"] >= 0.9  # DoG finds both big complexes
    n = stages["extract"]["counts"]["subtomograms"]
    assert n >= 8 and list((root / "particles").glob("*.parquet")) and (root / "particles" / "skipped.csv").is_file()
    assert (root / "train" / "model" / "state.pt").is_file() and (root / "train" / "metrics.csv").is_file()
    assert stages["train"]["counts"]["rounds_completed"] == 1
    assert (root / "predict" / "particles.star").is_file() and list((root / "predict").glob("class_*.mrc"))
    assert stages["predict"]["counts"]["subtomograms"] == n
    recomputed = accuracy_from_files(root / "predict" / "particles.star", root / "particles")
    assert stages["predict"]["counts"]["clustering_accuracy"] == pytest.approx(recomputed)  # truth carried over picks
    for name in ("report.html", "fsc.csv", "particles.star"):
        assert (root / "average" / name).is_file()
    assert list((root / "average").glob("class_*_half1.mrc"))
    assert (root / "report.html").is_file()
    assert stages["report"]["counts"]["clustering_accuracy"] == pytest.approx(recomputed)
    assert json.loads((root / "pipeline.json").read_text())["stages"] == stages

    again = run_pipeline(job)["stages"]
    assert all(again[s]["status"].startswith("skipped") for s in again)
    assert again["extract"]["counts"] == stages["extract"]["counts"]  # earlier counts kept
