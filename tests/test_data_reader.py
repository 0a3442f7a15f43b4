"""Ray Data reader: Parquet, STAR and MRC-folder inputs, normalisation, torch dtypes, Ray Train sharding."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from jimray.data.reader import normalize_batch, numeric_columns, read_subtomograms, torch_batch_dtypes
from jimray.io.mrc import write_stack, write_volume
from jimray.io.shards import write_shards
from jimray.io.star import write_particles

N = 10
BOX = 8


@pytest.fixture
def volumes(rng):
    return (rng.normal(size=(N, BOX, BOX, BOX)) * 3 + 5).astype(np.float32)


def _collect(ds) -> dict:
    parts = list(ds.iter_batches(batch_format="numpy", batch_size=4))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _standardised(v):
    return (v - v.mean(axis=(1, 2, 3), keepdims=True)) / v.std(axis=(1, 2, 3), keepdims=True)


def test_normalize_batch_per_subtomogram(volumes):
    out = normalize_batch({"id": np.arange(N), "volume": volumes})
    np.testing.assert_allclose(out["volume"].mean(axis=(1, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(out["volume"].std(axis=(1, 2, 3)), 1, atol=1e-5)
    constant = normalize_batch({"volume": np.full((1, 4, 4, 4), 7.0)})["volume"]
    assert np.isfinite(constant).all() and np.abs(constant).max() == 0


@pytest.mark.ray
def test_read_parquet_shards_with_truth(ray_cluster, tmp_path, volumes, rng):
    truth = {"class": rng.integers(0, 2, N), "euler_degrees": rng.normal(size=(N, 3)),
             "shift_voxels": rng.normal(size=(N, 3))}
    write_shards(tmp_path, np.arange(100, 100 + N), volumes, 2.0, 45.0, "simulated", truth=truth, rows_per_shard=3)
    rows = _collect(read_subtomograms(tmp_path, box_size=BOX))
    order = np.argsort(rows["id"])
    np.testing.assert_array_equal(rows["id"][order], np.arange(100, 100 + N))
    np.testing.assert_allclose(rows["volume"][order], _standardised(volumes), atol=1e-5)
    np.testing.assert_array_equal(rows["true_class"][order], truth["class"])
    assert set(rows["tilt_range_degrees"]) == {45.0} and set(rows["voxel_size_angstrom"]) == {2.0}
    assert "source" not in rows and "tilt_axis" not in rows
    raw = _collect(read_subtomograms(tmp_path / "shard-00001.parquet", normalize=False, tilt_range_degrees=90))
    np.testing.assert_array_equal(raw["volume"], volumes[3:6])
    assert set(raw["tilt_range_degrees"]) == {90.0}


@pytest.mark.ray
def test_wrong_box_size_is_a_clear_error(ray_cluster, tmp_path, volumes):
    write_shards(tmp_path / "shards", np.arange(N), volumes, 2.0, 60.0, "x")
    with pytest.raises(ValueError, match="expected box size 16"):
        read_subtomograms(tmp_path / "shards", box_size=16)
    (tmp_path / "mrc").mkdir()
    write_volume(tmp_path / "mrc" / "a.mrc", volumes[0], 1.0)
    with pytest.raises(ValueError, match="a.mrc.*expected 16"):
        read_subtomograms(tmp_path / "mrc", box_size=16)


@pytest.mark.ray
def test_read_star_with_stack_and_single_files(ray_cluster, tmp_path, volumes):
    (tmp_path / "data").mkdir()
    write_stack(tmp_path / "data" / "stack.mrcs", volumes[:6], 0.0)
    for i in range(6, N):
        write_volume(tmp_path / "data" / f"p{i}.mrc", volumes[i], 0.0)
    names = [f"{i + 1}@data/stack.mrcs" for i in range(6)] + [f"data/p{i}.mrc" for i in range(6, N)]
    write_particles(tmp_path / "p.star", pd.DataFrame({"rlnImageName": names}), 3.0)
    ds = read_subtomograms(tmp_path / "p.star", normalize=False, override_num_blocks=3)
    rows = _collect(ds)
    order = np.argsort(rows["id"])
    np.testing.assert_array_equal(rows["id"][order], np.arange(N))
    np.testing.assert_array_equal(rows["volume"][order], volumes)
    assert list(rows["image_name"][order]) == names
    assert set(rows["voxel_size_angstrom"]) == {3.0} and set(rows["tilt_range_degrees"]) == {60.0}


@pytest.mark.ray
def test_read_mrc_folder_and_torch_batches(ray_cluster, tmp_path, volumes):
    for i in range(N):
        write_volume(tmp_path / f"v{i:02d}.mrc", volumes[i], 1.5)
    ds = read_subtomograms(tmp_path)
    rows = _collect(ds)
    order = np.argsort(rows["id"])
    np.testing.assert_allclose(rows["volume"][order], _standardised(volumes), atol=1e-5)
    assert set(rows["voxel_size_angstrom"]) == {1.5}
    columns = numeric_columns(ds)
    assert "image_name" not in columns and {"id", "volume"} <= set(columns)
    with pytest.raises(ValueError, match="image_name"):
        torch_batch_dtypes(ds.schema())
    dtypes = torch_batch_dtypes(columns)
    import torch

    ids = []
    for batch in ds.select_columns(columns).iter_torch_batches(batch_size=4, dtypes=dtypes):
        assert batch["volume"].dtype == torch.float32 and batch["id"].dtype == torch.int64
        ids += batch["id"].tolist()
    assert sorted(ids) == list(range(N))


def test_missing_voxel_size_and_bad_path(tmp_path, volumes):
    write_volume(tmp_path / "a.mrc", volumes[0], 0.0)
    with pytest.raises(ValueError, match="voxel size"):
        read_subtomograms(tmp_path)
    with pytest.raises(ValueError, match="no such file"):
        read_subtomograms(tmp_path / "nope")


@pytest.mark.ray
def test_two_train_workers_with_fractional_cpus_see_every_id(ray_cluster, tmp_path, rng):
    """The known trap: 2 workers x 1 CPU on a 2-CPU cluster leave no CPU for the Parquet read and hang."""
    import threading

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def train_loop(config):  # nested, so Ray pickles it by value (workers cannot import this test module)
        import ray.train

        ids = []
        for batch in ray.train.get_dataset_shard("train").iter_batches(batch_size=4, batch_format="numpy"):
            ids += batch["id"].tolist()
        with open(f"{config['out']}/rank{ray.train.get_context().get_world_rank()}.json", "w") as fh:
            json.dump(ids, fh)
        ray.train.report({"count": len(ids)})

    n = 24
    write_shards(tmp_path / "shards", np.arange(n), rng.normal(size=(n, 4, 4, 4)), 1.0, 60.0, "x", rows_per_shard=5)
    ds = read_subtomograms(tmp_path / "shards")
    (tmp_path / "ids").mkdir()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"out": str(tmp_path / "ids")},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        datasets={"train": ds},
        run_config=RunConfig(storage_path=str(tmp_path / "storage"), name="reader-test"),
    )
    outcome = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except Exception as exc:  # reported below, in the test's thread
            outcome["error"] = exc

    worker = threading.Thread(target=fit, daemon=True)
    worker.start()
    worker.join(timeout=240)  # a hang fails here instead of blocking the suite
    assert not worker.is_alive(), "Ray Train with 2 fractional-CPU workers did not finish in 240 s (hang)"
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].error is None
    seen = [json.loads((tmp_path / "ids" / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(len(s) > 0 for s in seen)
    assert sorted(seen[0] + seen[1]) == list(range(n))
