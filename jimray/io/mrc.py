"""MRC volumes: read, write (atomically), check. Edge layer (files), built on ``mrcfile``.

* A volume is float32 ``(z, y, x)``; the voxel size is in Angstrom (``None`` where the header says 0).
* A *spec* ``"n@file.mrcs"`` addresses the ``n``-th (1-based, RELION style) volume of a stack of 3D volumes.
  :func:`write_stack` writes such stacks as 4-D MRC data ``(n, z, y, x)`` (``ispg = 401``), which ``mrcfile``
  reads back as a 4-D array. A stack stored as a 3-D "image stack" of cubic volumes (``nz = n * nx``, as some
  tools write) is also understood when ``nx == ny`` and ``nz`` is a multiple of ``nx``.
* A truncated or corrupt file raises :class:`MRCError` (a ``ValueError``) whose message names the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import mrcfile
import numpy as np

from jimray.errors import JimrayError

__all__ = [
    "MRCError",
    "parse_spec",
    "split_image_name",
    "read_volume",
    "read_header",
    "write_volume",
    "write_stack",
    "validate_volume_file",
]


class MRCError(JimrayError):
    """An MRC file that cannot be used; ``str(err)`` names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def split_image_name(name: str | Path) -> tuple[str, str]:
    """The one parser of RELION image names: ``"n@file.mrcs"`` -> ``("n@", "file.mrcs")`` (the stack prefix as
    written), a plain path -> ``("", path)``. An ``@`` not preceded by digits only is part of the file name."""
    text = str(name)
    head, sep, tail = text.partition("@")
    return (f"{head}@", tail) if sep and head.strip().isdigit() else ("", text)


def parse_spec(path_or_spec: str | Path) -> tuple[Path, int | None]:
    """``"n@file.mrcs"`` -> ``(Path("file.mrcs"), n)`` (1-based); a plain path -> ``(path, None)``."""
    prefix, file_part = split_image_name(path_or_spec)
    if prefix:
        index = int(prefix[:-1])
        if index < 1:
            raise MRCError(file_part, f"stack index must be >= 1 (RELION 'n@file' is 1-based), got {index}")
        return Path(file_part), index
    return Path(file_part), None


def _voxel_size(mrc) -> float | None:
    size = float(mrc.voxel_size.x)
    return size if size > 0 else None


def _expected_data_bytes(header) -> int:
    mode = int(header.mode)
    itemsize = {0: 1, 1: 2, 2: 4, 6: 2, 12: 2, 3: 4, 4: 8}.get(mode)
    if itemsize is None:
        raise ValueError(f"unsupported MRC data mode {mode}")
    return int(header.nx) * int(header.ny) * int(header.nz) * itemsize


def _open(path: Path, header_only: bool = False):
    """Open strictly; translate every failure into :class:`MRCError` naming ``path``."""
    if not path.exists():
        raise MRCError(path, "file not found")
    if not path.is_file():
        raise MRCError(path, "not a regular file")
    try:
        if header_only:
            return mrcfile.open(path, mode="r", header_only=True)
        return mrcfile.mmap(path, mode="r")
    except MRCError:
        raise
    except Exception as exc:  # mrcfile raises ValueError/OSError/RuntimeWarning for bad files
        raise MRCError(path, f"unreadable MRC ({exc}); check that the file is complete and is an MRC file") from exc


def _volume_view(path: Path, data: np.ndarray, index: int | None) -> np.ndarray:
    """The (z, y, x) volume addressed by ``index`` (1-based) in ``data`` (3-D or 4-D)."""
    if data.ndim == 4:
        if index is None:
            if data.shape[0] != 1:
                raise MRCError(path, f"holds a stack of {data.shape[0]} volumes; address one as 'n@{path}'")
            return data[0]
        if index > data.shape[0]:
            raise MRCError(path, f"stack index {index} out of range (stack holds {data.shape[0]} volumes)")
        return data[index - 1]
    if data.ndim == 3:
        if index is None:
            return data
        nz, ny, nx = data.shape
        if nx == ny and nz % nx == 0:
            count = nz // nx
            if index > count:
                raise MRCError(path, f"stack index {index} out of range (stack holds {count} cubic volumes)")
            return data[(index - 1) * nx : index * nx]
        if index == 1:
            return data
        raise MRCError(path, f"cannot address volume {index} in 3-D data of shape {data.shape}")
    raise MRCError(path, f"expected a 3-D volume, got data of shape {data.shape}")


