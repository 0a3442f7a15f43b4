"""``jimray average`` as a library call: STAR + MRC subtomograms in, class averages, half maps, FSC and an
HTML report out. The orchestration of averaging (reads and writes files through :mod:`jimray.io`); the maths
is in :mod:`jimray.average.refine`, :mod:`jimray.average.wedge_average` and :mod:`jimray.fourier.fsc`.

Output folder::

    class_NNN.mrc, class_NNN_half1.mrc, class_NNN_half2.mrc   per class (NNN = rlnClassNumber), voxel size set
    fsc.csv             class, shell, frequency_per_angstrom, resolution_angstrom, fsc
    fsc.png, gallery.png, cluster_sizes.png
    particles.star      the input particles with their final poses and rlnRandomSubset (1 or 2)
    report.html         everything above in one self-contained page (images embedded)

Input: any RELION-style particle STAR (ours, RELION, Dynamo/STOPGAP converted to STAR) with ``rlnImageName``,
``rlnClassNumber`` and the poses ``rlnAngleRot/Tilt/Psi`` (all required: a STAR without them is refused, not
averaged as one class under identity poses) + ``rlnOriginX/Y/ZAngst`` (missing = zero shift); gold-standard
halves from ``rlnRandomSubset`` if present, else split by particle id (the image name) with
:func:`jimray.average.refine.split_halves`. Every volume is checked first (:mod:`jimray.io.validate`: missing,
truncated, NaN, constant, wrong box, wrong voxel size); ``skip_bad`` leaves the bad ones out. The output
``particles.star`` names the images relative to the output folder, so it reads from where it is.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from jimray.average.refine import Aligner, classical_aligner, gold_standard_refine, local_aligner
from jimray.data.reader import normalize_batch
from jimray.errors import JimrayError
from jimray.fourier.fsc import resolution_at, shell_frequencies_per_angstrom
from jimray.io.mrc import read_volume, write_volume
from jimray.io.star import (
    ANGLE_COLUMNS,
    image_specs,
    pose_columns,
    poses_from_particles,
    read_particles,
    relative_image_names,
    write_particles,
)

__all__ = ["ClassAverage", "AveragingSummary", "AveragingError", "average_particles", "load_class_particles"]

CLASS_COLUMN = "rlnClassNumber"
SUBSET_COLUMN = "rlnRandomSubset"


class AveragingError(JimrayError):
    """Input that cannot be averaged; the message names the file and the fix."""


@dataclass
class ClassAverage:
    """One class: its number, member rows in the STAR, maps ``(d, h, w)``, FSC and resolution."""

    class_number: int
    rows: np.ndarray
    average: np.ndarray
    half_maps: np.ndarray
    fsc: np.ndarray
    resolution_angstrom: float
    rotations: np.ndarray
    shifts: np.ndarray
    halves: np.ndarray

    @property
    def name(self) -> str:
        return f"class_{self.class_number:03d}"


@dataclass
class AveragingSummary:
    """What :func:`average_particles` did: the classes, geometry, files written and timing."""

    star_path: Path
    out_dir: Path
    voxel_size_angstrom: float
    box_voxels: int
    classes: list[ClassAverage]
    seconds: float
    files: list[Path] = field(default_factory=list)

    @property
    def n_particles(self) -> int:
        return int(sum(len(c.rows) for c in self.classes))


def _check_columns(df: pd.DataFrame, star_path: Path) -> None:
    if CLASS_COLUMN not in df.columns:
        raise AveragingError(f"{star_path}: no {CLASS_COLUMN} column; `jimray average` averages each class: give a "
                             "STAR with classes (e.g. `jimray predict`'s particles.star), or add rlnClassNumber 1 to "
                             "every row for one class")
    missing = [c for c in ANGLE_COLUMNS if c not in df.columns]
    if missing:
        raise AveragingError(f"{star_path}: no pose columns {', '.join(missing)}; `jimray average` averages under "
                             "the STAR's poses: give a STAR with poses (e.g. `jimray predict`'s particles.star), or "
                             "add the angles as 0 to refine from identity poses")


def _check_volumes(specs: list[str], table, star_path: Path, skip_bad: bool, warn):
    """The validation pass (:mod:`jimray.io.validate`): ``(rows to keep, voxel size)``; bad volumes refused or,
    with ``skip_bad``, left out."""
    from jimray.io.validate import AVERAGE_HINTS, check_volumes

    origin = "the STAR optics block" if table.voxel_size_angstrom else ""
    found = check_volumes(specs, source=star_path, voxel_size_angstrom=table.voxel_size_angstrom or None,
                          voxel_source=origin, hints=AVERAGE_HINTS)
    if found.voxel_size_angstrom is None and len(found.problems) < len(specs):
        raise AveragingError(f"{star_path}: no voxel size (rlnImagePixelSize in data_optics) and none in the MRC "
                             "headers; add rlnImagePixelSize to the STAR file")
    skip = found.enforce(skip_bad, warn)
    return np.array([s not in skip for s in specs], dtype=bool), float(found.voxel_size_angstrom)


def load_class_particles(specs: list[str], normalize: bool = True) -> torch.Tensor:
    """Read subtomograms (paths or ``n@stack``) into ``(n, d, h, w)`` float32; with ``normalize`` each is set
    to zero mean and unit standard deviation (subtomograms from different tomograms differ in contrast) by the
    normalisation of training, :func:`jimray.data.reader.normalize_batch`.
    A volume of another box than the first, or with non-finite or constant values, raises
    :class:`AveragingError` naming its file."""
    from jimray.io.validate import value_problem

    volumes = []
    for spec in specs:
        volume, _ = read_volume(spec)
        if volumes and volume.shape != volumes[0].shape:
            raise AveragingError(f"{spec}: box {volume.shape} differs from {volumes[0].shape} of the other particles; "
                                 "re-extract all subtomograms with one box size")
        reason = value_problem(volume)
        if reason is not None:
            raise AveragingError(f"{spec}: {reason}; re-extract or replace it, or pass --skip-bad to leave it out")
        volumes.append(volume)
    stack = np.stack(volumes)
    if normalize:
        stack = normalize_batch({"volume": stack})["volume"]
    return torch.from_numpy(stack)


def _halves_from_star(df: pd.DataFrame, rows: np.ndarray) -> np.ndarray | None:
    if SUBSET_COLUMN not in df.columns:
        return None
    subset = df[SUBSET_COLUMN].to_numpy()[rows].astype(np.int64)
    return subset - 1 if np.isin(subset, (1, 2)).all() and len(np.unique(subset)) == 2 else None


def average_particles(
    star_path: str | Path,
    out_dir: str | Path,
    *,
    iterations: int = 3,
    angular_step_degrees: float = 30.0,
    refine: bool = True,
    mask_radius_voxels: float | None = None,
    tilt_range_degrees: float = 60.0,
    seed: int = 0,
    fsc_threshold: float = 0.143,
    aligner: Aligner | None = None,
    device: str | torch.device | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    skip_bad: bool = False,
    clear_out: bool = False,
    warn: Callable[[str], None] | None = None,
) -> AveragingSummary:
    """Average every class of ``star_path`` with gold-standard halves and write the output folder (module
    docstring). With ``refine`` the poses are refined ``iterations`` times against each half's own template
    (``aligner``; default: a local search around the STAR poses, half-width ``angular_step_degrees / 2``, when
    the STAR has angles, else the global classical search at ``angular_step_degrees``); without, the STAR poses
    are used as they are. ``progress(class_name, done, total)`` is called after each class. ``skip_bad``: leave
    bad volumes out (``warn`` is told each); ``clear_out``: empty ``out_dir`` right before writing."""
    star_path, out = Path(star_path), Path(out_dir)
    started = time.perf_counter()
    table = read_particles(star_path)
    df = table.particles
    if len(df) == 0:
        raise AveragingError(f"{star_path}: no particles in the STAR file")
    _check_columns(df, star_path)
    specs = image_specs(df, star_path)
    keep, voxel = _check_volumes(specs, table, star_path, skip_bad, warn)
    df, specs = df[keep].reset_index(drop=True), [s for s, k in zip(specs, keep, strict=True) if k]
    try:
        rotations, shifts = poses_from_particles(df, voxel)
        classes = df[CLASS_COLUMN].to_numpy().astype(np.int64)
    except (ValueError, TypeError) as exc:
        raise AveragingError(f"{star_path}: unusable pose or class columns ({exc}); fix the STAR file") from None
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if refine and aligner is None:
        has_poses = any(column in df.columns for column in ANGLE_COLUMNS)
        aligner = local_aligner(angular_step_degrees / 2.0) if has_poses else classical_aligner(angular_step_degrees)
    out.mkdir(parents=True, exist_ok=True)
    # Halves hash the image names as the STAR writes them, not the resolved paths: the same STAR gives the same
    # halves wherever it lies.
    names = df["rlnImageName"].astype(str).to_numpy()
    results, numbers = [], np.unique(classes)
    for done, number in enumerate(numbers, start=1):
        rows = np.flatnonzero(classes == number)
        particles = load_class_particles([specs[i] for i in rows]).to(device)
        res = gold_standard_refine(
            particles, tilt_range_degrees, torch.as_tensor(rotations[rows], dtype=torch.float32, device=device),
            torch.as_tensor(shifts[rows], dtype=torch.float32, device=device), names[rows],
            aligner=aligner if refine else None, iterations=iterations if refine else 0, seed=seed,
            mask_radius_voxels=mask_radius_voxels, halves=_halves_from_star(df, rows),
        )
        box = int(particles.shape[-1])
        fsc_curve = res.fsc.cpu().numpy()
        resolution = resolution_at(res.fsc, fsc_threshold, voxel_size_angstrom=voxel, box_voxels=box)
        results.append(ClassAverage(int(number), rows, res.average.cpu().numpy(), res.half_maps.cpu().numpy(),
                                    fsc_curve, resolution, res.rotations.cpu().numpy(), res.shifts.cpu().numpy(),
                                    res.halves))
        if progress is not None:
            progress(f"class_{int(number):03d}", done, len(numbers))
    summary = AveragingSummary(star_path, out, voxel, box, results, 0.0)
    if clear_out:
        from jimray.io.outdir import clear_out_dir

        clear_out_dir(out)
        out.mkdir(parents=True, exist_ok=True)
    df = df.assign(rlnImageName=relative_image_names(specs, out))
    summary.files = _write_outputs(summary, df, fsc_threshold, refine, iterations, tilt_range_degrees)
    summary.seconds = time.perf_counter() - started
    return summary


def _write_maps(summary: AveragingSummary) -> list[Path]:
    files = []
    for c in summary.classes:
        for suffix, volume in (("", c.average), ("_half1", c.half_maps[0]), ("_half2", c.half_maps[1])):
            path = summary.out_dir / f"{c.name}{suffix}.mrc"
            write_volume(path, volume, summary.voxel_size_angstrom)
            files.append(path)
    return files


def _write_fsc_csv(summary: AveragingSummary) -> Path:
    path = summary.out_dir / "fsc.csv"
    freq = shell_frequencies_per_angstrom(summary.box_voxels, summary.voxel_size_angstrom).numpy()
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["class", "shell", "frequency_per_angstrom", "resolution_angstrom", "fsc"])
        for c in summary.classes:
            for k, (f, value) in enumerate(zip(freq, c.fsc, strict=True)):
                writer.writerow([c.class_number, k, f"{f:.6g}", f"{1.0 / f:.6g}" if f > 0 else "inf", f"{value:.6f}"])
    return path


def _write_star(summary: AveragingSummary, df: pd.DataFrame) -> Path:
    table = df.copy()
    n = len(table)
    rotations, shifts, subset = np.zeros((n, 3, 3)), np.zeros((n, 3)), np.zeros(n, dtype=np.int64)
    for c in summary.classes:
        rotations[c.rows], shifts[c.rows], subset[c.rows] = c.rotations, c.shifts, c.halves + 1
    for key, values in pose_columns(rotations, shifts, summary.voxel_size_angstrom).items():
        table[key] = values
    table[SUBSET_COLUMN] = subset
    path = summary.out_dir / "particles.star"
    write_particles(path, table, summary.voxel_size_angstrom, box_size=summary.box_voxels)
    return path


def _write_outputs(summary, df, fsc_threshold, refine, iterations, tilt_range_degrees) -> list[Path]:
    from jimray.io.report import plot_cluster_sizes, plot_fsc, plot_gallery, write_html_report

    out, freq = summary.out_dir, shell_frequencies_per_angstrom(summary.box_voxels, summary.voxel_size_angstrom)
    files = _write_maps(summary) + [_write_fsc_csv(summary), _write_star(summary, df)]
    names = [c.name for c in summary.classes]
    fsc_png = plot_fsc(out / "fsc.png", {c.name: (freq.numpy(), c.fsc) for c in summary.classes}, fsc_threshold,
                       {c.name: c.resolution_angstrom for c in summary.classes})
    gallery = plot_gallery(out / "gallery.png", {c.name: c.average for c in summary.classes})
    sizes = plot_cluster_sizes(out / "cluster_sizes.png", {c.name: len(c.rows) for c in summary.classes})
    rows = [{"class": name, "particles": len(c.rows), "half 1 / half 2": f"{int((c.halves == 0).sum())} / "
             f"{int((c.halves == 1).sum())}", f"resolution at FSC {fsc_threshold:g} (A)": _fmt(c.resolution_angstrom),
             "map": f"{name}.mrc"} for name, c in zip(names, summary.classes, strict=True)]
    meta = {"particles STAR": summary.star_path, "particles": summary.n_particles, "classes": len(names),
            "box": f"{summary.box_voxels} voxels at {summary.voxel_size_angstrom:g} A",
            "tilt range": f"+-{tilt_range_degrees:g} deg",
            "refinement": f"{iterations} iterations" if refine else "off",
            "Nyquist": f"{2 * summary.voxel_size_angstrom:g} A"}
    report = write_html_report(out / "report.html", "jimray class averages", meta, rows,
                               [("FSC between gold-standard half maps", fsc_png),
                                ("Class averages: central slices", gallery), ("Cluster sizes", sizes)])
    return files + [fsc_png, gallery, sizes, report]


def _fmt(value: float) -> str:
    return f"{value:.1f}" if math.isfinite(value) else "n/a"
