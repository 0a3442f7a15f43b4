"""Job configuration: defaults, overrides, the shipped jobs, and clear messages for user mistakes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jimray.config import ConfigError, JobConfig, load_job

JOBS = Path(__file__).resolve().parents[1] / "jobs"


@pytest.mark.parametrize("job", sorted(JOBS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_job_validates(job):
    assert isinstance(load_job(job), JobConfig)


def test_overrides_are_parsed_as_yaml():
    config = load_job(JOBS / "quickstart.yaml", ["train.rounds=7", "model.channels=[4, 8]", "gmm.n_components=3"])
    assert config.train.rounds == 7 and config.model.channels == [4, 8] and config.gmm.n_components == 3


def test_unknown_key_names_the_key_and_file(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("train:\n  roundz: 3\n")
    with pytest.raises(ConfigError, match=r"(?s)job.yaml.*unknown key 'train.roundz'"):
        load_job(job)


def test_bad_yaml_and_missing_file(tmp_path):
    job = tmp_path / "bad.yaml"
    job.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job(job)
    with pytest.raises(ConfigError, match="does not exist"):
        load_job(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_job(None, ["train.rounds"])


def test_gamma_must_match_stages():
    with pytest.raises(ConfigError, match="one alignment weight per stage"):
        load_job(None, ["model.stages=3"])


def test_cli_prints_one_line_without_traceback(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("modle:\n  stages: 2\n")
    done = subprocess.run([sys.executable, "-m", "jimray", "train", str(job)], capture_output=True, text=True)
    assert done.returncode == 2
    assert "unknown key 'modle'" in done.stderr and "Traceback" not in done.stderr


def test_train_precision_choices():
    assert load_job(None).train.precision == "fp32"  # the default changes nothing
    assert load_job(None, ["train.precision=bf16"]).train.precision == "bf16"
    with pytest.raises(ConfigError, match=r"train.precision: Input should be 'fp32', 'tf32' or 'bf16'"):
        load_job(None, ["train.precision=fp16"])


def test_placement_strategy_reaches_ray_train(tmp_path):
    """scaling.placement_strategy is handed to Ray Train's ScalingConfig; a misspelt strategy is a config error."""
    from jimray.train.driver import build_trainer

    trainer = build_trainer(load_job(None, ["scaling.placement_strategy=SPREAD"]), None, tmp_path, "sampler")
    assert trainer.scaling_config.placement_strategy == "SPREAD"
    assert build_trainer(load_job(None, []), None, tmp_path, "s").scaling_config.placement_strategy == "PACK"
    with pytest.raises(ConfigError, match="placement_strategy"):
        load_job(None, ["scaling.placement_strategy=spread_out"])
