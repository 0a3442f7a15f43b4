"""Checking a RELION particle set and converting it to Parquet shards (the library side of ``jimray ingest``).

Checks per particle file (the shared pass of :mod:`jimray.io.validate`): readable header, as many data bytes as the
header promises, a cubic box equal to the set's majority box, a voxel size (``--voxel-size``, which overrides the
headers, else the STAR optics block, else the MRC headers' majority value; a header that differs from the set's is
bad), finite and non-constant values. Ids are the STAR row order ``0..n-1``; bad rows are
left out (their ids are not reused).

Conversion reads every volume once: shards are written into a staging folder ``<out>/.staging-<pid>`` and moved
into ``out`` only at the end, so a failed or refused run leaves no shard behind.
"""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jimray.errors import DataError
from jimray.io.mrc import read_volume
from jimray.io.shards import write_shard
from jimray.io.star import image_specs, read_particles
from jimray.io.validate import REPLACE, check_volumes, value_problem

__all__ = ["IngestReport", "check_particles", "ingest_star", "write_skipped_csv"]

Progress = Callable[[int, int], None]  # (advance, total): total = 2 per particle (header pass, value pass)


@dataclass
class IngestReport:
    """What a check or an ingest found and did. ``bad``: ``(file spec, reason)`` per bad particle."""

    star_path: Path
    n_particles: int
    box_size: int | None
    voxel_size_angstrom: float | None
    bad: list[tuple[str, str]] = field(default_factory=list)
    n_converted: int = 0
    shards: list[Path] = field(default_factory=list)
    bytes_read: int = 0

    @property
    def ok(self) -> bool:
        return not self.bad


def _header_pass(specs: list[str], voxel_given: float | None, voxel_source: str, progress: Progress | None):
    """Cheap checks from headers (:func:`jimray.io.validate.check_volumes` without the value pass): returns
    (bad {index: reason}, box size, voxel size)."""
    found = check_volumes(specs, source="", box_size=None, voxel_size_angstrom=voxel_given,
                          voxel_source=voxel_source, value_bytes=0,
                          progress=(lambda done, total: progress(1, 2 * total)) if progress else None)
    index = {spec: i for i, spec in enumerate(specs)}
    bad = {index[p.spec]: f"{p.reason}; {p.fix}" for p in found.problems}
    if found.voxel_size_angstrom is None:
        bad.update({i: "no voxel size in the STAR file or MRC header; pass --voxel-size"
                    for i in range(len(specs)) if i not in bad})
    return bad, found.box_size, found.voxel_size_angstrom


def _prepare(star_path, voxel_size_angstrom, progress):
    table = read_particles(star_path)
    specs = image_specs(table.particles, star_path)
    if not specs:
        raise DataError(f"{star_path}: the particles block is empty; nothing to check")
    voxel_given = voxel_size_angstrom if voxel_size_angstrom is not None else table.voxel_size_angstrom
    if voxel_given is not None and not (np.isfinite(voxel_given) and voxel_given > 0):
        raise DataError(f"--voxel-size must be a positive number of Angstrom, got {voxel_given}")
    origin = "--voxel-size" if voxel_size_angstrom is not None else "the STAR optics block"
    bad, box_size, voxel = _header_pass(specs, voxel_given, origin, progress)
    return table, specs, bad, box_size, voxel


def _load(spec: str) -> tuple[np.ndarray | None, str | None]:
    try:
        volume, _ = read_volume(spec)
    except ValueError as exc:
        return None, getattr(exc, "reason", str(exc))
    reason = value_problem(volume)
    if reason is not None:
        return None, f"{reason}; {REPLACE}"
    return volume, None


