"""Parquet shards: round trip with truth, atomic writes, validation, Ray Data reading the tensor column."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from jimray.io import shards
from jimray.io.shards import list_shards, read_shard, write_shard, write_shards


def _truth(rng, n):
    return {"class": rng.integers(0, 3, n), "euler_degrees": rng.uniform(-180, 180, (n, 3)),
            "shift_voxels": rng.normal(size=(n, 3))}


def test_shard_round_trip_with_truth(tmp_path, rng):
    volumes = rng.normal(size=(6, 16, 16, 16)).astype(np.float32)
    truth = _truth(rng, 6)
    names = [f"{i + 1}@a.mrcs" for i in range(6)]
    write_shard(tmp_path / "s.parquet", np.arange(10, 16), volumes, 2.5, 60.0, "simulated",
                truth=truth, image_names=names)
    back = read_shard(tmp_path / "s.parquet")
    np.testing.assert_array_equal(back["volume"], volumes)
    assert back["volume"].dtype == np.float32
    np.testing.assert_array_equal(back["id"], np.arange(10, 16))
    assert back["id"].dtype == np.int64
    np.testing.assert_array_equal(back["true_class"], truth["class"])
    assert back["true_class"].dtype == np.int32
    np.testing.assert_allclose(np.stack([back["true_rot"], back["true_tilt"], back["true_psi"]], 1),
                               truth["euler_degrees"], rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(np.stack([back[f"true_shift_{a}"] for a in "xyz"], 1), truth["shift_voxels"],
                               rtol=1e-6, atol=1e-6)
    assert list(back["image_name"]) == names and set(back["tilt_axis"]) == {"y"}
    assert set(back["source"]) == {"simulated"}
    np.testing.assert_array_equal(back["voxel_size_angstrom"], np.full(6, 2.5, np.float32))
    vtype = pq.read_schema(tmp_path / "s.parquet").field("volume").type
    assert vtype.extension_name == "arrow.fixed_shape_tensor" and tuple(vtype.shape) == (16, 16, 16)


def test_write_shards_splits_rows(tmp_path, rng):
    volumes = rng.normal(size=(10, 8, 8, 8)).astype(np.float32)
    truth = _truth(rng, 10)
    paths = write_shards(tmp_path, np.arange(10), volumes, 1.0, np.linspace(30, 90, 10), "sim",
                         truth=truth, rows_per_shard=4, image_names=[str(i) for i in range(10)])
    assert [p.name for p in paths] == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    assert list_shards(tmp_path) == paths
    parts = [read_shard(p) for p in paths]
    np.testing.assert_array_equal(np.concatenate([p["volume"] for p in parts]), volumes)
    np.testing.assert_array_equal(np.concatenate([p["true_class"] for p in parts]), truth["class"])
    np.testing.assert_allclose(np.concatenate([p["tilt_range_degrees"] for p in parts]), np.linspace(30, 90, 10),
                               rtol=1e-6)
    assert list(np.concatenate([p["image_name"] for p in parts])) == [str(i) for i in range(10)]


def test_failure_mid_write_leaves_no_shard(tmp_path, rng, monkeypatch):
    def crash(table, where, **kwargs):
        with open(where, "wb") as fh:  # half a file, then the job dies
            fh.write(b"PAR1 partial")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(shards.pq, "write_table", crash)
    with pytest.raises(KeyboardInterrupt):
        write_shard(tmp_path / "s.parquet", np.arange(2), rng.normal(size=(2, 4, 4, 4)), 1.0, 60.0, "x")
    assert list(tmp_path.iterdir()) == []


def test_successful_write_leaves_no_temp_file(tmp_path, rng):
    write_shard(tmp_path / "s.parquet", np.arange(2), rng.normal(size=(2, 4, 4, 4)), 1.0, 60.0, "x")
    assert [p.name for p in tmp_path.iterdir()] == ["s.parquet"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"volumes": np.full((2, 4, 4, 4), np.nan)}, "non-finite"),
        ({"volumes": np.zeros((2, 4, 4))}, "n, d, h, w"),
        ({"ids": np.array([1, 1])}, "unique"),
        ({"ids": np.arange(3)}, "ids"),
        ({"tilt_range_degrees": 120.0}, "tilt_range"),
        ({"voxel_size_angstrom": 0.0}, "voxel_size"),
        ({"sources": ["a"]}, "sources"),
        ({"truth": {"class": np.zeros(3)}}, "class"),
        ({"truth": {"euler": np.zeros((2, 3))}}, "unknown truth"),
    ],
)
def test_invalid_inputs_are_rejected(tmp_path, change, message):
    args = {"ids": np.arange(2), "volumes": np.zeros((2, 4, 4, 4)), "voxel_size_angstrom": 1.0,
            "tilt_range_degrees": 60.0, "sources": "x", "truth": None}
    args.update(change)
    truth = args.pop("truth")
    with pytest.raises(ValueError, match=message):
        write_shard(tmp_path / "s.parquet", **args, truth=truth)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.ray
def test_ray_data_reads_the_tensor_column_as_ndarray(ray_cluster, tmp_path, rng):
    volumes = rng.normal(size=(12, 8, 8, 8)).astype(np.float32)
    write_shards(tmp_path, np.arange(12), volumes, 1.0, 60.0, "sim", rows_per_shard=5)
    ds = ray_cluster.data.read_parquet(str(tmp_path))
    seen = 0
    for batch in ds.iter_batches(batch_format="numpy", batch_size=4):
        assert batch["volume"].dtype == np.float32 and batch["volume"].shape[1:] == (8, 8, 8)
        np.testing.assert_array_equal(batch["volume"], volumes[batch["id"]])
        seen += len(batch["id"])
    assert seen == 12
