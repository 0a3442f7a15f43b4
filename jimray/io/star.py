"""RELION STAR particle files (3.1+ style, with an optics block), built on the ``starfile`` package.

Poses follow :mod:`jimray.conventions`: ``rlnAngleRot/Tilt/Psi`` are RELION ZYZ Euler angles (degrees) and
``rlnOriginX/Y/ZAngst = -t * voxel size`` for the internal shift ``t`` (voxels, x y z). Older files with
``rlnOriginX/Y/Z`` (pixels) are read too. Image names are RELION's: a path or ``"n@stack.mrcs"`` (1-based),
relative paths being relative to the STAR file's folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from jimray.conventions import (
    euler_to_matrix,
    matrix_to_euler,
    origin_angstrom_to_shift,
    shift_to_origin_angstrom,
)
from jimray.errors import JimrayError
from jimray.io.mrc import split_image_name

__all__ = [
    "StarError",
    "ParticleTable",
    "read_particles",
    "write_particles",
    "poses_from_particles",
    "pose_columns",
    "resolve_image_path",
    "image_specs",
    "relative_image_names",
]

ANGLE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
ORIGIN_ANGSTROM_COLUMNS = ("rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst")
ORIGIN_PIXEL_COLUMNS = ("rlnOriginX", "rlnOriginY", "rlnOriginZ")
PIXEL_SIZE_COLUMNS = ("rlnImagePixelSize", "rlnPixelSize")


class StarError(JimrayError):
    """A STAR file that cannot be used; the message names the file and the fix."""


@dataclass
class ParticleTable:
    """The particles of a STAR file: the ``particles`` block, the ``optics`` block (or ``None`` for RELION < 3.1)
    and the voxel size in Angstrom (``None`` if the file does not give one)."""

    particles: pd.DataFrame
    optics: pd.DataFrame | None
    voxel_size_angstrom: float | None


def _pixel_size_from(df: pd.DataFrame | None) -> float | None:
    if df is None or len(df) == 0:
        return None
    for column in PIXEL_SIZE_COLUMNS:
        if column in df.columns:
            values = np.unique(pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=float))
            values = values[np.isfinite(values) & (values > 0)]
            if len(values) > 1:
                raise StarError(f"several pixel sizes in {column} ({values.tolist()}); jimray needs one voxel size")
            if len(values) == 1:
                return float(values[0])
    if {"rlnDetectorPixelSize", "rlnMagnification"} <= set(df.columns):
        sizes = np.unique(df["rlnDetectorPixelSize"].to_numpy(float) * 1e4 / df["rlnMagnification"].to_numpy(float))
        if len(sizes) == 1 and np.isfinite(sizes[0]) and sizes[0] > 0:
            return float(sizes[0])
    return None


def _particles_block(blocks: dict, path: Path) -> pd.DataFrame:
    if isinstance(blocks.get("particles"), pd.DataFrame):
        return blocks["particles"]
    frames = {name: b for name, b in blocks.items() if isinstance(b, pd.DataFrame) and name != "optics"}
    with_images = [b for b in frames.values() if "rlnImageName" in b.columns]
    if len(with_images) == 1:
        return with_images[0]
    if len(frames) == 1:
        return next(iter(frames.values()))
    names = ", ".join(f"data_{n}" for n in blocks) or "none"
    raise StarError(f"{path}: no particles block (data_particles) found; blocks present: {names}")


def read_particles(path: str | Path) -> ParticleTable:
    """Read a RELION particle STAR file into a :class:`ParticleTable`.

    The voxel size comes from ``rlnImagePixelSize`` / ``rlnPixelSize`` of the optics block (RELION 3.1+) or
    of the particles block. Raises :class:`StarError` (naming the file) if it is missing, unreadable or has no
    particles block.
    """
    path = Path(path)
    if not path.is_file():
        raise StarError(f"{path}: STAR file not found")
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:
        raise StarError(f"{path}: unreadable STAR file ({exc})") from exc
    particles = _particles_block(blocks, path).reset_index(drop=True)
    optics = blocks.get("optics") if isinstance(blocks.get("optics"), pd.DataFrame) else None
    try:
        voxel = _pixel_size_from(optics)
        if voxel is None:
            voxel = _pixel_size_from(particles)
    except StarError as exc:
        raise StarError(f"{path}: {exc}") from exc
    return ParticleTable(particles=particles, optics=optics, voxel_size_angstrom=voxel)


def _box_size_of_first_image(particles: pd.DataFrame, star_path: Path) -> int | None:
    if "rlnImageName" not in particles.columns or len(particles) == 0:
        return None
    from jimray.io.mrc import MRCError, read_header

    try:
        shape, _ = read_header(resolve_image_path(str(particles["rlnImageName"].iloc[0]), star_path))
    except MRCError:
        return None
    return int(shape[-1])


def write_particles(
    path: str | Path,
    particles: pd.DataFrame,
    voxel_size_angstrom: float,
    optics_group_name: str = "opticsGroup1",
    *,
    box_size: int | None = None,
) -> None:
    """Write a RELION 3.1+ STAR file (``data_optics`` + ``data_particles``) atomically.

    One optics group: ``rlnOpticsGroup = 1``, ``rlnOpticsGroupName``, ``rlnImagePixelSize``,
    ``rlnImageSize`` (``box_size``; if ``None`` read from the first image's header when it exists, else left
    out) and ``rlnImageDimensionality = 3``. Every particle gets ``rlnOpticsGroup = 1``.
    """
    path = Path(path)
    voxel = float(voxel_size_angstrom)
    if not np.isfinite(voxel) or voxel <= 0:
        raise ValueError(f"voxel size must be a positive number of Angstrom, got {voxel_size_angstrom}")
    if not isinstance(particles, pd.DataFrame):
        raise TypeError(f"particles must be a pandas DataFrame, got {type(particles).__name__}")
    if box_size is None:
        box_size = _box_size_of_first_image(particles, path)
    optics = {"rlnOpticsGroup": [1], "rlnOpticsGroupName": [optics_group_name], "rlnImagePixelSize": [voxel]}
    if box_size is not None:
        optics["rlnImageSize"] = [int(box_size)]
    optics["rlnImageDimensionality"] = [3]
    table = particles.reset_index(drop=True).copy()
    table["rlnOpticsGroup"] = 1
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        starfile.write({"optics": pd.DataFrame(optics), "particles": table}, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def poses_from_particles(df: pd.DataFrame, voxel_size_angstrom: float) -> tuple[np.ndarray, np.ndarray]:
    """RELION pose columns -> ``(rotations (n, 3, 3), shifts_voxels (n, 3))`` in the conventions of
    :mod:`jimray.conventions`. Missing angles give identity, missing origins zero shift. Uses
    ``rlnOriginX/Y/ZAngst`` (Angstrom) or else the older ``rlnOriginX/Y/Z`` (pixels)."""
    n = len(df)
    angles = np.zeros((n, 3))
    for i, column in enumerate(ANGLE_COLUMNS):
        if column in df.columns:
            angles[:, i] = df[column].to_numpy(dtype=np.float64)
    shifts = np.zeros((n, 3))
    for i, (col_a, col_px) in enumerate(zip(ORIGIN_ANGSTROM_COLUMNS, ORIGIN_PIXEL_COLUMNS, strict=True)):
        if col_a in df.columns:
            shifts[:, i] = origin_angstrom_to_shift(df[col_a].to_numpy(dtype=np.float64), voxel_size_angstrom)
        elif col_px in df.columns:
            shifts[:, i] = -df[col_px].to_numpy(dtype=np.float64)
    if not (np.isfinite(angles).all() and np.isfinite(shifts).all()):
        raise ValueError("pose columns contain non-finite values (NaN/Inf)")
    rotations = euler_to_matrix(angles) if n else np.zeros((0, 3, 3))
    return rotations, shifts


def pose_columns(rotations: np.ndarray, shifts_voxels: np.ndarray, voxel_size_angstrom: float) -> dict[str, np.ndarray]:
    """Poses ``(rotations (n, 3, 3), shifts_voxels (n, 3))`` -> RELION columns ``rlnAngleRot/Tilt/Psi`` (degrees)
    and ``rlnOriginX/Y/ZAngst`` (Angstrom), each an ``(n,)`` array."""
    rotations = np.asarray(rotations, dtype=np.float64)
    shifts = np.asarray(shifts_voxels, dtype=np.float64)
    if rotations.ndim != 3 or rotations.shape[1:] != (3, 3):
        raise ValueError(f"rotations must have shape (n, 3, 3), got {rotations.shape}")
    if shifts.shape != (len(rotations), 3):
        raise ValueError(f"shifts_voxels must have shape ({len(rotations)}, 3), got {shifts.shape}")
    angles = matrix_to_euler(rotations) if len(rotations) else np.zeros((0, 3))
    origins = shift_to_origin_angstrom(shifts, voxel_size_angstrom)
    columns = {name: angles[:, i] for i, name in enumerate(ANGLE_COLUMNS)}
    columns.update({name: origins[:, i] for i, name in enumerate(ORIGIN_ANGSTROM_COLUMNS)})
    return columns


def resolve_image_path(image_name: str, star_path: str | Path) -> str:
    """RELION ``rlnImageName`` -> a path (or ``"n@path"``) usable from anywhere: relative paths are taken
    relative to the STAR file's folder; the ``n@`` stack index is kept."""
    prefix, file_part = split_image_name(str(image_name).strip())
    file_path = Path(file_part)
    if not file_path.is_absolute():
        file_path = Path(star_path).resolve().parent / file_path
    return f"{prefix}{file_path}"


def relative_image_names(specs: list[str], out_dir: str | Path) -> list[str]:
    """Resolved specs (:func:`image_specs`) -> ``rlnImageName`` values relative to ``out_dir``, for a STAR written
    there: it then reads from where it is, wherever the folders are moved together."""
    base = Path(out_dir).resolve()
    names = []
    for spec in specs:
        prefix, file_part = split_image_name(spec)
        names.append(f"{prefix}{os.path.relpath(Path(file_part).resolve(), base)}")
    return names


def image_specs(particles: pd.DataFrame, star_path: str | Path) -> list[str]:
    """Resolved ``rlnImageName`` of every particle (see :func:`resolve_image_path`)."""
    if "rlnImageName" not in particles.columns:
        raise StarError(f"{star_path}: the particles block has no rlnImageName column (no subtomogram files)")
    return [resolve_image_path(name, star_path) for name in particles["rlnImageName"]]
