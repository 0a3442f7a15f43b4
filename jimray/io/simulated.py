"""Simulated data sets on disk, and the one-call simulation the CLI and the training code use.

A data set written by :func:`write_simulated_dataset` is a folder::

    particles.star          RELION 3.1+ STAR: rlnImageName, rlnClassNumber (1-based, ground truth),
                            rlnAngleRot/Tilt/Psi, rlnOriginX/Y/ZAngst (ground-truth pose, RELION convention)
    subtomograms/*.mrc      one MRC per subtomogram, <class name>_<id:06d>.mrc
    shards/*.parquet        the same volumes and truth in jimray's shard format (jimray.io.shards)
    simulation.json         class names and the simulation parameters
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from jimray.io.mrc import write_volume
from jimray.io.shards import write_shards
from jimray.io.star import pose_columns, write_particles
from jimray.io.structures import parse_structure_spec, read_atoms, structure_name
from jimray.simulate.density import atoms_to_density
from jimray.simulate.embedded import DEFAULT_BOX_SIZE, DEFAULT_VOXEL_SIZE_ANGSTROM, embedded_maps
from jimray.simulate.subtomogram import (
    DEFAULT_MAX_SHIFT_VOXELS,
    CTFParams,
    SimulatedSet,
    check_simulation_args,
    simulate_subtomograms,
)

SUBTOMOGRAM_FOLDER = "subtomograms"
SHARD_FOLDER = "shards"
STAR_NAME = "particles.star"
METADATA_NAME = "simulation.json"


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


def structure_maps(
    structures: Sequence[str | Path] | None,
    voxel_size_angstrom: float = DEFAULT_VOXEL_SIZE_ANGSTROM,
    box_size: int = DEFAULT_BOX_SIZE,
    resolution_angstrom: float | None = None,
) -> dict[str, torch.Tensor]:
    """Density maps ``(box, box, box)`` by name: from PDB/mmCIF files, or the embedded maps when ``None``.

    A structure is a path, or ``"path:PREFIX"`` to keep only the chains whose id starts with ``PREFIX``
    (e.g. ``"4v8r.pdb.gz:A"`` for one of the two TRiC complexes of that file).

    Maps from files are computed at ``resolution_angstrom`` (default ``2 * voxel size``); a structure that
    does not fit in the box (less than 95 % of its mass inside) gives a warning naming the file.
    """
    if voxel_size_angstrom <= 0 or box_size < 4:
        raise ValueError(f"voxel size must be > 0 and box >= 4, got {voxel_size_angstrom} and {box_size}")
    if structures is None or len(structures) == 0:
        return embedded_maps(voxel_size_angstrom, box_size, resolution_angstrom)
    specs = [parse_structure_spec(s) for s in structures]
    names = _unique_names([structure_name(path) for path, _ in specs])
    maps = {}
    for name, (path, chain_prefix) in zip(names, specs, strict=True):
        coords, z = read_atoms(path, chain_prefix=chain_prefix)
        volume = atoms_to_density(coords, z, voxel_size_angstrom, resolution_angstrom, box_size=box_size)
        kept = float(volume.sum()) / float(z.sum())
        if kept < 0.95:
            warnings.warn(
                f"{path}: only {kept:.0%} of the structure fits in a {box_size}-voxel box at {voxel_size_angstrom} A; "
                "increase --box or --voxel-size",
                stacklevel=3,
            )
        maps[name] = volume
    return maps


def simulate_dataset(
    structures: Sequence[str | Path] | None,
    per_class: int,
    snr: float,
    box: int = DEFAULT_BOX_SIZE,
    voxel_size_angstrom: float = DEFAULT_VOXEL_SIZE_ANGSTROM,
    tilt_range_degrees: float = 60.0,
    seed: int = 0,
    *,
    resolution_angstrom: float | None = None,
    ctf: CTFParams | None = None,
    max_shift_voxels: float = DEFAULT_MAX_SHIFT_VOXELS,
    device=None,
    progress: Callable[[int], None] | None = None,
) -> tuple[SimulatedSet, list[str]]:
    """Simulate ``per_class`` subtomograms of each structure (the embedded ones when ``structures`` is None;
    ``"path:PREFIX"`` keeps chains starting with ``PREFIX``, see :func:`structure_maps`).

    Returns the :class:`SimulatedSet` (on ``device``, default CPU) and the class names (index = class).
    """
    check_simulation_args(per_class, float(snr), float(tilt_range_degrees), float(max_shift_voxels))
    maps = structure_maps(structures, voxel_size_angstrom, box, resolution_angstrom)
    volumes = [m.to(device) if device is not None else m for m in maps.values()]
    sim = simulate_subtomograms(
        volumes, per_class, snr, tilt_range_degrees, max_shift_voxels, seed, ctf,
        voxel_size_angstrom=voxel_size_angstrom, progress=progress,
    )
    return sim, list(maps)


def _image_names(sim: SimulatedSet, class_names: Sequence[str]) -> list[str]:
    classes = sim.classes.cpu().numpy()
    return [f"{SUBTOMOGRAM_FOLDER}/{class_names[c]}_{i:06d}.mrc" for i, c in enumerate(classes)]


def write_simulated_dataset(
    out_dir: str | Path,
    sim: SimulatedSet,
    voxel_size_angstrom: float,
    tilt_range_degrees: float,
    class_names: Sequence[str],
    rows_per_shard: int = 256,
    *,
    metadata: dict | None = None,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write ``sim`` as a data set folder (layout in the module docstring); returns the STAR file's path.

    A data set already in ``out_dir`` is replaced (its shards and subtomogram MRC files are removed first, so
    none of them is left over). ``metadata`` (JSON-serialisable) is stored in ``simulation.json`` with the class names.
    ``progress(k)`` is called after every ``k`` subtomograms written.
    """
    n = len(sim)
    classes = sim.classes.cpu().numpy()
    if len(class_names) == 0 or (n and int(classes.max()) >= len(class_names)):
        raise ValueError(f"class_names must name every class (0..{int(classes.max())}), got {list(class_names)}")
    out = Path(out_dir)
    _remove_previous(out)
    (out / SUBTOMOGRAM_FOLDER).mkdir(parents=True, exist_ok=True)
    volumes = sim.volumes.detach().cpu().numpy()
    rotations = sim.rotations.detach().cpu().numpy().astype(np.float64)
    shifts = sim.shifts.detach().cpu().numpy().astype(np.float64)
    names = _image_names(sim, class_names)
    for i, name in enumerate(names):
        write_volume(out / name, volumes[i], voxel_size_angstrom)
        if progress is not None:
            progress(1)
    table = pd.DataFrame({"rlnImageName": names, "rlnClassNumber": classes.astype(np.int64) + 1})
    for key, values in pose_columns(rotations, shifts, voxel_size_angstrom).items():
        table[key] = values
    star_path = out / STAR_NAME
    write_particles(star_path, table, voxel_size_angstrom, box_size=int(volumes.shape[-1]))
    truth = {"class": classes, "euler_degrees": sim.euler_degrees.cpu().numpy(), "shift_voxels": shifts}
    write_shards(out / SHARD_FOLDER, np.arange(n, dtype=np.int64), volumes, voxel_size_angstrom, tilt_range_degrees,
                 "simulated", truth=truth, image_names=names, rows_per_shard=rows_per_shard)
    info = {"class_names": list(class_names), "n": n, "voxel_size_angstrom": float(voxel_size_angstrom),
            "tilt_range_degrees": float(tilt_range_degrees), **(metadata or {})}
    (out / METADATA_NAME).write_text(json.dumps(_jsonable(info), indent=2) + "\n")
    return star_path


def _remove_previous(out: Path) -> None:
    """Delete the files a previous :func:`write_simulated_dataset` left in ``out`` (only those it writes)."""
    for folder, pattern in ((SHARD_FOLDER, "*.parquet"), (SUBTOMOGRAM_FOLDER, "*.mrc")):
        if (out / folder).is_dir():
            for path in (out / folder).glob(pattern):
                path.unlink()


def _jsonable(value):
    """Plain JSON (no NaN/Infinity tokens): non-finite floats become strings, numpy scalars Python ones."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
