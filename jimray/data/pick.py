"""Picking many tomograms with Ray (orchestration layer): one task per tomogram, or per z-slab for big ones.

The driver reads only MRC headers and plans tasks; every task reads its own planes from the (shared) file,
runs :func:`jimray.pick.pick_slab` and returns coordinates and scores. Results stream back per tomogram, in
the order tomograms finish, so a caller can write each STAR file as soon as it is ready.

Slabs: a tomogram of more than ``max_voxels_per_task`` voxels is cut into z-slabs of equal core depth, each
read with a halo of :func:`jimray.pick.halo_voxels` planes, so the filter and the peak neighbourhoods near a
core's edge are those of the whole tomogram. Each slab estimates the score statistics (median, MAD) from its
own core, so score units can differ slightly between slabs; a final non-maximum suppression over the
merged picks removes any pair closer than the minimum distance across a slab boundary.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jimray.pick import PickResult, halo_voxels, pick_slab, slab_bounds, suppress_close
from jimray.pick.dog import DEFAULT_SIGMA_FACTOR, DEFAULT_SIGMA_RATIO

__all__ = ["PickSettings", "TomogramPicks", "PickTask", "plan_pick_tasks", "pick_tomograms", "read_planes"]

DEFAULT_MAX_VOXELS_PER_TASK = 1 << 26  # 64 Mi voxels: 256 MiB float32, ~2 GiB with the FFT buffers


@dataclass(frozen=True)
class PickSettings:
    """What to pick: ``particle_diameter_angstrom``; ``threshold`` in noise-std units of the DoG map;
    ``edge_margin_voxels``; ``min_distance_voxels`` (default: the particle radius); ``voxel_size_angstrom``
    overrides the MRC headers; ``invert`` for dark particles."""

    particle_diameter_angstrom: float
    threshold: float = 3.0
    edge_margin_voxels: float = 0.0
    min_distance_voxels: float | None = None
    voxel_size_angstrom: float | None = None
    invert: bool = False
    sigma_factor: float = DEFAULT_SIGMA_FACTOR
    sigma_ratio: float = DEFAULT_SIGMA_RATIO
    max_voxels_per_task: int = DEFAULT_MAX_VOXELS_PER_TASK


@dataclass(frozen=True)
class PickTask:
    """One unit of work: planes ``[read_start, read_stop)`` of ``path``, owning picks in ``[core_start, core_stop)``."""

    path: str
    shape: tuple[int, int, int]
    voxel_size_angstrom: float
    read_start: int
    read_stop: int
    core_start: int
    core_stop: int


@dataclass
class TomogramPicks:
    """The picks of one tomogram (``picks.coords_xyz`` in voxels, x y z) and where they came from."""

    path: str
    shape: tuple[int, int, int]
    voxel_size_angstrom: float
    picks: PickResult
    n_tasks: int
    seconds: float = field(default=0.0)


def read_planes(path: str | Path, start: int, stop: int) -> np.ndarray:
    """Planes ``[start, stop)`` (z) of an MRC volume as float32 ``(stop - start, y, x)``, reading only those
    bytes (memory map)."""
    import mrcfile

    from jimray.io.mrc import MRCError

    try:
        with mrcfile.mmap(path, mode="r") as mrc:
            data = mrc.data
            if data is None or data.ndim != 3:
                shape = None if data is None else data.shape
                raise MRCError(path, f"expected a 3-D tomogram, got data of shape {shape}")
            return np.array(data[start:stop], dtype=np.float32, copy=True)
    except MRCError:
        raise
    except Exception as exc:
        raise MRCError(path, f"unreadable MRC ({exc}); check that the file is complete and is an MRC file") from exc


def plan_pick_tasks(paths: list[str | Path], settings: PickSettings) -> list[PickTask]:
    """Tasks for all tomograms (headers only). Raises ``ValueError`` naming the file for a stack, a missing
    voxel size or a tomogram too thin for its halo."""
    from jimray.io.mrc import read_header

    tasks = []
    for path in paths:
        shape, header_voxel = read_header(path)
        if len(shape) != 3:
            raise ValueError(f"{path}: holds a stack {shape}, not one tomogram; pick one volume per file")
        voxel = settings.voxel_size_angstrom or header_voxel
        if voxel is None:
            raise ValueError(f"{path}: the MRC header has no voxel size; pass --voxel-size in Angstrom")
        depth, height, width = (int(s) for s in shape)
        halo = halo_voxels(settings.particle_diameter_angstrom, voxel, settings.min_distance_voxels,
                           sigma_factor=settings.sigma_factor, sigma_ratio=settings.sigma_ratio)
        planes_per_task = max(1, settings.max_voxels_per_task // max(1, height * width) - 2 * halo)
        n_slabs = math.ceil(depth / planes_per_task)
        core = math.ceil(depth / n_slabs)
        for read_start, read_stop, core_start, core_stop in slab_bounds(depth, core, halo):
            tasks.append(PickTask(str(path), (depth, height, width), float(voxel),
                                  read_start, read_stop, core_start, core_stop))
    return tasks


def run_pick_task(task: PickTask, settings: PickSettings) -> tuple[np.ndarray, np.ndarray]:
    """Read the task's planes and pick in them: ``(coords_xyz (n, 3), scores (n,))``, global voxels."""
    import torch

    slab = torch.from_numpy(read_planes(task.path, task.read_start, task.read_stop))
    full = task.read_start == 0 and task.read_stop == task.shape[0]
    result = pick_slab(
        slab, task.read_start, None if full else (task.core_start, task.core_stop), task.shape[0],
        settings.particle_diameter_angstrom, task.voxel_size_angstrom, settings.threshold,
        settings.edge_margin_voxels, settings.min_distance_voxels, sigma_factor=settings.sigma_factor,
        sigma_ratio=settings.sigma_ratio, invert=settings.invert,
    )
    return result.coords_xyz, result.scores


