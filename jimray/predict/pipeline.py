"""``jimray predict`` as a library call: a trained run + subtomograms -> clusters, references, poses, STAR.

Passes over the data (each streams through a fixed pool of actors that load the model once):

1. :class:`~jimray.predict.predictors.ClusterPredictor`: label and posterior of every particle -> a small
   id -> (label, probability) table kept on the driver and shared with the actors (``ray.put``);
2. :func:`~jimray.predict.templates.estimate_references`: one read of the K most probable members, then
   ``iterations`` align-and-average passes (wedge-aware, partial sums reduced on the driver);
3. :class:`~jimray.predict.predictors.PosePredictor`: every particle's pose against its cluster's final
   reference; only the table columns (no volumes) come back to the driver.

Output folder: ``particles.star`` (RELION 3.1: rlnImageName, rlnClassNumber (1-based),
rlnMaxValueProbDistribution, rlnAngleRot/Tilt/Psi, rlnOriginX/Y/ZAngst), ``class_NNN.mrc`` (the references the
poses were measured against) and ``predict.json`` (a summary). When the particles' image files can be read and
``average`` is on, the averaging pipeline (:func:`jimray.average.run.average_particles`, no re-refinement:
our poses as they are) adds gold-standard half maps, ``fsc.csv``, plots and ``report.html``; it rewrites
``class_NNN.mrc`` as the merged map of both halves under the final poses and ``particles.star`` with
``rlnRandomSubset`` added.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from jimray.conventions import clustering_accuracy, euler_to_matrix
from jimray.io.mrc import split_image_name
from jimray.predict.predictors import POSE_COLUMNS, ClusterPredictor, LabelTable, PosePredictor, map_with_actors
from jimray.predict.run import load_trained_run
from jimray.predict.templates import INITIAL_TEMPLATES, estimate_references
from jimray.run_files import PREDICT_JSON

__all__ = ["PredictSummary", "predict", "cluster_table", "predict_poses", "star_table"]

STAR_NAME = "particles.star"


@dataclass
class PredictSummary:
    """What :func:`predict` did and wrote."""

    out_dir: Path
    star_path: Path
    n_particles: int
    n_clusters: int
    cluster_sizes: list[int]
    reference_paths: list[Path]
    seconds: float
    averaged: bool
    averaging_note: str
    clustering_accuracy: float | None = None
    template_history: list[list[float | None]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    rule: str = ""


def cluster_table(ds, run_ref, *, actors: int = 2, batch_size: int = 16) -> LabelTable:
    """Pass 1: every particle's cluster and posterior (only ids, labels and probabilities reach the driver)."""
    columns = ["id", "volume", "tilt_range_degrees"]
    labelled = map_with_actors(ds.select_columns(columns), ClusterPredictor, actors=actors,
                               batch_size=batch_size, run=run_ref).select_columns(["id", "label", "probability"])
    ids, labels, probabilities = [], [], []
    for batch in labelled.iter_batches(batch_size=4096, batch_format="numpy"):
        ids.append(batch["id"])
        labels.append(batch["label"])
        probabilities.append(batch["probability"])
    if not ids:
        raise ValueError("the data set holds no subtomograms")
    return LabelTable.from_arrays(np.concatenate(ids), np.concatenate(labels), np.concatenate(probabilities))


def predict_poses(ds, run_ref, references_ref, table_ref, *, actors: int = 2, batch_size: int = 16) -> pd.DataFrame:
    """Pass 3: a table (sorted by id, no volumes) of every particle's columns plus label, probability and pose."""
    posed = map_with_actors(ds, PosePredictor, actors=actors, batch_size=batch_size, run=run_ref,
                            references=references_ref, labels=table_ref).drop_columns(["volume"])
    return posed.to_pandas().sort_values("id").reset_index(drop=True)


def _image_bases(data: Path) -> list[Path]:
    """Folders relative image names may be relative to: a STAR's folder; a shard folder and its parent."""
    if data.is_dir():
        return [data, data.parent]
    return [data.parent] if data.suffix == ".star" else [data.parent, data.parent.parent]