def read_volume(path_or_spec: str | Path) -> tuple[np.ndarray, float | None]:
    """Read one volume: ``(volume (z, y, x) float32, voxel size in Angstrom or None)``.

    ``path_or_spec`` is a file or ``"n@stack.mrcs"`` (1-based). Raises :class:`MRCError` for a missing,
    truncated or corrupt file, or a bad index.
    """
    path, index = parse_spec(path_or_spec)
    mrc = _open(path)
    try:
        data = mrc.data
        if data is None:
            raise MRCError(path, "header present but no data (truncated file?)")
        volume = np.array(_volume_view(path, data, index), dtype=np.float32, copy=True)
        return volume, _voxel_size(mrc)
    finally:
        mrc.close()


def read_header(path_or_spec: str | Path) -> tuple[tuple[int, ...], float | None]:
    """Cheap look at the header: ``(shape, voxel size in Angstrom or None)``; reads no data.

    For a spec ``"n@file"`` or a file holding one volume the shape is the volume's ``(z, y, x)``; for a plain
    path to a stack it is the stack's ``(n, z, y, x)``.
    """
    path, index = parse_spec(path_or_spec)
    mrc = _open(path, header_only=True)
    try:
        h = mrc.header
        nx, ny, nz, mz = int(h.nx), int(h.ny), int(h.nz), int(h.mz)
        is_volume_stack = int(h.ispg) >= 401 and mz > 0 and nz % mz == 0 and nz // mz > 1
        if is_volume_stack:
            count, shape3 = nz // mz, (mz, ny, nx)
        elif index is not None and index > 1 and nx == ny and nz % nx == 0:
            count, shape3 = nz // nx, (nx, ny, nx)
        else:
            count, shape3 = 1, (nz, ny, nx)
        if index is not None and index > count:
            raise MRCError(path, f"stack index {index} out of range (stack holds {count} volumes)")
        shape = shape3 if (index is not None or count == 1) else (count, *shape3)
        return shape, _voxel_size(mrc)
    finally:
        mrc.close()


def validate_volume_file(path_or_spec: str | Path, check_values: bool = True) -> str | None:
    """Why the volume cannot be used, or ``None`` if it is fine.

    Checks: the header is readable, the file holds as many data bytes as the header promises, the addressed
    volume exists and (``check_values``) holds only finite values.
    """
    try:
        path, index = parse_spec(path_or_spec)
        mrc = _open(path, header_only=True)
        try:
            expected = 1024 + int(mrc.header.nsymbt) + _expected_data_bytes(mrc.header)
        finally:
            mrc.close()
        actual = path.stat().st_size
        if actual < expected:
            return f"truncated: {actual} bytes on disk, header promises {expected}"
        read_header(path_or_spec)
        if check_values:
            volume, _ = read_volume(path_or_spec)
            if not np.isfinite(volume).all():
                bad = int((~np.isfinite(volume)).sum())
                return f"{bad} non-finite values (NaN/Inf) in the volume"
    except MRCError as exc:
        return exc.reason
    except ValueError as exc:
        return str(exc)
    return None


def _check_voxel_size(voxel_size_angstrom: float | None) -> float:
    if voxel_size_angstrom is None:
        return 0.0
    value = float(voxel_size_angstrom)
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"voxel size must be a finite non-negative number of Angstrom, got {voxel_size_angstrom}")
    return value


def _atomic_new(path: str | Path, data: np.ndarray, voxel_size: float) -> None:
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(data)
            mrc.voxel_size = voxel_size
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_volume(path: str | Path, volume: np.ndarray, voxel_size_angstrom: float | None) -> None:
    """Write one float32 volume ``(z, y, x)`` with its voxel size (Angstrom) atomically (temp file, rename)."""
    data = np.ascontiguousarray(volume, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"write_volume needs a (z, y, x) volume, got shape {data.shape}")
    _atomic_new(path, data, _check_voxel_size(voxel_size_angstrom))


def write_stack(path: str | Path, volumes: np.ndarray, voxel_size_angstrom: float | None) -> None:
    """Write a stack of volumes ``(n, z, y, x)`` as 4-D MRC data (readable as ``"k@path"``, 1-based), atomically."""
    data = np.ascontiguousarray(volumes, dtype=np.float32)
    if data.ndim != 4 or data.shape[0] < 1:
        raise ValueError(f"write_stack needs volumes of shape (n, z, y, x) with n >= 1, got {data.shape}")
    _atomic_new(path, data, _check_voxel_size(voxel_size_angstrom))
