"""Parquet shards: round trip with truth, atomic writes, validation, the raw volume layout (schema metadata,
zero-copy read), shards of the earlier ``fixed_shape_tensor`` layout, Ray Data reading both."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jimray.errors import DataError
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
    assert back["volume"].shape == (6, 16, 16, 16)
    vtype = pq.read_schema(tmp_path / "s.parquet").field("volume").type
    assert pa.types.is_fixed_size_binary(vtype) and vtype.byte_width == 4 * 16**3


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


def _write_legacy_shard(path, ids, volumes):
    """A shard as jimray wrote it before the raw layout: ``volume`` a canonical ``fixed_shape_tensor``, no
    ``jimray.volume`` metadata."""
    table = shards.shard_table(ids, volumes, 1.0, 60.0, "old")
    tensor = pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(volumes, dtype=np.float32))
    table = table.set_column(table.schema.get_field_index("volume"), "volume", tensor).replace_schema_metadata(None)
    pq.write_table(table, path, compression="none")
    return path


def test_schema_metadata_names_shape_dtype_and_axis_order(tmp_path, rng):
    write_shard(tmp_path / "s.parquet", np.arange(2), rng.normal(size=(2, 3, 4, 5)), 1.0, 60.0, "x")
    schema = pq.read_schema(tmp_path / "s.parquet")
    meta = json.loads(schema.metadata[shards.VOLUME_METADATA_KEY])
    assert meta == {"layout": "raw", "version": 2, "dtype": "<f4", "shape": [3, 4, 5], "axes": "zyx", "order": "C"}
    assert schema.field("volume").type == pa.binary(4 * 3 * 4 * 5)
    assert shards.volume_shape(schema) == ((3, 4, 5), "raw")
    # a non-cubic box keeps (z, y, x): row k, voxel (z, y, x) is stored at byte 4 * (z*h*w + y*w + x)
    volumes = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    write_shard(tmp_path / "t.parquet", np.arange(2), volumes, 1.0, 60.0, "x")
    raw = pq.read_table(tmp_path / "t.parquet").column("volume").chunk(0)[1].as_py()
    assert np.frombuffer(raw, "<f4")[(2 * 4 + 3) * 5 + 4] == volumes[1, 2, 3, 4]
    np.testing.assert_array_equal(read_shard(tmp_path / "t.parquet")["volume"], volumes)


def test_raw_volumes_are_read_without_a_copy(tmp_path, rng):
    volumes = rng.normal(size=(4, 8, 8, 8)).astype(np.float32)
    write_shard(tmp_path / "s.parquet", np.arange(4), volumes, 1.0, 60.0, "x")
    table = pq.read_table(tmp_path / "s.parquet")
    chunk = table.column("volume").chunk(0)
    arrow_bytes = np.frombuffer(chunk.buffers()[1], dtype=np.uint8)
    view = shards.volume_column(table.column("volume"), (8, 8, 8))
    assert np.shares_memory(view, arrow_bytes) and not view.flags.owndata
    np.testing.assert_array_equal(view, volumes)
    # a slice of the column (non-zero offset) is still a view, of the right rows
    part = shards.volumes_from_binary(chunk.slice(1, 2), (8, 8, 8))
    assert np.shares_memory(part, arrow_bytes)
    np.testing.assert_array_equal(part, volumes[1:3])
    # what Ray Data gets: a tensor column over the same bytes
    tensor = shards.binary_to_tensor(chunk, (8, 8, 8))
    assert np.shares_memory(tensor.to_numpy_ndarray(), arrow_bytes)
    # read_shard hands out the same kind of view: its memory belongs to a pyarrow buffer, not to numpy
    back = read_shard(tmp_path / "s.parquet")["volume"]
    base = back
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, pa.Buffer)


def test_shards_of_the_earlier_layout_still_read(tmp_path, rng):
    volumes = rng.normal(size=(3, 4, 4, 4)).astype(np.float32)
    path = _write_legacy_shard(tmp_path / "old.parquet", np.arange(3), volumes)
    assert shards.volume_shape(pq.read_schema(path)) == ((4, 4, 4), "tensor")
    back = read_shard(path)
    np.testing.assert_array_equal(back["volume"], volumes)
    assert back["volume"].dtype == np.float32
    np.testing.assert_array_equal(back["id"], np.arange(3))


@pytest.mark.parametrize("metadata", [None, b"not json", b'{"layout": "raw", "dtype": "<f8", "shape": [4, 4, 4]}'])
def test_unknown_volume_layout_says_to_reingest(tmp_path, rng, metadata):
    table = shards.shard_table(np.arange(2), rng.normal(size=(2, 4, 4, 4)), 1.0, 60.0, "x")
    table = table.replace_schema_metadata(None if metadata is None else {shards.VOLUME_METADATA_KEY: metadata})
    pq.write_table(table, tmp_path / "s.parquet")
    with pytest.raises(ValueError, match="re-run `jimray ingest`"):
        read_shard(tmp_path / "s.parquet")
    floats = table.set_column(table.schema.get_field_index("volume"), "volume", pa.array([[1.0], [2.0]]))
    pq.write_table(floats, tmp_path / "f.parquet")
    with pytest.raises(ValueError, match="re-run `jimray ingest`"):
        read_shard(tmp_path / "f.parquet")


@pytest.mark.ray
def test_ray_data_reads_both_layouts_as_ndarray(ray_cluster, tmp_path, rng):
    from jimray.data.reader import read_subtomograms

    volumes = rng.normal(size=(12, 8, 8, 8)).astype(np.float32)
    write_shards(tmp_path / "new", np.arange(12), volumes, 1.0, 60.0, "sim", rows_per_shard=5)
    (tmp_path / "old").mkdir()
    for k, start in enumerate(range(0, 12, 5)):
        _write_legacy_shard(tmp_path / "old" / f"shard-{k:05d}.parquet", np.arange(start, min(start + 5, 12)),
                            volumes[start:start + 5])
    for folder in ("new", "old"):
        seen = 0
        for batch in read_subtomograms(tmp_path / folder, normalize=False).iter_batches(batch_format="numpy",
                                                                                         batch_size=4):
            assert batch["volume"].dtype == np.float32 and batch["volume"].shape[1:] == (8, 8, 8)
            np.testing.assert_array_equal(batch["volume"], volumes[batch["id"]])
            seen += len(batch["id"])
        assert seen == 12, folder
    # one folder mixing both layouts: one message, naming the fix
    _write_legacy_shard(tmp_path / "new" / "shard-00009.parquet", np.arange(20, 22), volumes[:2])
    with pytest.raises(DataError, match="earlier volume layout.*re-run `jimray ingest`"):
        read_subtomograms(tmp_path / "new")
