"""``jimray predict``: run-dir loading, Ray Data actor predictors (clusters, poses), templates and the STAR output.

The trained run is built by hand (an untrained tiny Jim-Net + PCA + a GMM fitted on its embeddings, saved with
``save_round_state`` like a training round): it exercises every step of prediction without minutes of training.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import starfile
import torch
import yaml
from typer.testing import CliRunner

from jimray.cli.app import app
from jimray.cli.errors import UserError
from jimray.cluster.gmm import GaussianMixture
from jimray.cluster.pca import fit_pca
from jimray.config import load_job
from jimray.conventions import clustering_accuracy, euler_to_matrix, invert_pose, rotation_error
from jimray.data.reader import normalize_batch
from jimray.io.mrc import read_volume
from jimray.io.simulated import simulate_dataset, write_simulated_dataset
from jimray.model.jimnet import JimNet
from jimray.predict.predictors import LabelTable
from jimray.predict.run import RunError, TrainedRun, load_trained_run
from jimray.train.state import RoundState, save_round_state

TINY = ["model.channels=[4, 8]", "model.feature_size=4", "model.feature_dim=8", "model.regressor_channels=8",
        "model.local_radius=1", "model.dilations=[1, 2]", "gmm.pca_dims=4", "data.box_size=16"]
STAR_COLUMNS = {"rlnImageName", "rlnClassNumber", "rlnMaxValueProbDistribution", "rlnAngleRot", "rlnAngleTilt",
                "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """12 noiseless subtomograms (3 structures), box 16, 30-degree wedge: (shard folder, normalised volumes)."""
    out = tmp_path_factory.mktemp("predict-data")
    sim, names = simulate_dataset(None, per_class=4, snr=float("inf"), box=16, voxel_size_angstrom=20.0,
                                  tilt_range_degrees=60.0, seed=1)
    keep = sim.classes < 3
    sim = type(sim)(**{k: getattr(sim, k)[keep] for k in ("volumes", "classes", "rotations", "shifts",
                                                          "euler_degrees")})
    write_simulated_dataset(out, sim, 20.0, 60.0, names, rows_per_shard=5)
    volumes = normalize_batch({"volume": sim.volumes.numpy()})["volume"]
    return out / "shards", torch.from_numpy(volumes)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, dataset):
    """A run directory as `jimray train` writes it: config.yaml + model/ (untrained net, fitted PCA + GMM)."""
    _, volumes = dataset
    config = load_job(None, TINY)
    torch.manual_seed(0)
    model = JimNet(config.model, 3).eval()
    with torch.no_grad():
        embeddings = model.embed(volumes).double()
    pca = fit_pca(embeddings, 4)
    gmm = GaussianMixture(3, reg_covar=1e-4, random_state=0).fit(pca.transform(embeddings))
    run = tmp_path_factory.mktemp("predict-run")
    state = RoundState(1, 3, model.state_dict(), None, gmm.get_state(), pca.get_state(),
                       config=config.model_dump(mode="json"))
    save_round_state(run / "model", state)
    (run / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return run


def _direct_labels(run: TrainedRun, volumes: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        z = run.pca.transform(run.model.embed(volumes).double())
    probabilities = run.gmm.predict_proba(z).numpy()
    return probabilities.argmax(1), probabilities.max(1)


def test_load_trained_run_rebuilds_model_gmm_and_pca(run_dir, dataset):
    run = load_trained_run(run_dir)
    assert run.n_clusters == 3 and run.pca is not None and run.config.data.box_size == 16
    again = TrainedRun.from_payload(run.payload())
    _, volumes = dataset
    np.testing.assert_allclose(again.cluster_probabilities(volumes[:5]).numpy(),
                               run.cluster_probabilities(volumes[:5]).numpy(), atol=1e-10)
    with pytest.raises(ValueError, match="non-empty"):
        run.cluster_probabilities(volumes[0])


def test_load_trained_run_errors_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(RunError, match="run directory not found"):
        load_trained_run(tmp_path / "nothere")
    with pytest.raises(RunError, match=r"model/state.pt: no trained model.*jimray train"):
        load_trained_run(tmp_path)
    result = CliRunner().invoke(app, ["predict", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    assert isinstance(result.exception, UserError) and "state.pt" in str(result.exception)
    assert "\n" not in str(result.exception)


def test_predict_imports_no_ray_train():
    """``jimray predict`` needs Ray Core and Ray Data only (:mod:`jimray.ray_setup`), never Ray Train."""
    import subprocess
    import sys

    code = ("import sys, jimray.cli.predict, jimray.predict.pipeline, jimray.predict.predictors, "
            "jimray.predict.templates, jimray.data.reader, jimray.average.run, jimray.ray_setup; "
            "bad = sorted(m for m in sys.modules if m.startswith(('ray.train', 'jimray.train.driver', "
            "'jimray.train.loop'))); print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_label_table_lookup_and_best_members():
    table = LabelTable.from_arrays([7, 3, 5, 9], [1, 0, 1, 0], [0.6, 0.9, 0.8, 0.9])
    labels, probabilities = table.lookup([9, 3, 7])
    assert labels.tolist() == [0, 0, 1] and probabilities.tolist() == [0.9, 0.9, 0.6]
    assert table.best_members() == {0: 3, 1: 5}  # tie at 0.9 goes to the smaller id
    assert table.sizes(3).tolist() == [2, 2, 0]
    with pytest.raises(KeyError, match="4"):
        table.lookup([4])
    with pytest.raises(ValueError, match="unique"):
        LabelTable.from_arrays([1, 1], [0, 0], [1.0, 1.0])


@pytest.mark.ray
def test_pose_predictor_identity_and_relion_sense(ray_cluster, run_dir, dataset):
    """Particle i against reference label[i]: itself for the first six (pose ~ identity), a swapped partner for
    the rest; every pose must be the inverse of Jim-Net's G(particle, reference) computed in-process."""
    import ray

    from jimray.predict.predictors import PosePredictor, map_with_actors

    _, volumes = dataset
    n = len(volumes)
    labels = np.array([0, 1, 2, 3, 4, 5, 7, 6, 9, 8, 11, 10])
    run = load_trained_run(run_dir)
    ds = ray.data.from_items([{"id": i, "volume": volumes[i].numpy(), "label": int(labels[i])} for i in range(n)])
    out = map_with_actors(ds, PosePredictor, actors=2, batch_size=4, run=ray.put(run.payload()),
                          references=ray.put(volumes.numpy())).to_pandas().sort_values("id")
    assert out["id"].tolist() == list(range(n))
    rotations = euler_to_matrix(out[["rot", "tilt", "psi"]].to_numpy(np.float64))
    shifts = out[["shift_x", "shift_y", "shift_z"]].to_numpy(np.float64)
    same = labels == np.arange(n)
    assert rotation_error(rotations[same], np.broadcast_to(np.eye(3), rotations[same].shape)).max() < 0.1
    assert np.abs(shifts[same]).max() < 0.25
    with torch.no_grad():
        raw = run.model(volumes, volumes[torch.as_tensor(labels)])
    expected_r, expected_t = invert_pose(raw.rotations[-1].double(), raw.shifts[-1].double())
    assert rotation_error(rotations, expected_r.numpy()).max() < 1e-4
    np.testing.assert_allclose(shifts, expected_t.numpy(), atol=1e-4)


