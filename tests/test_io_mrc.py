"""MRC reading/writing: round trips, stack addressing, truncated/corrupt files, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest

from jimray.io.mrc import (
    MRCError,
    parse_spec,
    read_header,
    read_volume,
    split_image_name,
    validate_volume_file,
    write_stack,
    write_volume,
)


def test_volume_round_trip_keeps_values_and_voxel_size(tmp_path, rng):
    volume = rng.normal(size=(16, 18, 20)).astype(np.float32)
    write_volume(tmp_path / "v.mrc", volume, 3.25)
    back, voxel = read_volume(tmp_path / "v.mrc")
    assert back.dtype == np.float32 and back.shape == (16, 18, 20)
    np.testing.assert_array_equal(back, volume)
    assert voxel == pytest.approx(3.25)
    assert read_header(tmp_path / "v.mrc") == ((16, 18, 20), pytest.approx(3.25))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mrc"]  # no temp file left


def test_zero_voxel_size_reads_as_none(tmp_path, rng):
    write_volume(tmp_path / "v.mrc", rng.normal(size=(8, 8, 8)), 0.0)
    assert read_volume(tmp_path / "v.mrc")[1] is None


def test_stack_addressing_is_one_based(tmp_path, rng):
    stack = rng.normal(size=(4, 16, 16, 16)).astype(np.float32)
    write_stack(tmp_path / "s.mrcs", stack, 2.0)
    for k in range(1, 5):
        volume, voxel = read_volume(f"{k}@{tmp_path / 's.mrcs'}")
        np.testing.assert_array_equal(volume, stack[k - 1])
        assert voxel == pytest.approx(2.0)
    assert read_header(tmp_path / "s.mrcs")[0] == (4, 16, 16, 16)
    assert read_header(f"3@{tmp_path / 's.mrcs'}")[0] == (16, 16, 16)
    with pytest.raises(MRCError, match="out of range"):
        read_volume(f"5@{tmp_path / 's.mrcs'}")
    with pytest.raises(MRCError, match="stack of 4"):
        read_volume(tmp_path / "s.mrcs")


def test_parse_spec():
    assert parse_spec("3@a/b.mrcs") == (parse_spec("a/b.mrcs")[0], 3)
    assert parse_spec("dir@x/b.mrc")[1] is None  # '@' inside a name is not an index
    assert split_image_name("12@stacks/a.mrcs") == ("12@", "stacks/a.mrcs")
    assert split_image_name("dir@x/b.mrc") == ("", "dir@x/b.mrc")
    assert split_image_name("plain.mrc") == ("", "plain.mrc")
    with pytest.raises(MRCError, match="1-based"):
        parse_spec("0@a.mrcs")


def test_truncated_and_garbage_files_name_the_file(tmp_path, rng):
    write_volume(tmp_path / "good.mrc", rng.normal(size=(16, 16, 16)), 1.0)
    raw = (tmp_path / "good.mrc").read_bytes()
    (tmp_path / "cut.mrc").write_bytes(raw[:-500])
    (tmp_path / "junk.mrc").write_bytes(b"not an mrc file" * 10)
    for name in ("cut.mrc", "junk.mrc", "missing.mrc"):
        with pytest.raises(MRCError) as info:
            read_volume(tmp_path / name)
        assert name in str(info.value)
        assert isinstance(info.value, ValueError)
    assert "truncated" in validate_volume_file(tmp_path / "cut.mrc")
    assert validate_volume_file(tmp_path / "junk.mrc") is not None
    assert validate_volume_file(tmp_path / "good.mrc") is None


def test_validate_reports_non_finite_values(tmp_path, rng):
    volume = rng.normal(size=(8, 8, 8)).astype(np.float32)
    volume[1, 2, 3] = np.nan
    with pytest.warns(RuntimeWarning):  # mrcfile warns when computing header statistics of NaN data
        write_volume(tmp_path / "nan.mrc", volume, 1.0)
    assert "non-finite" in validate_volume_file(tmp_path / "nan.mrc")
    assert validate_volume_file(tmp_path / "nan.mrc", check_values=False) is None


def test_failed_write_leaves_previous_file_and_no_temp(tmp_path, rng, monkeypatch):
    import mrcfile

    old = rng.normal(size=(8, 8, 8)).astype(np.float32)
    write_volume(tmp_path / "v.mrc", old, 1.0)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(mrcfile.mrcfile.MrcFile, "set_data", boom)
    with pytest.raises(OSError):
        write_volume(tmp_path / "v.mrc", old + 1, 1.0)
    assert [p.name for p in tmp_path.iterdir()] == ["v.mrc"]
    np.testing.assert_array_equal(read_volume(tmp_path / "v.mrc")[0], old)


def test_bad_inputs_rejected(tmp_path):
    with pytest.raises(ValueError, match="z, y, x"):
        write_volume(tmp_path / "v.mrc", np.zeros((4, 4)), 1.0)
    with pytest.raises(ValueError, match="n, z, y, x"):
        write_stack(tmp_path / "s.mrcs", np.zeros((4, 4, 4)), 1.0)
    with pytest.raises(ValueError, match="voxel size"):
        write_volume(tmp_path / "v.mrc", np.zeros((4, 4, 4)), -1.0)
