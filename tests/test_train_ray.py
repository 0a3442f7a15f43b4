"""End-to-end training on a local 2-CPU Ray cluster: 2 DDP workers (gloo), distributed GMM, sampler actor,
checkpoints per round, resume after a killed worker, and resume of a finished run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import starfile
import torch
from conftest import TINY_TRAINING

from jimray.config import load_job
from jimray.conventions import clustering_accuracy
from jimray.io.simulated import simulate_dataset, write_simulated_dataset

pytestmark = pytest.mark.ray

TINY = [
    *TINY_TRAINING,
    "gmm.candidates=[2, 3, 4]",
    "data.box_size=16",
    "scaling.num_workers=2",
    "scaling.cpus_per_worker=0.5",
]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("tinydata")
    sim, names = simulate_dataset(None, per_class=4, snr=float("inf"), box=16, voxel_size_angstrom=20.0,
                                  tilt_range_degrees=60.0, seed=1)
    keep = (sim.classes < 3) | (torch.arange(len(sim)) == int(torch.nonzero(sim.classes == 3)[0]))
    # three structures and one stray: 13 subtomograms, odd, so an equal split between 2 workers would drop one
    sim = type(sim)(**{k: getattr(sim, k)[keep] for k in ("volumes", "classes", "rotations", "shifts",
                                                          "euler_degrees")})
    write_simulated_dataset(out, sim, 20.0, 60.0, names, rows_per_shard=5)
    return out / "shards"


def _run(tiny_data, out, rounds: int, extra=()):
    from jimray.train.driver import run_training

    config = load_job(None, [*TINY, f"data.path={tiny_data}", f"output.dir={out}", f"train.rounds={rounds}", *extra])
    return run_training(config, command=["pytest"])


def test_training_writes_run_dir(ray_cluster, tiny_data, tmp_path):
    out = tmp_path / "run"
    summary = _run(tiny_data, out, rounds=2)
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["round"]) == [1, 2]
    assert {"loss_total", "loss_ce", "loss_align_1", "loss_align_2", "fraction_changed", "bic",
            "clustering_accuracy", "n_clusters"} <= set(metrics.columns)
    assert (metrics["n_subtomograms"] == 13).all()  # every id embedded exactly once per round
    assert summary["rounds_completed"] == 2
    assert sum(summary["cluster_sizes"]) == 13
    with np.load(out / "model" / "labels.npz") as saved:  # every subtomogram labelled once, keyed by id
        ids, labels = saved["ids"], saved["labels"]
    assert np.array_equal(np.sort(ids), np.arange(13))
    # the reported accuracy is the paper's metric of the saved last-round labels against the shards' truth
    truth = pd.read_parquet(tiny_data, columns=["id", "true_class"]).set_index("id")["true_class"]
    assert summary["clustering_accuracy"] == pytest.approx(clustering_accuracy(truth.loc[ids].to_numpy(), labels))
    assert summary["cluster_sizes"] == np.bincount(labels, minlength=summary["n_clusters"]).tolist()
    assert json.loads((out / "summary.json").read_text()) == summary
    assert metrics["clustering_accuracy"].iloc[-1] == pytest.approx(summary["clustering_accuracy"])
    saved_job = load_job(out / "config.yaml")
    assert saved_job.data.path == str(tiny_data) and saved_job.train.rounds == 2
    assert [run["command"] for run in json.loads((out / "run.json").read_text())] == ["pytest"]
    for name in ("metrics.png", "model/state.pt"):
        assert (out / name).stat().st_size > 0, name


def test_killed_worker_resumes_and_rerun_resumes(ray_cluster, tiny_data, tmp_path, monkeypatch):
    from jimray.train.loop import FAULT_ENV

    out = tmp_path / "run"
    marker = tmp_path / "killed.txt"
    monkeypatch.setenv(FAULT_ENV, f"round=2,rank=1,marker={marker}")
    _run(tiny_data, out, rounds=3, extra=["scaling.max_failures=1"])
    assert marker.is_file(), "the fault was never injected"
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["round"]) == [1, 2, 3]  # nothing lost, nothing repeated
    monkeypatch.delenv(FAULT_ENV)
    summary = _run(tiny_data, out, rounds=3)  # same command again: resumes, trains nothing more
    assert summary["rounds_completed"] == 3
    assert len(json.loads((out / "run.json").read_text())) == 2
    assert list(pd.read_csv(out / "metrics.csv")["round"]) == [1, 2, 3]


def test_training_starts_from_a_pretrained_model(ray_cluster, tiny_data, tmp_path):
    """train.init_from loads the pretrained alignment branch into every worker (a vanishing learning rate keeps
    the weights where they started, so the run's model must equal the pretrained one but for the cluster head)."""
    from jimray.train.pretrain_job import run_pretraining
    from jimray.train.state import load_pretrained, load_round_state

    pre = tmp_path / "pre"
    run_pretraining(load_job(None, [*TINY, "pretrain.curriculum=[[30, 2]]", "pretrain.batch_size=2",
                                    "pretrain.eval_pairs=2", "pretrain.eval_every=2",
                                    "pretrain.structures=[6zu5_ribosome]"]), pre)  # fmt: skip
    out = tmp_path / "run"
    _run(tiny_data, out, rounds=1, extra=[f"train.init_from={pre}", "train.lr=1e-30", "gmm.n_components=3"])
    trained = load_round_state(out / "model").model_state
    pretrained = load_pretrained(pre).model_state
    for key, value in pretrained.items():
        if not key.startswith("cluster_head."):
            assert torch.allclose(trained[key], value, atol=1e-6), key


@pytest.fixture(scope="module")
def easy_data(tmp_path_factory):
    """Two very different structures (a ribosome and a small membrane protein) at high SNR, 12 each."""
    out = tmp_path_factory.mktemp("easydata")
    sim, names = simulate_dataset(None, per_class=12, snr=10.0, box=16, voxel_size_angstrom=20.0,
                                  tilt_range_degrees=60.0, seed=2)
    keep = (sim.classes == 0) | (sim.classes == 3)  # 6zu5_ribosome and 6msm_cftr
    sim = type(sim)(**{k: getattr(sim, k)[keep] for k in ("volumes", "classes", "rotations", "shifts",
                                                          "euler_degrees")})
    write_simulated_dataset(out, sim, 20.0, 60.0, names, rows_per_shard=7)
    return out / "shards"


def test_easy_training_finds_both_structures_and_predict_reproduces_them(ray_cluster, easy_data, tmp_path):
    from jimray.predict.pipeline import predict

    out = tmp_path / "run"
    summary = _run(easy_data, out, rounds=2, extra=["gmm.n_components=2", "gmm.covariance_type=diag"])
    assert summary["clustering_accuracy"] >= 0.9, summary  # chance is 0.5
    pred = predict(out, easy_data, tmp_path / "pred", actors=1, batch_size=8, iterations=1, average=False)
    assert "common frame" in pred.rule
    star = starfile.read(tmp_path / "pred" / "particles.star", always_dict=True)["particles"]
    ids = [int(str(name).rsplit("_", 1)[1].split(".")[0]) for name in star["rlnImageName"]]
    with np.load(out / "model" / "labels.npz") as saved:
        final = dict(zip(saved["ids"].tolist(), saved["labels"].tolist(), strict=True))
    agree = np.mean([final[i] == label - 1 for i, label in zip(ids, star["rlnClassNumber"], strict=True)])
    assert agree >= 0.99, agree


def test_easy_training_chooses_the_number_of_structures(ray_cluster, easy_data, tmp_path):
    """K unset: two workers choose it by held-out class averages (gmm.k_selection: distinct, the default)."""
    out = tmp_path / "run"
    summary = _run(easy_data, out, rounds=2, extra=["gmm.n_components=null", "gmm.candidates=[2, 3, 4]"])
    assert summary["n_clusters"] == 2, summary
    assert summary["clustering_accuracy"] >= 0.9, summary
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["n_clusters"].tolist() == [2, 2]