def _merge(tasks: list[PickTask], parts: list[tuple[np.ndarray, np.ndarray]], settings: PickSettings) -> PickResult:
    coords = np.concatenate([p[0] for p in parts]).reshape(-1, 3)
    scores = np.concatenate([p[1] for p in parts])
    merged = PickResult(coords_xyz=coords, scores=scores)
    if len(parts) == 1:
        return merged
    radius = settings.particle_diameter_angstrom / 2.0 / tasks[0].voxel_size_angstrom
    return suppress_close(merged, settings.min_distance_voxels or radius)


def pick_tomograms(
    paths: list[str | Path],
    settings: PickSettings,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[TomogramPicks]:
    """Pick every tomogram of ``paths`` on the current Ray cluster (``ray.init`` first); yields one
    :class:`TomogramPicks` per tomogram as soon as all its tasks are done. ``progress(done, total)`` is
    called after every finished task."""
    import ray

    tasks = plan_pick_tasks(paths, settings)
    remote = ray.remote(num_cpus=1, max_retries=2)(run_pick_task)
    settings_ref = ray.put(settings)
    started = time.perf_counter()
    pending = {}
    for task in tasks:
        voxels = (task.read_stop - task.read_start) * task.shape[1] * task.shape[2]
        ref = remote.options(memory=max(voxels * 4 * 12, 1 << 28)).remote(task, settings_ref)
        pending[ref] = task
    by_path: dict[str, list[PickTask]] = {}
    for task in tasks:
        by_path.setdefault(task.path, []).append(task)
    done: dict[str, list[tuple[PickTask, tuple]]] = {}
    finished = 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        task = pending.pop(ready[0])
        done.setdefault(task.path, []).append((task, ray.get(ready[0])))
        finished += 1
        if progress is not None:
            progress(finished, len(tasks))
        if len(done[task.path]) == len(by_path[task.path]):
            parts = sorted(done.pop(task.path), key=lambda item: item[0].core_start)
            own = [t for t, _ in parts]
            yield TomogramPicks(task.path, task.shape, task.voxel_size_angstrom,
                                _merge(own, [r for _, r in parts], settings), len(own),
                                time.perf_counter() - started)
