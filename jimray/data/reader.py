"""Reading subtomograms as a streaming Ray Dataset (orchestration layer).

:func:`read_subtomograms` accepts a folder of Parquet shards (:mod:`jimray.io.shards`), one ``.parquet`` file,
a RELION STAR file or a folder of ``.mrc`` / ``.mrcs`` files. Every output row has

* ``id`` int64 (unique: the shard ids, the STAR row order 0..n-1, or the sorted file order),
* ``volume`` float32 ``(d, h, w)``, ``tilt_range_degrees`` float32, ``voxel_size_angstrom`` float32,
* the ground-truth columns of :data:`jimray.io.shards.TRUTH_COLUMNS` and ``image_name`` (string) when present.

Nothing is materialised whole: Parquet is streamed by ``ray.data.read_parquet`` (one block per shard; the raw
``volume`` bytes of :mod:`jimray.io.shards` become a tensor column without a copy, :func:`decode_volume_bytes`,
fused with the read; shards of the earlier ``fixed_shape_tensor`` layout are read as they are, and a folder
that mixes both layouts is refused with a message to re-run ``jimray ingest``); for STAR / MRC input a small
table of ``(id, file spec)`` rows is built with ``ray.data.from_items`` and the volumes are decoded in a
``map_batches`` step. Normalisation (zero mean, unit standard deviation per subtomogram) is another
``map_batches`` step, :func:`normalize_batch`.

Ray 2.60 traps.

1. Parquet is read with the V1 datasource (``DataContext.use_datasource_v2 = False`` for the duration of the
   ``read_parquet`` call): the default V2 datasource starts a pool of footer-reader actors on every pass over
   the data, which cost 10-20 s per pass on a busy 2-CPU machine against ~1-3 s for V1 (2000 32^3 volumes,
   measured while writing ``jimray bench io``).
2. ``read_parquet`` gets one path (the folder or the file), never a list of files: a list is resolved by
   several threads, which race on fsspec's failing HTTP import when ``aiohttp`` is not installed
   (``ImportError: cannot import name 'HTTPFileSystem'``). Other callers of ``read_parquet`` should do the same.

Torch: ``iter_torch_batches(dtypes=...)`` needs a dtype for *every* column and cannot convert strings. Use
``ds.select_columns(numeric_columns(ds))`` (or drop ``image_name``) and ``dtypes=torch_batch_dtypes(...)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jimray.errors import DataError
from jimray.io.shards import REWRITE_HINT, TRUTH_COLUMNS, binary_to_tensor, volume_shape

__all__ = [
    "DEFAULT_TILT_RANGE_DEGREES",
    "STRING_COLUMNS",
    "read_subtomograms",
    "is_parquet_input",
    "normalize_batch",
    "decode_batch",
    "decode_volume_bytes",
    "numeric_columns",
    "torch_batch_dtypes",
]

DEFAULT_TILT_RANGE_DEGREES = 60.0
STRING_COLUMNS = ("image_name", "source", "tilt_axis", "spec")
BASE_COLUMNS = ("id", "volume", "tilt_range_degrees", "voxel_size_angstrom")
INTEGER_COLUMNS = ("id", "true_class")


def normalize_batch(batch: dict) -> dict:
    """Zero mean, unit standard deviation per subtomogram of ``batch["volume"]`` ``(b, d, h, w)``.

    A constant volume becomes all zeros (its standard deviation is floored at 1e-6). Other columns pass through.
    """
    volume = np.asarray(batch["volume"], dtype=np.float32)
    if volume.ndim != 4:
        raise ValueError(f"normalize_batch needs volume of shape (b, d, h, w), got {volume.shape}")
    axes = (1, 2, 3)
    mean = volume.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = volume.std(axis=axes, keepdims=True, dtype=np.float64)
    out = dict(batch)
    out["volume"] = ((volume - mean) / np.maximum(std, 1e-6)).astype(np.float32)
    return out


def decode_batch(batch: dict, *, box_size: int, voxel_size_angstrom: float, tilt_range_degrees: float) -> dict:
    """Read the volumes named by ``batch["spec"]`` (file or ``n@stack``); every one must be ``box_size``^3 with
    finite, non-constant values (the streaming half of :mod:`jimray.io.validate`: a volume the up-front sample did
    not read fails here, naming its file and id)."""
    from jimray.io.mrc import read_volume
    from jimray.io.validate import value_problem

    volumes = np.empty((len(batch["spec"]), box_size, box_size, box_size), dtype=np.float32)
    for i, spec in enumerate(batch["spec"]):
        volume, _ = read_volume(str(spec))
        if volume.shape != (box_size,) * 3:
            raise DataError(
                f"{spec} (id {int(batch['id'][i])}): box {volume.shape} differs from the expected {(box_size,) * 3}; "
                "run `jimray ingest --skip-bad` to find and skip bad files"
            )
        reason = value_problem(volume)
        if reason is not None:
            raise DataError(f"{spec} (id {int(batch['id'][i])}): {reason}; re-extract or replace it, or leave it out "
                            "with --skip-bad")
        volumes[i] = volume
    n = len(volumes)
    return {
        "id": np.asarray(batch["id"], dtype=np.int64),
        "volume": volumes,
        "tilt_range_degrees": np.full(n, tilt_range_degrees, dtype=np.float32),
        "voxel_size_angstrom": np.full(n, voxel_size_angstrom, dtype=np.float32),
        "image_name": np.asarray(batch["image_name"], dtype=object),
    }


def _set_column(batch: dict, name: str, value: float) -> dict:
    out = dict(batch)
    out[name] = np.full(len(batch["id"]), value, dtype=np.float32)
    return out


def _parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.glob("*.parquet") if p.is_file())
    if not files:
        raise DataError(f"{path}: no .parquet shards in this folder")
    return files


def _check_parquet_schema(files: list[Path], box_size: int | None) -> list[str]:
    """Validate the volume shape of every shard from the Parquet metadata; returns the columns to read."""
    return _parquet_layout(files, box_size)[0]


def _parquet_layout(files: list[Path], box_size: int | None) -> tuple[list[str], tuple[int, int, int], str]:
    """(columns to read, volume shape, layout ``"raw"`` / ``"tensor"``) of the shards, all checked from the
    Parquet footers (:func:`jimray.io.shards.volume_shape`)."""
    shapes = {}
    layouts = {}
    names: list[str] = []
    for f in files:
        try:
            schema = pq.read_schema(f)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{f}: unreadable Parquet shard ({exc}); rewrite it with `jimray ingest`") from exc
        missing = [c for c in BASE_COLUMNS if c not in schema.names]
        if missing:
            raise DataError(f"{f}: not a jimray shard (missing columns {missing}); convert data with `jimray ingest`")
        try:
            shapes[f], layouts[f] = volume_shape(schema, f)
        except ValueError as exc:
            raise DataError(str(exc)) from exc
        names = schema.names
    distinct = set(shapes.values())
    if len(distinct) > 1:
        raise DataError(f"{files[0].parent}: shards hold different box sizes {sorted(distinct)}; keep one box size "
                        "per data set")
    if len(set(layouts.values())) > 1:
        old = next(f for f, layout in layouts.items() if layout == "tensor")
        raise DataError(f"{files[0].parent}: mixes shards of this version with shards of the earlier volume layout "
                        f"(e.g. {old.name}); {REWRITE_HINT}")
    shape = distinct.pop()
    if box_size is not None and shape != (box_size,) * 3:
        raise DataError(f"{files[0]}: volumes are {shape}, expected box size {box_size}; for `jimray train` pass "
                        f"--set data.box_size={shape[0]}")
    columns = [c for c in names if c in BASE_COLUMNS or c in TRUTH_COLUMNS or c == "image_name"]
    return columns, shape, layouts[files[0]]


def decode_volume_bytes(table: pa.Table, shape: tuple[int, int, int]) -> pa.Table:
    """A ``pyarrow`` batch with ``volume`` as raw bytes (:mod:`jimray.io.shards`) -> the same batch with ``volume``
    as a canonical ``fixed_shape_tensor`` over the same buffers (no copy; Ray Data hands it out as ndarrays)."""
    index = table.schema.get_field_index("volume")
    column = table.column(index)
    if not pa.types.is_fixed_size_binary(column.type):
        return table
    chunks = [binary_to_tensor(chunk, shape) for chunk in column.chunks]
    tensor = pa.chunked_array(chunks, type=pa.fixed_shape_tensor(pa.float32(), tuple(shape)))
    return table.set_column(index, "volume", tensor)


def _read_parquet(path: Path, box_size, voxel_size_angstrom, tilt_range_degrees, override_num_blocks):
    import ray

    files = _parquet_files(path)
    columns, shape, layout = _parquet_layout(files, box_size)
    # One path (the folder or the file), never a list: Ray 2.60 resolves a list of paths in threads, and with
    # fsspec installed but aiohttp missing those threads race on a failing import (ImportError on the driver).
    # The V1 Parquet datasource: V2 starts footer-reader actors on every pass (10-20 s on a busy 2-CPU machine).
    context = ray.data.DataContext.get_current()
    previous = context.use_datasource_v2
    context.use_datasource_v2 = False
    try:
        # One block per shard unless told otherwise: with Ray's default (>= 200 blocks) every read task splits its
        # shard into small blocks, which prevents fusing the decode below with the read and makes iter_batches
        # concatenate small blocks back into batches (two copies per volume).
        # At least 16 blocks, so that a set in few shards still reaches every training worker (a worker
        # without rows would train a different number of steps than the others).
        blocks = override_num_blocks if override_num_blocks is not None else max(len(files), 16)
        ds = ray.data.read_parquet(str(path), columns=columns, override_num_blocks=blocks,
                                   file_extensions=["parquet"])
    finally:
        context.use_datasource_v2 = previous
    if layout == "raw":
        # One whole block per call, zero-copy: fused with the read task, so the object store gets tensor blocks.
        ds = ds.map_batches(decode_volume_bytes, fn_args=(shape,), batch_format="pyarrow", batch_size=None,
                            zero_copy_batch=True, udf_modifying_row_count=False)
    if tilt_range_degrees is not None:
        ds = ds.map_batches(_set_column, fn_args=("tilt_range_degrees", float(tilt_range_degrees)),
                            batch_format="numpy", udf_modifying_row_count=False)
    if voxel_size_angstrom is not None:
        ds = ds.map_batches(_set_column, fn_args=("voxel_size_angstrom", float(voxel_size_angstrom)),
                            batch_format="numpy", udf_modifying_row_count=False)
    return ds


def _read_files(path: Path, box_size, voxel_size_angstrom, tilt_range_degrees, override_num_blocks, skip):
    import ray

    from jimray.io.mrc import read_header
    from jimray.io.validate import list_volume_files

    specs, names, star_voxel = list_volume_files(path)
    voxel = voxel_size_angstrom if voxel_size_angstrom is not None else star_voxel
    items = [{"id": i, "spec": s, "image_name": n} for i, (s, n) in enumerate(zip(specs, names, strict=True))
             if s not in skip]  # ids: the input order, skipped rows left out (like `jimray ingest --skip-bad`)
    if not items:
        raise DataError(f"{path}: holds no usable particles")
    first = items[0]["spec"]
    shape, header_voxel = read_header(first)
    if len(set(shape)) != 1 or len(shape) != 3:
        raise DataError(f"{first}: volume shape {shape} is not a cubic box")
    if box_size is not None and shape[0] != box_size:
        raise DataError(f"{first}: box size {shape[0]}, expected {box_size}; for `jimray train` pass "
                        f"--set data.box_size={shape[0]}")
    voxel = voxel if voxel is not None else header_voxel
    if voxel is None:
        raise DataError(f"{path}: no voxel size in the STAR file or MRC header; pass --voxel-size (for `jimray "
                        "train`: --set data.voxel_size_angstrom=VOXEL)")
    ds = ray.data.from_items(items, override_num_blocks=override_num_blocks)
    tilt = DEFAULT_TILT_RANGE_DEGREES if tilt_range_degrees is None else float(tilt_range_degrees)
    return ds.map_batches(
        decode_batch, batch_size=32, batch_format="numpy", udf_modifying_row_count=False,
        fn_kwargs={"box_size": shape[0], "voxel_size_angstrom": float(voxel), "tilt_range_degrees": tilt},
    )


def read_subtomograms(
    path: str | Path,
    *,
    box_size: int | None = None,
    voxel_size_angstrom: float | None = None,
    tilt_range_degrees: float | None = None,
    normalize: bool = True,
    override_num_blocks: int | None = None,
    skip: set[str] | frozenset[str] = frozenset(),
):
    """Subtomograms as a streaming ``ray.data.Dataset`` (rows described in the module docstring).

    ``path``: a folder of Parquet shards, one ``.parquet``, a RELION STAR file or a folder of MRC files.
    ``box_size``: expected edge length (error if the data differ). ``voxel_size_angstrom`` /
    ``tilt_range_degrees``: override the stored values (STAR / MRC input: the voxel size defaults to the STAR
    optics block, else the MRC header; the tilt range to 60 degrees). ``normalize``: standardise each volume.
    ``skip``: STAR / MRC input: the specs to leave out (the bad volumes found by :mod:`jimray.io.validate`).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; pass Parquet shards, a STAR file or a folder of MRC files")
    if tilt_range_degrees is not None and not 0 <= float(tilt_range_degrees) <= 90:
        raise DataError(f"the tilt range must lie in [0, 90] degrees, got {tilt_range_degrees}")
    if voxel_size_angstrom is not None and not float(voxel_size_angstrom) > 0:
        raise DataError(f"the voxel size must be positive, got {voxel_size_angstrom}")
    if is_parquet_input(path):
        ds = _read_parquet(path, box_size, voxel_size_angstrom, tilt_range_degrees, override_num_blocks)
    elif path.suffix == ".star" or path.is_dir():
        ds = _read_files(path, box_size, voxel_size_angstrom, tilt_range_degrees, override_num_blocks, set(skip))
    else:
        raise DataError(f"{path}: unknown input; pass a folder of .parquet shards, a .parquet, a .star, an MRC folder")
    if normalize:
        ds = ds.map_batches(normalize_batch, batch_format="numpy", udf_modifying_row_count=False)
    return ds


