"""``jimray pretrain``: curriculum training of the alignment branch on simulated pairs, its files, resuming, and
loading the result with ``train.init_from``."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_TRAINING

from jimray.config import ConfigError, load_job
from jimray.model import JimNet
from jimray.run_files import PRETRAIN_CHECKPOINT_FILE
from jimray.train.pretrain import PairTraining, load_pretrained_weights
from jimray.train.pretrain_job import finished_record, run_pretraining
from jimray.train.state import load_pretrained

TINY_PRETRAIN = [
    *TINY_TRAINING,
    "data.box_size=16",
    "data.voxel_size_angstrom=20.0",
    "pretrain.structures=[6zu5_ribosome, 6msm_cftr]",
    "pretrain.curriculum=[[30, 2], [180, 2]]",
    "pretrain.batch_size=2",
    "pretrain.eval_pairs=4",
    "pretrain.eval_every=2",
]


def test_plan_checks_its_curriculum():
    plan = PairTraining(snr=0.1, tilt_range_degrees=60.0, curriculum=[(30.0, 3), (90.0, 2)])
    assert plan.total_steps == 5 and [plan.angle_at(i) for i in (1, 3, 4, 5)] == [30.0, 30.0, 90.0, 90.0]
    with pytest.raises(ValueError, match="curriculum stage"):
        PairTraining(snr=0.1, tilt_range_degrees=60.0, curriculum=[(200.0, 3)])
    with pytest.raises(ConfigError, match="pretrain.curriculum"):
        load_job(None, ["pretrain.curriculum=[[0, 5]]"])


def test_pretraining_writes_its_files_and_loads_into_a_job(tmp_path):
    config = load_job(None, TINY_PRETRAIN)
    record = run_pretraining(config, tmp_path / "pre", ["pytest"])
    for name in ("pretrained.pt", "pretrain.json", "pretrain_curve.png", "config.yaml", "run.json"):
        assert (tmp_path / "pre" / name).is_file(), name
    assert not (tmp_path / "pre" / PRETRAIN_CHECKPOINT_FILE).exists()
    assert [row["step"] for row in record["curve"]] == [0, 2, 4]
    assert [row["max_relative_angle"] for row in record["curve"]] == [30.0, 30.0, 180.0]
    assert record["provenance"]["structures"] == ["6zu5_ribosome", "6msm_cftr"]
    assert json.loads((tmp_path / "pre" / "pretrain.json").read_text())["curve"][0]["loss"] is None  # NaN -> null
    assert finished_record(tmp_path / "pre") is not None
    pretrained = load_pretrained(tmp_path / "pre")
    model = JimNet(config.model, 5)  # a job's K differs from the pretraining's single cluster
    load_pretrained_weights(model, pretrained)
    for key, value in model.state_dict().items():
        if not key.startswith("cluster_head."):
            assert torch.equal(value, pretrained.model_state[key]), key


def test_killed_pretraining_resumes_to_the_same_result(tmp_path):
    config = load_job(None, TINY_PRETRAIN)
    whole = run_pretraining(config, tmp_path / "whole")

    class Killed(Exception):
        """Stands in for the process being killed after the first checkpoint."""

    def die_after_first(row):
        raise Killed

    with pytest.raises(Killed):
        run_pretraining(config, tmp_path / "cut", on_eval=die_after_first)
    assert (tmp_path / "cut" / PRETRAIN_CHECKPOINT_FILE).is_file()
    resumed = run_pretraining(config, tmp_path / "cut")
    assert len(resumed["curve"]) == len(whole["curve"])
    for a, b in zip(resumed["curve"], whole["curve"], strict=True):
        assert a["rotation_error"] == pytest.approx(b["rotation_error"], abs=1e-5)
    w1, w2 = load_pretrained(tmp_path / "whole").model_state, load_pretrained(tmp_path / "cut").model_state
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)


def test_init_from_must_fit_the_job(tmp_path):
    from jimray.train.driver import check_init_from

    config = load_job(None, TINY_PRETRAIN)
    run_pretraining(config, tmp_path / "pre")
    other = load_job(None, [*TINY_PRETRAIN, f"train.init_from={tmp_path / 'pre'}", "model.feature_dim=16"])
    with pytest.raises(ConfigError, match="model.feature_dim: job 16, pretrained 8"):
        check_init_from(other)
    missing = load_job(None, [*TINY_PRETRAIN, f"train.init_from={tmp_path / 'nothing'}"])
    with pytest.raises(ConfigError, match="does not exist"):
        check_init_from(missing)
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="not a jimray pretrained model"):
        check_init_from(load_job(None, [*TINY_PRETRAIN, f"train.init_from={tmp_path / 'bad.pt'}"]))
    check_init_from(load_job(None, [*TINY_PRETRAIN, f"train.init_from={tmp_path / 'pre' / 'pretrained.pt'}"]))
