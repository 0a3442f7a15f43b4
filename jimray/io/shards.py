"""The Parquet shard format of jimray: one row per subtomogram.

Columns
-------
* ``id`` int64, unique across a dataset (the row order of the source STAR file, or the simulation index).
* ``volume``: float32 ``(d, h, w)`` = ``(z, y, x)`` stored as raw bytes, one ``fixed_size_binary(4 d h w)`` value
  per row: the C-order little-endian float32 bytes of the volume. Shape, dtype and axis order sit in the Parquet
  schema metadata under ``jimray.volume`` (JSON, see :func:`volume_metadata`), e.g.
  ``{"layout": "raw", "version": 2, "dtype": "<f4", "shape": [32, 32, 32], "axes": "zyx", "order": "C"}``.
  Decoding is a copy: Parquet stores the values PLAIN, without repetition levels, so pyarrow only copies the
  bytes out of the file; numpy then gets them without a copy (:func:`volumes_from_binary`: ``np.frombuffer`` on
  the Arrow data buffer, reshaped). No statistics are written for this column (min/max of 128 KiB values would
  only bloat the footer).
* ``voxel_size_angstrom`` float32, ``source`` string (file, ``"n@file"`` or ``"simulated"``),
  ``tilt_range_degrees`` float32 (see :mod:`jimray.conventions`), ``tilt_axis`` string (``"y"``).
* optional ground truth: ``true_class`` int32, ``true_rot/true_tilt/true_psi`` float32 (RELION ZYZ degrees),
  ``true_shift_x/y/z`` float32 (voxels, the internal shift ``t`` of :mod:`jimray.conventions`).
* optional ``image_name`` string: the ``rlnImageName`` to carry into output STAR files.

Earlier layout
--------------
Shards written before this layout (jimray <= issue 2) store ``volume`` as Arrow's canonical extension type
``pa.fixed_shape_tensor(pa.float32(), (d, h, w))``, a Parquet list of floats with repetition levels: its
decode made Ray Data streaming ~17x slower than a raw read of the same bytes (BENCHMARKS.md, issue 2).
Such shards still read (:func:`read_shard` and :func:`jimray.data.reader.read_subtomograms` keep the old
decode); re-run ``jimray ingest`` to rewrite them at disk speed. A ``volume`` column of any other type fails
with one message saying so (:data:`REWRITE_HINT`).

Ray Data
--------
``ray.data.read_parquet`` sees the raw layout as a binary column; :func:`jimray.data.reader.read_subtomograms`
turns each block into a canonical ``fixed_shape_tensor`` column without copying (:func:`binary_to_tensor`,
a ``map_batches`` step fused with the read), so ``iter_batches(batch_format="numpy")`` yields ``volume`` as a
float32 ndarray ``(b, d, h, w)``. Read the shards through ``read_subtomograms`` (or :func:`read_shard`), not
through a bare ``read_parquet``.

Shards are written uncompressed, without dictionary encoding except for the string columns: subtomograms
are noise-dominated floats, and pyarrow reads such shards faster than with the default snappy/dictionary
settings (0.48 s against 0.60 s for 2000 32^3 volumes, measured while writing ``jimray bench io``).

Writes are atomic: a shard is written to ``<name>.tmp-<pid>`` and renamed, so a killed job never leaves a
half-written shard under the final name.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "TRUTH_COLUMNS",
    "shard_table",
    "write_shard",
    "write_shards",
    "read_shard",
    "list_shards",
    "volume_column",
    "volume_metadata",
    "volume_shape",
    "volumes_from_binary",
    "binary_to_tensor",
    "volume_array",
    "VOLUME_METADATA_KEY",
    "REWRITE_HINT",
]

TRUTH_COLUMNS = ("true_class", "true_rot", "true_tilt", "true_psi", "true_shift_x", "true_shift_y", "true_shift_z")
TILT_AXIS = "y"

VOLUME_METADATA_KEY = b"jimray.volume"
VOLUME_LAYOUT_VERSION = 2
VOLUME_DTYPE = np.dtype("<f4")
REWRITE_HINT = "re-run `jimray ingest` (or `jimray simulate` / `jimray extract`) to rewrite the shards"


def volume_metadata(shape: Sequence[int]) -> dict:
    """The ``jimray.volume`` schema metadata of the raw layout for volumes of ``shape`` ``(d, h, w)``."""
    return {"layout": "raw", "version": VOLUME_LAYOUT_VERSION, "dtype": VOLUME_DTYPE.str,
            "shape": [int(s) for s in shape], "axes": "zyx", "order": "C"}


def volume_shape(schema: pa.Schema, where: str | Path = "shard") -> tuple[tuple[int, int, int], str]:
    """``((d, h, w), layout)`` of a shard's ``volume`` column, ``layout`` ``"raw"`` (this version) or ``"tensor"``
    (the earlier ``fixed_shape_tensor`` layout). Anything else raises ``ValueError`` with :data:`REWRITE_HINT`."""
    vtype = schema.field("volume").type
    if pa.types.is_fixed_size_binary(vtype):
        raw = (schema.metadata or {}).get(VOLUME_METADATA_KEY)
        try:
            meta = json.loads(raw) if raw is not None else None
            shape = tuple(int(s) for s in meta["shape"])
            ok = (meta.get("layout") == "raw" and meta.get("dtype") == VOLUME_DTYPE.str
                  and meta.get("axes") == "zyx" and meta.get("order") == "C" and len(shape) == 3
                  and min(shape) >= 1 and vtype.byte_width == VOLUME_DTYPE.itemsize * int(np.prod(shape)))
        except (TypeError, ValueError, KeyError, AttributeError):
            ok = False
        if not ok:
            raise ValueError(f"{where}: volume column of raw bytes without valid `jimray.volume` metadata "
                             f"(found {raw!r}); {REWRITE_HINT}")
        return shape, "raw"  # type: ignore[return-value]
    shape = tuple(getattr(vtype, "shape", ()))
    if getattr(vtype, "extension_name", None) == "arrow.fixed_shape_tensor" and len(shape) == 3:
        return shape, "tensor"  # type: ignore[return-value]
    raise ValueError(f"{where}: volume column of type {vtype} is not a jimray volume layout; {REWRITE_HINT}")


def volume_array(volumes: np.ndarray) -> pa.FixedSizeBinaryArray:
    """``(n, d, h, w)`` float32 -> ``fixed_size_binary(4 d h w)`` over the same bytes (no copy when the input is
    C-contiguous little-endian float32)."""
    vols = np.ascontiguousarray(volumes, dtype=VOLUME_DTYPE)
    n = vols.shape[0]
    width = vols.itemsize * int(np.prod(vols.shape[1:]))
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(vols)])


def _binary_data(array: pa.Array, shape: Sequence[int]) -> pa.Buffer:
    if array.null_count:
        raise ValueError(f"volume column holds {array.null_count} nulls; {REWRITE_HINT}")
    width = array.type.byte_width
    if width != VOLUME_DTYPE.itemsize * int(np.prod(shape)):
        raise ValueError(f"volume values of {width} bytes do not hold float32 volumes of shape {tuple(shape)}")
    data = array.buffers()[1]
    if data is None:  # an empty chunk may come without a data buffer
        return pa.py_buffer(b"")
    return data.slice(array.offset * width, len(array) * width)


def volumes_from_binary(array: pa.Array, shape: Sequence[int]) -> np.ndarray:
    """A ``fixed_size_binary`` chunk -> float32 ``(n, d, h, w)``: a numpy view of the Arrow data buffer (no copy;
    read-only when the buffer is, as for the buffers pyarrow reads from Parquet)."""
    data = np.frombuffer(_binary_data(array, shape), dtype=VOLUME_DTYPE)
    if sys.byteorder != "little":  # pragma: no cover - the stored bytes are little-endian
        data = data.astype(np.float32)
    return data.reshape((len(array), *shape))


def binary_to_tensor(array: pa.Array, shape: Sequence[int]) -> pa.FixedShapeTensorArray:
    """A ``fixed_size_binary`` chunk -> canonical ``fixed_shape_tensor(float32, shape)`` over the same buffer
    (no copy): what Ray Data turns into ``(b, d, h, w)`` ndarrays."""
    size = int(np.prod(shape))
    values = pa.Array.from_buffers(pa.float32(), len(array) * size, [None, _binary_data(array, shape)])
    storage = pa.FixedSizeListArray.from_arrays(values, size)
    return pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.float32(), tuple(shape)), storage)


def _per_row(value, n: int, name: str, dtype) -> np.ndarray:
    arr = np.asarray(value, dtype=dtype)
    if arr.ndim == 0:
        arr = np.full(n, arr, dtype=dtype)
    if arr.shape != (n,):
        raise ValueError(f"{name} must be a scalar or have shape ({n},), got {arr.shape}")
    return arr


def _strings(values, n: int, name: str) -> list[str]:
    if isinstance(values, str):
        return [values] * n
    out = [str(v) for v in values]
    if len(out) != n:
        raise ValueError(f"{name} must hold {n} strings (one per volume), got {len(out)}")
    return out


def _truth_columns(truth: dict, n: int) -> dict[str, pa.Array]:
    unknown = set(truth) - {"class", "euler_degrees", "shift_voxels"}
    if unknown:
        raise ValueError(f"unknown truth keys {sorted(unknown)}; use 'class', 'euler_degrees', 'shift_voxels'")
    cols: dict[str, pa.Array] = {}
    if "class" in truth:
        cls = np.asarray(truth["class"])
        if cls.shape != (n,):
            raise ValueError(f"truth['class'] must have shape ({n},), got {cls.shape}")
        cols["true_class"] = pa.array(cls.astype(np.int32), pa.int32())
    for key, names in (("euler_degrees", ("true_rot", "true_tilt", "true_psi")),
                       ("shift_voxels", ("true_shift_x", "true_shift_y", "true_shift_z"))):
        if key in truth:
            arr = np.asarray(truth[key], dtype=np.float64)
            if arr.shape != (n, 3):
                raise ValueError(f"truth['{key}'] must have shape ({n}, 3), got {arr.shape}")
            if not np.isfinite(arr).all():
                raise ValueError(f"truth['{key}'] holds non-finite values")
            for i, name in enumerate(names):
                cols[name] = pa.array(arr[:, i].astype(np.float32), pa.float32())
    return cols


def shard_table(
    ids: np.ndarray,
    volumes: np.ndarray,
    voxel_size_angstrom,
    tilt_range_degrees,
    sources,
    *,
    truth: dict | None = None,
    image_names: Sequence[str] | None = None,
) -> pa.Table:
    """Build (and validate) the Arrow table of one shard; see the module docstring for the columns.

    ``volumes`` ``(n, d, h, w)`` must be finite; ``voxel_size_angstrom`` / ``tilt_range_degrees`` are scalars
    or ``(n,)``; ``sources`` a string or ``n`` strings; ``truth`` keys ``class`` (n,), ``euler_degrees`` (n, 3),
    ``shift_voxels`` (n, 3).
    """
    vols = np.ascontiguousarray(volumes, dtype=np.float32)
    if vols.ndim != 4 or min(vols.shape[1:], default=0) < 1:
        raise ValueError(f"volumes must have shape (n, d, h, w), got {vols.shape}")
    n = vols.shape[0]
    if n == 0:
        raise ValueError("a shard needs at least one volume")
    if not np.isfinite(vols).all():
        bad = np.flatnonzero(~np.isfinite(vols).reshape(n, -1).all(axis=1))
        raise ValueError(f"volumes hold non-finite values (rows {bad[:10].tolist()}); check or drop them")
    id_arr = np.asarray(ids)
    if id_arr.shape != (n,) or not np.issubdtype(id_arr.dtype, np.integer):
        raise ValueError(f"ids must be {n} integers, got shape {id_arr.shape} dtype {id_arr.dtype}")
    if len(np.unique(id_arr)) != n:
        raise ValueError("ids must be unique")
    voxel = _per_row(voxel_size_angstrom, n, "voxel_size_angstrom", np.float32)
    tilt = _per_row(tilt_range_degrees, n, "tilt_range_degrees", np.float32)
    if not (np.isfinite(voxel).all() and (voxel > 0).all()):
        raise ValueError("voxel_size_angstrom must be positive and finite")
    if not (np.isfinite(tilt).all() and ((tilt >= 0) & (tilt <= 90)).all()):
        raise ValueError("tilt_range_degrees must lie in [0, 90] (90 = no missing wedge)")
    columns = {
        "id": pa.array(id_arr.astype(np.int64), pa.int64()),
        "volume": volume_array(vols),
        "voxel_size_angstrom": pa.array(voxel, pa.float32()),
        "source": pa.array(_strings(sources, n, "sources"), pa.string()),
        "tilt_range_degrees": pa.array(tilt, pa.float32()),
        "tilt_axis": pa.array([TILT_AXIS] * n, pa.string()),
    }
    if truth:
        columns.update(_truth_columns(truth, n))
    if image_names is not None:
        columns["image_name"] = pa.array(_strings(image_names, n, "image_names"), pa.string())
    table = pa.table(columns)
    meta = {VOLUME_METADATA_KEY: json.dumps(volume_metadata(vols.shape[1:])).encode()}
    return table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})


def _write_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        # Volumes are noise-dominated floats: compression and dictionaries cost time and save little.
        # No min/max statistics for the volume bytes: two 128 KiB values per column chunk, for no use.
        string_columns = [f.name for f in table.schema if pa.types.is_string(f.type)]
        stats_columns = [f.name for f in table.schema if f.name != "volume"]
        pq.write_table(table, tmp, compression="none", use_dictionary=string_columns,
                       write_statistics=stats_columns)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_shard(
    path: str | Path,
    ids: np.ndarray,
    volumes: np.ndarray,
    voxel_size_angstrom,
    tilt_range_degrees,
    sources,
    *,
    truth: dict | None = None,
    image_names: Sequence[str] | None = None,
) -> Path:
    """Write one Parquet shard atomically (temp file ``<path>.tmp-<pid>``, then ``os.replace``); returns ``path``.
    Arguments as :func:`shard_table`."""
    path = Path(path)
    table = shard_table(ids, volumes, voxel_size_angstrom, tilt_range_degrees, sources,
                        truth=truth, image_names=image_names)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(table, path)
    return path


def _take(value, rows: slice):
    if value is None or isinstance(value, str) or np.ndim(value) == 0:
        return value
    if isinstance(value, np.ndarray):
        return value[rows]
    return list(value)[rows]


def write_shards(
    out_dir: str | Path,
    ids: np.ndarray,
    volumes: np.ndarray,
    voxel_size_angstrom,
    tilt_range_degrees,
    sources,
    *,
    truth: dict | None = None,
    image_names: Sequence[str] | None = None,
    rows_per_shard: int = 256,
    prefix: str = "shard",
    start_index: int = 0,
) -> list[Path]:
    """Split the rows into shards ``<prefix>-00000.parquet``, ... of ``rows_per_shard`` rows under ``out_dir``.

    ``start_index`` numbers the first shard (for writing a large set chunk by chunk). Returns the paths.
    """
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(volumes)
    paths = []
    for k, start in enumerate(range(0, n, rows_per_shard)):
        rows = slice(start, min(start + rows_per_shard, n))
        part_truth = {key: np.asarray(v)[rows] for key, v in truth.items()} if truth else None
        paths.append(write_shard(
            out / f"{prefix}-{start_index + k:05d}.parquet", np.asarray(ids)[rows], volumes[rows],
            _take(voxel_size_angstrom, rows), _take(tilt_range_degrees, rows), _take(sources, rows),
            truth=part_truth, image_names=_take(image_names, rows),
        ))
    return paths


def volume_column(column: pa.ChunkedArray | pa.Array, shape: Sequence[int] | None = None) -> np.ndarray:
    """A ``volume`` column -> float32 ``(n, d, h, w)``.

    The raw layout (``fixed_size_binary``, needs ``shape`` from :func:`volume_shape`) is a zero-copy
    view when the column is one chunk (``.copy()`` it to write into it); several chunks are concatenated.
    The earlier ``fixed_shape_tensor`` layout and Ray's tensor types are decoded as before.
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = []
    for chunk in chunks:
        if pa.types.is_fixed_size_binary(chunk.type):
            if shape is None:
                raise ValueError("a raw-bytes volume column needs its shape (the `jimray.volume` schema metadata)")
            parts.append(volumes_from_binary(chunk, shape))
        elif isinstance(chunk, pa.FixedShapeTensorArray):
            parts.append(chunk.to_numpy_ndarray())
        elif hasattr(chunk, "to_numpy"):
            parts.append(np.asarray(chunk.to_numpy(zero_copy_only=False)))
    if not parts:
        raise ValueError("empty volume column")
    if len(parts) == 1:
        return parts[0].astype(np.float32, copy=False)
    return np.concatenate(parts).astype(np.float32, copy=False)


def read_shard(path: str | Path, columns: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Read a shard into numpy: ``volume`` float32 ``(n, d, h, w)``, other columns ``(n,)`` (strings as object).

    ``volume`` of the raw layout is a read-only view of the Arrow buffer (no decode beyond reading the bytes).
    Shards of the earlier ``fixed_shape_tensor`` layout still read; any other ``volume`` type raises
    ``ValueError`` with :data:`REWRITE_HINT`.
    """
    path = Path(path)
    try:
        table = pq.read_table(path, columns=list(columns) if columns is not None else None)
    except (OSError, pa.ArrowException) as exc:
        raise ValueError(f"{path}: unreadable Parquet shard ({exc})") from exc
    out: dict[str, np.ndarray] = {}
    for name in table.column_names:
        column = table.column(name)
        if name == "volume":
            shape, _ = volume_shape(table.schema, path)
            out[name] = volume_column(column, shape)
        else:
            out[name] = column.to_numpy()
    return out


def list_shards(directory: str | Path) -> list[Path]:
    """The ``*.parquet`` files of a folder, sorted by name (temp files of interrupted writes are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: not a folder of Parquet shards")
    return sorted(p for p in directory.glob("*.parquet") if p.is_file())