def is_parquet_input(path: str | Path) -> bool:
    """Whether ``path`` is one ``.parquet`` or a folder of them (else a STAR file or an MRC folder)."""
    path = Path(path)
    return path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet")))


def _column_names_and_types(schema_or_columns) -> list[tuple[str, object]]:
    if hasattr(schema_or_columns, "names") and hasattr(schema_or_columns, "types"):
        return list(zip(schema_or_columns.names, schema_or_columns.types, strict=True))
    return [(str(name), None) for name in schema_or_columns]


def _is_string(name: str, dtype) -> bool:
    if dtype is None:
        return name in STRING_COLUMNS
    return isinstance(dtype, pa.DataType) and (pa.types.is_string(dtype) or pa.types.is_large_string(dtype))


def numeric_columns(ds_or_schema) -> list[str]:
    """Column names of a Dataset (or its schema / a list of names) that torch can batch: all but strings.

    Use ``ds.select_columns(numeric_columns(ds))`` before ``iter_torch_batches``. (For a Dataset this may run
    the first block to learn the schema.)
    """
    is_dataset = hasattr(ds_or_schema, "schema") and callable(ds_or_schema.schema)
    schema = ds_or_schema.schema() if is_dataset else ds_or_schema
    return [name for name, dtype in _column_names_and_types(schema) if not _is_string(name, dtype)]


def torch_batch_dtypes(schema_or_columns) -> dict:
    """The ``dtypes`` dict for ``iter_torch_batches``, naming every column: ``id`` and ``true_class`` -> int64,
    everything else -> float32. Raises if a string column is present (drop it, see :func:`numeric_columns`)."""
    import torch

    dtypes = {}
    for name, dtype in _column_names_and_types(schema_or_columns):
        if _is_string(name, dtype):
            raise ValueError(f"column '{name}' holds strings, which torch cannot batch; "
                             "use ds.select_columns(numeric_columns(ds)) first")
        dtypes[name] = torch.int64 if name in INTEGER_COLUMNS else torch.float32
    return dtypes