def check_particles(
    star_path: str | Path, *, voxel_size_angstrom: float | None = None, progress: Progress | None = None
) -> IngestReport:
    """Check every file the STAR file references (headers, sizes, box, voxel size, finite values); writes nothing.

    ``progress(advance, total)`` reports particles handled (total: 2 per particle, header and value pass).
    """
    star_path = Path(star_path)
    table, specs, bad, box_size, voxel = _prepare(star_path, voxel_size_angstrom, progress)
    report = IngestReport(star_path, len(specs), box_size, voxel)
    for i, spec in enumerate(specs):
        if i not in bad:
            volume, reason = _load(spec)
            if reason is not None:
                bad[i] = reason
            else:
                report.bytes_read += volume.nbytes
        if progress:
            progress(1, 2 * len(specs))
    report.bad = [(specs[i], bad[i]) for i in sorted(bad)]
    return report


def _prepare_out_dir(out_dir: Path) -> Path:
    if out_dir.exists() and any(out_dir.glob("*.parquet")):
        raise FileExistsError(f"{out_dir}: already holds Parquet shards; pass an empty or new folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / f".staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def ingest_star(
    star_path: str | Path,
    out_dir: str | Path,
    *,
    skip_bad: bool = False,
    voxel_size_angstrom: float | None = None,
    tilt_range_degrees: float = 60.0,
    rows_per_shard: int = 256,
    progress: Progress | None = None,
) -> IngestReport:
    """Check and convert a STAR particle set into Parquet shards ``out_dir/shard-00000.parquet`` ...

    If any particle is bad and ``skip_bad`` is false, nothing is written (``report.ok`` is false and
    ``report.bad`` lists every bad file). With ``skip_bad`` the good particles are converted and
    ``out_dir/skipped.csv`` lists the bad ones. ``progress(advance, total)`` as in :func:`check_particles`.
    """
    star_path, out_dir = Path(star_path), Path(out_dir)
    if rows_per_shard < 1:
        raise DataError(f"--rows-per-shard must be >= 1, got {rows_per_shard}")
    if not 0 <= tilt_range_degrees <= 90:
        raise DataError(f"--tilt-range must lie in [0, 90] degrees, got {tilt_range_degrees}")
    if out_dir.exists() and any(out_dir.glob("*.parquet")):  # fail before the (long) check, not after
        raise FileExistsError(f"{out_dir}: already holds Parquet shards; pass an empty or new folder")
    table, specs, bad, box_size, voxel = _prepare(star_path, voxel_size_angstrom, progress)
    report = IngestReport(star_path, len(specs), box_size, voxel)
    names = [str(x) for x in table.particles["rlnImageName"]]
    created = not out_dir.exists()
    staging = _prepare_out_dir(out_dir)
    try:
        buffer: list[tuple[int, np.ndarray]] = []
        staged: list[Path] = []

        def flush():
            if not buffer or (bad and not skip_bad):
                buffer.clear()
                return
            ids = np.array([i for i, _ in buffer], dtype=np.int64)
            staged.append(write_shard(
                staging / f"shard-{len(staged):05d}.parquet", ids, np.stack([v for _, v in buffer]), voxel,
                tilt_range_degrees, [specs[i] for i in ids], image_names=[names[i] for i in ids]))
            buffer.clear()

        for i, spec in enumerate(specs):
            if i not in bad:
                volume, reason = _load(spec)
                if reason is not None:
                    bad[i] = reason
                else:
                    buffer.append((i, volume))
                    report.bytes_read += volume.nbytes
                    if len(buffer) >= rows_per_shard:
                        flush()
            if progress:
                progress(1, 2 * len(specs))
        flush()
        report.bad = [(specs[i], bad[i]) for i in sorted(bad)]
        if bad and (not skip_bad or len(bad) == len(specs)):  # nothing to write: leave no trace
            return report
        for path in staged:
            os.replace(path, out_dir / path.name)
            report.shards.append(out_dir / path.name)
        report.n_converted = len(specs) - len(bad)
        if skip_bad:
            write_skipped_csv(out_dir / "skipped.csv", report.bad)
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out_dir.iterdir()):  # a refused or failed run leaves no trace
            out_dir.rmdir()


def write_skipped_csv(path: str | Path, bad: list[tuple[str, str]]) -> Path:
    """Write ``file,reason`` rows (atomically)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "reason"])
        writer.writerows(bad)
    os.replace(tmp, path)
    return path