def _output_image_names(df: pd.DataFrame, data: Path, out_dir: Path) -> tuple[list[str], bool]:
    """rlnImageName for the output STAR (relative names rewritten to resolve from ``out_dir``) and whether every
    file exists. Without an ``image_name`` column: ``"<id>@<data path>"`` (not readable as images)."""
    if "image_name" not in df.columns:
        return [f"{int(i)}@{data.resolve()}" for i in df["id"]], False
    names = [str(n) for n in df["image_name"]]
    prefix, first = split_image_name(names[0])
    base = next((b for b in _image_bases(data.resolve()) if (b / first).exists()), None)
    if base is None and not Path(first).is_absolute():
        return names, False
    out, files = [], set()
    for name in names:
        prefix, file_part = split_image_name(name)
        path = Path(file_part) if Path(file_part).is_absolute() else base / file_part
        files.add(path)
        out.append(f"{prefix}{os.path.relpath(path, out_dir.resolve())}")
    return out, all(f.is_file() for f in files)


def star_table(df: pd.DataFrame, image_names: list[str], voxel_size_angstrom: float) -> pd.DataFrame:
    """RELION particle columns from a :func:`predict_poses` table."""
    from jimray.io.star import pose_columns

    rotations = euler_to_matrix(df[list(POSE_COLUMNS[:3])].to_numpy(np.float64))
    shifts = df[list(POSE_COLUMNS[3:])].to_numpy(np.float64)
    table = pd.DataFrame({"rlnImageName": image_names,
                          "rlnClassNumber": df["label"].to_numpy(np.int64) + 1,
                          "rlnMaxValueProbDistribution": df["probability"].to_numpy(np.float64)})
    for key, values in pose_columns(rotations, shifts, voxel_size_angstrom).items():
        table[key] = values
    return table


def _single_value(df: pd.DataFrame, column: str, what: str) -> float:
    values = np.unique(df[column].to_numpy(np.float64))
    if len(values) != 1:
        raise ValueError(f"the particles have several {what} ({values[:5].tolist()}); predict one data set at a time")
    return float(values[0])


def _run_averaging(star: Path, out: Path, readable: bool, enabled: bool, tilt: float) -> tuple[bool, str]:
    if not enabled:
        return False, "averaging off"
    if not readable:
        return False, "skipped: the input has no readable image files (rlnImageName); run `jimray average` on a STAR"
    try:
        from jimray.average.run import average_particles
    except ImportError as exc:
        return False, f"skipped: averaging pipeline not importable ({exc})"
    average_particles(star, out, refine=False, tilt_range_degrees=tilt)
    return True, "gold-standard half maps, FSC and report.html under the predicted poses"


def predict(
    run_dir: str | Path,
    data: str | Path,
    out_dir: str | Path,
    *,
    actors: int = 2,
    batch_size: int = 16,
    iterations: int = 2,
    initial: str = "best",
    average: bool = True,
    voxel_size_angstrom: float | None = None,
    progress: Callable[[str], None] | None = None,
    skip_bad: bool = False,
    clear_out: bool = False,
) -> PredictSummary:
    """Cluster, build references and pose every subtomogram of ``data`` with the run in ``run_dir``; write
    ``out_dir`` (module docstring). ``voxel_size_angstrom`` overrides the data's (default: the training job's
    ``data.voxel_size_angstrom``, else the data's own: shards, STAR optics block, MRC headers; none: refused).
    STAR / MRC input is validated first (:mod:`jimray.io.validate`; ``skip_bad`` leaves bad volumes out) and read
    with the run's ``data.tilt_range_degrees``. ``clear_out``: empty ``out_dir`` right before the first write."""
    import ray

    from jimray.data.reader import read_subtomograms
    from jimray.io.mrc import write_volume
    from jimray.io.star import write_particles
    from jimray.ray_setup import init_ray

    started, say = time.perf_counter(), progress or (lambda _message: None)
    data, out = Path(data), Path(out_dir)
    _check_arguments(data, actors, batch_size, iterations, initial)
    run = load_trained_run(run_dir)
    cfg = run.config.data
    voxel_size_angstrom, tilt, skip = _check_data(data, cfg, voxel_size_angstrom, skip_bad, say)
    init_ray()
    ds = read_subtomograms(data, box_size=cfg.box_size, voxel_size_angstrom=voxel_size_angstrom,
                           tilt_range_degrees=tilt, normalize=cfg.normalize, skip=skip)
    run_ref, k = ray.put(run.payload()), run.n_clusters
    table = cluster_table(ds, run_ref, actors=actors, batch_size=batch_size)
    say(f"clustered {len(table)} subtomograms into {int((table.sizes(k) > 0).sum())} of {k} clusters ({run.rule})")
    estimate = estimate_references(ds, run_ref, table, k, iterations=iterations, initial=initial, actors=actors,
                                   batch_size=batch_size, progress=say)
    df = predict_poses(ds, run_ref, ray.put(estimate.references), ray.put(table), actors=actors,
                       batch_size=batch_size)
    say(f"posed {len(df)} subtomograms against their cluster's reference")
    voxel, tilt = _single_value(df, "voxel_size_angstrom", "voxel sizes"), float(df["tilt_range_degrees"].median())
    if clear_out:
        from jimray.io.outdir import clear_out_dir

        clear_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    names, readable = _output_image_names(df, data, out)
    star = out / STAR_NAME
    write_particles(star, star_table(df, names, voxel), voxel, box_size=int(estimate.references.shape[-1]))
    references = []
    for label in np.flatnonzero(estimate.counts > 0):
        references.append(out / f"class_{label + 1:03d}.mrc")
        write_volume(references[-1], estimate.references[label], voxel)
    averaged, note = _run_averaging(star, out, readable, average, tilt)
    accuracy = clustering_accuracy(df["true_class"], df["label"]) if "true_class" in df.columns else None
    summary = PredictSummary(out, star, len(df), k, table.sizes(k).tolist(), references, 0.0, averaged, note, accuracy,
                             [[None if np.isnan(x) else float(x) for x in h] for h in estimate.history])
    summary.seconds, summary.rule = time.perf_counter() - started, run.rule
    summary.files = sorted(p for p in out.iterdir() if p.is_file())
    _write_summary(summary, run_dir, data)
    return summary