@pytest.mark.ray
def test_predict_writes_star_references_and_report(ray_cluster, run_dir, dataset, tmp_path):
    from jimray.predict.pipeline import predict

    shards, volumes = dataset
    out = tmp_path / "pred"
    messages: list[str] = []
    summary = predict(run_dir, shards, out, actors=1, batch_size=4, iterations=1, progress=messages.append)
    assert summary.n_particles == 12 and sum(summary.cluster_sizes) == 12
    assert any("template iteration 1/1" in m for m in messages)
    star = starfile.read(out / "particles.star", always_dict=True)
    particles = star["particles"]
    assert STAR_COLUMNS <= set(particles.columns) and len(particles) == 12
    assert float(star["optics"]["rlnImagePixelSize"][0]) == 20.0
    # ids preserved, in order: the simulated image names end in the id
    ids = [int(str(name).rsplit("_", 1)[1].split(".")[0]) for name in particles["rlnImageName"]]
    assert ids == list(range(12))
    assert all((out / name).is_file() for name in particles["rlnImageName"])  # names resolve from the output folder
    labels, probabilities = _direct_labels(load_trained_run(run_dir), volumes)
    np.testing.assert_array_equal(particles["rlnClassNumber"].to_numpy(), labels + 1)
    np.testing.assert_allclose(particles["rlnMaxValueProbDistribution"].to_numpy(), probabilities, atol=1e-6)
    rotations = euler_to_matrix(particles[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy())
    np.testing.assert_allclose(rotations @ rotations.transpose(0, 2, 1), np.broadcast_to(np.eye(3), (12, 3, 3)),
                               atol=1e-6)
    for label in np.unique(labels):
        volume, voxel = read_volume(out / f"class_{label + 1:03d}.mrc")
        assert volume.shape == (16, 16, 16) and voxel == pytest.approx(20.0) and np.isfinite(volume).all()
    assert summary.averaged, summary.averaging_note
    assert (out / "report.html").is_file()
    truth = pd.read_parquet(shards, columns=["id", "true_class"]).sort_values("id")["true_class"].to_numpy()
    assert summary.clustering_accuracy == pytest.approx(clustering_accuracy(truth, labels))
    record = json.loads((out / "predict.json").read_text())
    assert record["n_particles"] == 12 and record["n_clusters"] == 3
    assert record["cluster_sizes"] == np.bincount(labels, minlength=3).tolist() == summary.cluster_sizes
    assert record["clustering_accuracy"] == pytest.approx(summary.clustering_accuracy)
    assert record["references"] == [f"class_{k + 1:03d}.mrc" for k in np.unique(labels)]
    fsc = pd.read_csv(out / "fsc.csv")
    assert len(fsc) > 0 and set(fsc["class"]) <= set((labels + 1).tolist())
    assert (fsc.groupby("class").size() == 16 // 2 + 1).all() and fsc["fsc"].between(-1.0, 1.0).all()
    assert fsc["frequency_per_angstrom"].max() == pytest.approx(1 / (2 * 20.0))
