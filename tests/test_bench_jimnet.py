"""Jim-Net (measured) in ``jimray bench compare``: trained on a level through Ray Train, scored like the others."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import TINY_TRAINING

from jimray.bench import compare, jimnet_method

SMALL = ("3pwp_tcr_pmhc", "7ddo_ace2_rbd")
TINY = TINY_TRAINING


def options(**kw) -> compare.CompareOptions:
    base = dict(snrs=(100.0,), structures=SMALL, per_class=3, pairs=3, box_size=16, jimnet_rounds=1,
                jimnet_epochs=1, jimnet_overrides=TINY)
    return compare.CompareOptions(**{**base, **kw})


def test_job_config_takes_level_sizes(tmp_path):
    ds = compare.make_dataset(0.05, options())
    config = jimnet_method.job_config(ds, options(jimnet_rounds=4, jimnet_epochs=3), tmp_path / "d", tmp_path / "r")
    assert config.gmm.n_components == 2 and config.data.box_size == 16
    assert (config.train.rounds, config.train.epochs_per_round) == (4, 3)
    assert config.model.channels == [4, 8] and config.data.path == str(tmp_path / "d")


def test_jimnet_is_registered_and_speedup_is_ratio():
    assert jimnet_method.METHOD_NAME in compare.build_methods(options())
    rows = [{"method": "constrained-CC search (30 deg)", "snr": 0.1, "seconds_per_subtomogram": 2.0},
            {"method": jimnet_method.METHOD_NAME, "snr": 0.1, "seconds_per_subtomogram": 0.01}]
    assert jimnet_method.add_speedups(rows)[1]["speedup_vs_search"] == pytest.approx(200.0)


def test_records_are_valid_json_with_nulls():
    rows = [{"method": "PCA + GMM", "snr": 0.1, "rotation_error_mean": float("nan"), "clustering_accuracy": 75.0,
             "seconds_per_subtomogram": np.float64(0.01)}]
    records = compare.benchmark_records(rows)
    assert set(compare.COLUMNS) <= set(records[0])
    assert records[0]["rotation_error_mean"] is None and records[0]["rotation_error_std"] is None
    assert json.loads(json.dumps(records, allow_nan=False))[0]["clustering_accuracy"] == 75.0


@pytest.mark.ray
def test_jimnet_method_trains_and_scores(ray_cluster):
    ds = compare.make_dataset(100.0, options())
    with compare.timer() as elapsed:
        result = jimnet_method.jimnet_method(options())(ds)
    assert result.labels.shape == (6,) and set(result.labels) <= {0, 1}
    assert result.pair_rotations.shape == (3, 3, 3) and result.pair_shifts.shape == (3, 3)
    eye = torch.eye(3).expand(3, 3, 3)
    assert torch.allclose(result.pair_rotations @ result.pair_rotations.transpose(1, 2), eye, atol=1e-4)
    row = compare.evaluate(jimnet_method.METHOD_NAME, ds, result, elapsed())
    # the labels are the run's last-round labels: same Hungarian accuracy as the run reports
    assert row["clustering_accuracy"] == pytest.approx(row["run_clustering_accuracy"])
    assert 0 < row["seconds_per_subtomogram"] < row["train_seconds"] < row["seconds"]
    assert math.isfinite(row["rotation_error_mean"]) and 0 <= row["rotation_error_mean"] <= 2 * math.sqrt(2)


def test_markdown_table_leaves_not_applicable_cells_empty():
    from jimray.bench.common import markdown_table

    table = markdown_table([{"method": "PCA + GMM", "rotation_error_mean": float("nan"), "clustering_accuracy": 75.0}],
                           ["method", "rotation_error_mean", "clustering_accuracy"])
    assert table.splitlines()[-1] == "| PCA + GMM |  | 75 |"