def _check_data(data: Path, cfg, voxel_size_angstrom: float | None, skip_bad: bool, say):
    """The validation pass over STAR / MRC input (no Ray): ``(voxel size override, tilt range, specs to skip)``.
    Parquet shards carry their own voxel size and tilt range (checked by ``jimray ingest``)."""
    from jimray.data.reader import is_parquet_input
    from jimray.io.validate import Hints, check_volume_set

    voxel = voxel_size_angstrom if voxel_size_angstrom is not None else cfg.voxel_size_angstrom
    if is_parquet_input(data):
        return voxel, None, set()
    origin = "--voxel-size" if voxel_size_angstrom is not None else "the run's data.voxel_size_angstrom"
    hints = Hints(box=f"the run was trained on {cfg.box_size}^3 boxes; extract the particles at box {cfg.box_size}"
                  " (or predict with a run trained at box {box})")
    found = check_volume_set(data, box_size=cfg.box_size, voxel_size_angstrom=voxel, voxel_source=origin,
                             hints=hints)
    skip = found.enforce(skip_bad, say)
    say(f"{len(found.specs) - len(skip)} subtomograms, box {found.box_size}, voxel size "
        f"{found.voxel_size_angstrom:g} A (from {found.voxel_source}), tilt range {cfg.tilt_range_degrees:g} deg "
        "(the run's data.tilt_range_degrees)")
    return found.voxel_size_angstrom, cfg.tilt_range_degrees, skip


def _check_arguments(data: Path, actors: int, batch_size: int, iterations: int, initial: str) -> None:
    if not data.exists():
        raise ValueError(f"{data}: no such file or folder; pass Parquet shards, a STAR file or a folder of MRC files")
    if actors < 1 or batch_size < 1 or iterations < 0:
        raise ValueError(f"need actors >= 1, batch size >= 1 and iterations >= 0, got {actors}, {batch_size}, "
                         f"{iterations}")
    if initial not in INITIAL_TEMPLATES:
        raise ValueError(f"initial template must be one of {INITIAL_TEMPLATES}, got {initial!r}")


def _write_summary(summary: PredictSummary, run_dir, data) -> None:
    record = {"run_dir": str(Path(run_dir).resolve()), "data": str(Path(data).resolve()),
              "n_particles": summary.n_particles, "n_clusters": summary.n_clusters,
              "cluster_sizes": summary.cluster_sizes, "clustering_accuracy": summary.clustering_accuracy,
              "template_history": summary.template_history, "averaged": summary.averaged,
              "averaging_note": summary.averaging_note, "cluster_rule": summary.rule,
              "seconds": round(summary.seconds, 3),
              "references": [p.name for p in summary.reference_paths]}
    (summary.out_dir / PREDICT_JSON).write_text(json.dumps(record, indent=2, default=str) + "\n")
