"""``jimray run JOB.yaml``: the whole chain, tomograms -> pick -> extract -> train -> predict -> average -> report
(or, with ``pipeline.subtomograms: true``, subtomograms -> train -> predict -> average -> report: ``make demo``).

Each stage is a short function calling the library behind one command (``jimray simulate-tomogram``,
``pick``, ``extract``, ``train``, ``predict``, ``average``); the job's ``pipeline:`` section
(:class:`jimray.config.PipelineConfig`) holds their settings. Run directory (the job's ``output.dir``)::

    tomograms/      smoke variant (pipeline.simulate_tomograms): tomo_NN.mrc, tomo_NN_truth.star (true
                    coordinates, classes, RELION angles), classes.csv; real data: empty (pipeline.tomograms)
    picks/          <tomogram stem>_picks.star per tomogram and picks.star (all), as `jimray pick` writes them
    particles/      Parquet shards (the training data; id = row of picks/picks.star), skipped.csv (picks whose
                    box reaches outside the tomogram), stacks/<tomogram stem>.mrcs (the same boxes as MRC
                    stacks, named by the shards' image_name, so the STAR files below point at readable images)
    train/          the `jimray train` run directory (config.yaml, metrics.csv, summary.json, model/, ...)
    predict/        particles.star (classes, probabilities, poses), class_NNN.mrc references, predict.json
    average/        class_NNN.mrc + half maps, fsc.csv, PNGs, particles.star, report.html
    data/           subtomogram variant with data.path null: the simulated embedded structures (particles.star,
                    subtomograms/*.mrc, shards/, simulation.json), as `jimray simulate` writes them
    report.html     the run's report (:mod:`jimray.io.pipeline_report`): class averages beside the true maps
                    (simulated data), FSC curves, cluster sizes, K and accuracy per training round; its PNGs
                    in report/
    pipeline.json   per stage: status (ran / skipped / input), seconds and counts; the resolved job

Resume: a stage whose outputs exist is skipped (``pipeline.json`` keeps its earlier counts), so rerunning
the same command carries on where it stopped (``train/`` also resumes mid-training from its checkpoints).
Once a stage has run, every later stage runs again, its folder cleared first: its old outputs were made
from old inputs. To redo a stage and those after it, delete its folder.

Ground truth (smoke variant only): a pick within the particle radius of a true centre (one-to-one,
:func:`jimray.pick.match_picks`) carries that particle's class and pose into the shards (``true_*``
columns, pose shift = true centre - rounded pick); unmatched picks get class ``len(structures)`` ("no
particle"), so training and predict report clustering accuracy against the truth, false picks included.
"""

from __future__ import annotations

import glob
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from jimray.config import JobConfig
from jimray.errors import JimrayError
from jimray.run_files import MODEL_DIR, PREDICT_JSON, STATE_FILE, SUMMARY_JSON

__all__ = ["STAGES", "PipelineError", "PipelineWatcher", "RunLayout", "StageLog", "run_pipeline", "resolve_tomograms",
           "stage_names"]

COORDINATES = ["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]
ANGLES = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
RECORD = "pipeline.json"

Say = Callable[[str], None]


class StageLog:
    """What a stage is given to report progress: ``say(message)`` for a one-line message and
    ``say.update(completed, total)`` for its progress bar (both do nothing unless the caller listens)."""

    def __init__(self, message: Say | None = None, update: Callable[[int | None, int | None], None] | None = None):
        self._message, self._update = message, update

    def __call__(self, message: str) -> None:
        if self._message is not None:
            self._message(message)

    def update(self, completed: int | None = None, total: int | None = None) -> None:
        if self._update is not None:
            self._update(completed, total)


class PipelineError(JimrayError):
    """A job that cannot run as a pipeline; the message names the file or key and the fix."""


@dataclass(frozen=True)
class RunLayout:
    """The folders of a pipeline run directory (module docstring); ``stage_dir(name)`` for a stage's folder."""

    root: Path

    def stage_dir(self, stage: str) -> Path:
        """The folder a stage writes (``pick`` -> ``picks/``, ``extract`` -> ``particles/``, else its name)."""
        return self.root / {"pick": "picks", "extract": "particles", "simulate": "data"}.get(stage, stage)

    tomograms = property(lambda self: self.root / "tomograms")
    picks = property(lambda self: self.root / "picks")
    particles = property(lambda self: self.root / "particles")
    stacks = property(lambda self: self.root / "particles" / "stacks")
    data = property(lambda self: self.root / "data")
    report = property(lambda self: self.root / "report.html")
    train = property(lambda self: self.root / "train")
    predict = property(lambda self: self.root / "predict")
    average = property(lambda self: self.root / "average")
    record = property(lambda self: self.root / RECORD)


def resolve_tomograms(patterns: list[str]) -> list[Path]:
    """MRC paths or globs (relative ones from the current folder) -> sorted unique files; error if none."""
    paths = sorted({Path(p).resolve() for pattern in patterns for p in glob.glob(pattern)})
    if not paths:
        raise PipelineError(f"pipeline.tomograms {patterns} matches no file; give MRC paths or globs that exist "
                            "(relative ones are taken from the current folder)")
    stems = [p.stem for p in paths]
    if len(set(stems)) != len(stems):
        raise PipelineError("pipeline.tomograms: two tomograms share a file name (stem); rename one of them")
    return paths


def _tomogram_paths(job: JobConfig, lay: RunLayout) -> list[Path]:
    sim = job.pipeline.simulate_tomograms
    if sim is None:
        return resolve_tomograms(job.pipeline.tomograms)
    return [lay.tomograms / f"tomo_{i + 1:02d}.mrc" for i in range(sim.count)]


def _voxel_size(job: JobConfig) -> float | None:
    return job.data.voxel_size_angstrom


def particles_path(job: JobConfig, lay: RunLayout) -> Path:
    """The subtomograms train and predict read: ``particles/`` (tomogram variants), else the data section's
    ``data.path``, or the simulated set's shards ``data/shards`` when that is null."""
    if not job.pipeline.subtomograms:
        return lay.particles
    if job.data.path is not None:
        return Path(job.data.path)
    return lay.data / "shards"


# --- stages: each returns counts for pipeline.json; `done(job, lay)` says whether its outputs exist ------------


def _simulate_done(job: JobConfig, lay: RunLayout) -> bool:
    from jimray.io.simulated import METADATA_NAME

    return (lay.data / METADATA_NAME).is_file() and any((lay.data / "shards").glob("*.parquet"))


def stage_simulate(job: JobConfig, lay: RunLayout, say: StageLog) -> dict:
    """Simulate ``data.simulate_per_class`` subtomograms of each embedded structure into ``data/`` (the same
    set `jimray train` simulates for a job without data; truth in the STAR and shards)."""
    from jimray.io.simulated import simulate_dataset, write_simulated_dataset

    d, voxel = job.data, _voxel_size(job) or 10.0
    total, done = 0, [0]

    def advance(k: int) -> None:
        done[0] += k
        say.update(done[0], total)

    from jimray.simulate.embedded import embedded_structure_names

    total = 2 * d.simulate_per_class * len(embedded_structure_names())  # simulated, then written
    say.update(0, total)
    sim, names = simulate_dataset(None, d.simulate_per_class, d.simulate_snr, d.box_size, voxel,
                                  d.tilt_range_degrees, d.simulate_seed, progress=advance)
    write_simulated_dataset(lay.data, sim, voxel, d.tilt_range_degrees, names, progress=advance,
                            metadata={"snr": d.simulate_snr, "seed": d.simulate_seed})
    say(f"simulated {len(sim)} subtomograms of {len(names)} structures into {lay.data}")
    return {"subtomograms": len(sim), "structures": names, "snr": d.simulate_snr}


def _tomograms_done(job: JobConfig, lay: RunLayout) -> bool:
    files = [q for p in _tomogram_paths(job, lay) for q in (p, p.with_name(f"{p.stem}_truth.star"))]
    return (lay.tomograms / "classes.csv").is_file() and all(q.is_file() for q in files)


def stage_tomograms(job: JobConfig, lay: RunLayout, say: Say) -> dict:
    """Simulate ``pipeline.simulate_tomograms.count`` tomograms (with their truth STAR) into ``tomograms/``."""
    from jimray.cli.pick import SIM_CLASSES, coordinate_table
    from jimray.io.mrc import write_volume
    from jimray.io.star import write_particles
    from jimray.simulate.embedded import embedded_maps
    from jimray.simulate.tomogram import simulate_tomogram

    sim, voxel = job.pipeline.simulate_tomograms, _voxel_size(job) or 10.0
    maps = embedded_maps(voxel, job.data.box_size, names=sim.structures)
    lay.tomograms.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(_tomogram_paths(job, lay)):
        out = simulate_tomogram(list(maps.values()), tuple(sim.shape), sim.particles_per_tomogram,
                                job.data.tilt_range_degrees, sim.snr, sim.seed + i, sim.min_distance_voxels)
        write_volume(path, out.tomogram.cpu().numpy(), voxel)
        table = coordinate_table(path.name, out.coords)
        table["rlnClassNumber"] = out.classes + 1
        table[ANGLES] = out.euler_degrees
        write_particles(path.with_name(f"{path.stem}_truth.star"), table, voxel)
        say(f"simulated {path} {tuple(sim.shape)} with {len(table)} particles")
    pd.DataFrame({"rlnClassNumber": np.arange(1, len(maps) + 1), "structure": list(maps)}).to_csv(
        lay.tomograms / SIM_CLASSES, index=False)
    return {"tomograms": sim.count, "particles": sim.count * sim.particles_per_tomogram, "structures": list(maps)}


def _truth_table(job: JobConfig, tomogram: Path) -> pd.DataFrame | None:
    """The true particles of a simulated tomogram (None for real data)."""
    from jimray.io.star import read_particles

    star = tomogram.with_name(f"{tomogram.stem}_truth.star")
    simulated = job.pipeline.simulate_tomograms is not None
    return read_particles(star).particles if simulated and star.is_file() else None


def _pick_radius_voxels(job: JobConfig, voxel: float) -> float:
    return job.pipeline.pick.particle_diameter_angstrom / 2.0 / voxel


def _pick_done(job: JobConfig, lay: RunLayout) -> bool:
    return (lay.picks / "picks.star").is_file()


def stage_pick(job: JobConfig, lay: RunLayout, say: Say) -> dict:
    """DoG picking of every tomogram on Ray (:func:`jimray.data.pick.pick_tomograms`) -> ``picks/``."""
    from jimray.cli.pick import COMBINED_STAR, coordinate_table
    from jimray.data.pick import PickSettings, pick_tomograms
    from jimray.io.star import write_particles
    from jimray.pick import match_picks

    p = job.pipeline.pick
    settings = PickSettings(p.particle_diameter_angstrom, p.threshold, p.edge_margin_voxels, p.min_distance_voxels,
                            _voxel_size(job), p.invert)
    lay.picks.mkdir(parents=True, exist_ok=True)
    tables, counts, matched, true_total = {}, {}, 0, 0
    for result in pick_tomograms(_tomogram_paths(job, lay), settings):
        path = Path(result.path)
        table = coordinate_table(str(path), result.picks.coords_xyz, result.picks.scores)
        write_particles(lay.picks / f"{path.stem}_picks.star", table, result.voxel_size_angstrom)
        tables[str(path)], counts[path.name] = (table, result.voxel_size_angstrom), len(table)
        truth = _truth_table(job, path)
        if truth is not None:
            score = match_picks(result.picks.coords_xyz, truth[COORDINATES].to_numpy(float),
                                _pick_radius_voxels(job, result.voxel_size_angstrom))
            matched, true_total = matched + score.n_matched, true_total + score.n_true
        say(f"{path.name}: {len(table)} picks")
    if not sum(counts.values()):
        raise PipelineError(f"no particles picked in {len(counts)} tomogram(s); lower pipeline.pick.threshold or "
                            "check pipeline.pick.particle_diameter_angstrom and pipeline.pick.invert")
    ordered = [tables[k] for k in sorted(tables)]  # fixed order: particle ids do not depend on Ray's timing
    write_particles(lay.picks / COMBINED_STAR, pd.concat([t for t, _ in ordered], ignore_index=True), ordered[0][1])
    out = {"picks": int(sum(counts.values())), "per_tomogram": counts}
    if true_total:
        out |= {"recall": matched / true_total, "precision": matched / max(1, out["picks"])}
    return out


def _pick_truth(rows: pd.DataFrame, truth: pd.DataFrame, radius: float, n_structures: int) -> dict:
    """Truth of each pick of ``rows`` (module docstring): matched picks take the true class and pose."""
    from jimray.pick import match_picks

    coords = rows[COORDINATES].to_numpy(float)
    pairs = match_picks(coords, truth[COORDINATES].to_numpy(float), radius).matches
    classes = np.full(len(rows), n_structures, dtype=np.int64)
    euler, shifts = np.zeros((len(rows), 3)), np.zeros((len(rows), 3))
    classes[pairs[:, 0]] = truth["rlnClassNumber"].to_numpy(np.int64)[pairs[:, 1]] - 1
    euler[pairs[:, 0]] = truth[ANGLES].to_numpy(float)[pairs[:, 1]]
    shifts[pairs[:, 0]] = truth[COORDINATES].to_numpy(float)[pairs[:, 1]] - np.rint(coords[pairs[:, 0]])
    return {"class": classes, "euler_degrees": euler, "shift_voxels": shifts}


def _extract_done(job: JobConfig, lay: RunLayout) -> bool:
    return (lay.particles / "skipped.csv").is_file()


def _extract_tomogram(job: JobConfig, lay: RunLayout, tomogram: Path, rows: pd.DataFrame, start: int):
    """Cut one tomogram's picks: (shards written, skipped rows)."""
    import torch

    from jimray.io.mrc import read_volume, write_stack
    from jimray.io.shards import write_shards
    from jimray.pick.extract import cut_boxes

    box, tilt = job.data.box_size, job.data.tilt_range_degrees
    volume, header_voxel = read_volume(tomogram)
    voxel = _voxel_size(job) or header_voxel
    if voxel is None:
        raise PipelineError(f"{tomogram}: no voxel size in the MRC header; set data.voxel_size_angstrom in the job")
    boxes, inside = cut_boxes(torch.from_numpy(volume), rows[COORDINATES].to_numpy(float), box)
    skipped = [(i, str(tomogram), *c, f"box of {box} reaches outside the tomogram {volume.shape}")
               for i, c in zip(rows.index[~inside], rows[COORDINATES].to_numpy(float)[~inside], strict=True)]
    if not inside.any():
        return 0, skipped
    truth, kept = _truth_table(job, tomogram), rows[inside]
    if truth is not None:
        n_structures = len(pd.read_csv(lay.tomograms / "classes.csv"))
        truth = _pick_truth(kept, truth, _pick_radius_voxels(job, voxel), n_structures)
    stack = lay.stacks / f"{tomogram.stem}.mrcs"
    stack.parent.mkdir(parents=True, exist_ok=True)
    write_stack(stack, boxes.numpy(), voxel)
    names = [f"{k}@stacks/{stack.name}" for k in range(1, len(kept) + 1)]
    paths = write_shards(lay.particles, kept.index.to_numpy(np.int64), boxes.numpy(), voxel, tilt, str(tomogram),
                         truth=truth, image_names=names, rows_per_shard=job.pipeline.extract.rows_per_shard,
                         start_index=start)
    return len(paths), skipped


def stage_extract(job: JobConfig, lay: RunLayout, say: Say) -> dict:
    """Cut every pick into Parquet shards + MRC stacks under ``particles/``; ``skipped.csv`` is written last."""
    from jimray.io.star import read_particles

    rows = read_particles(lay.picks / "picks.star").particles
    n_shards, skipped = 0, []
    for tomogram, group in rows.groupby("rlnMicrographName", sort=True):
        written, bad = _extract_tomogram(job, lay, Path(tomogram), group, n_shards)
        n_shards, skipped = n_shards + written, skipped + bad
    if len(skipped) == len(rows):
        raise PipelineError(f"every pick's {job.data.box_size}-voxel box reaches outside its tomogram; set "
                            f"pipeline.pick.edge_margin_voxels to at least {job.data.box_size // 2}")
    columns = ["row", "tomogram", "x", "y", "z", "reason"]
    pd.DataFrame(skipped, columns=columns).to_csv(lay.particles / "skipped.csv", index=False)
    say(f"extracted {len(rows) - len(skipped)} of {len(rows)} picks into {n_shards} shards; {len(skipped)} skipped")
    return {"subtomograms": len(rows) - len(skipped), "skipped": len(skipped), "shards": n_shards}


def training_job(job: JobConfig, lay: RunLayout) -> JobConfig:
    """The job as ``jimray train`` sees it inside the pipeline: data = ``particles/``, run dir = ``train/``."""
    raw = job.model_dump(mode="json")
    raw["data"]["path"], raw["output"]["dir"] = str(particles_path(job, lay)), str(lay.train)
    return JobConfig.model_validate(raw)


def _train_done(job: JobConfig, lay: RunLayout) -> bool:
    summary = lay.train / SUMMARY_JSON
    if not ((lay.train / MODEL_DIR / STATE_FILE).is_file() and summary.is_file()):
        return False
    return json.loads(summary.read_text()).get("rounds_completed", 0) >= job.train.rounds


def stage_train(job: JobConfig, lay: RunLayout, say: Say) -> dict:
    """Pair-matching rounds on Ray Train (:func:`jimray.train.driver.run_training`) -> ``train/``."""
    from jimray.train.driver import run_training

    say.update(0, job.train.rounds)
    summary = run_training(training_job(job, lay), command=["jimray", *sys.argv[1:]],
                           progress=lambda done, total: say.update(done, total))
    say(f"trained {summary.get('rounds_completed')} rounds: K = {summary.get('n_clusters')}, clustering accuracy "
        f"{summary.get('clustering_accuracy')}")
    keys = ("rounds_completed", "n_clusters", "cluster_sizes", "clustering_accuracy")
    return {k: summary[k] for k in keys if k in summary}


def _predict_done(job: JobConfig, lay: RunLayout) -> bool:
    return (lay.predict / PREDICT_JSON).is_file()


def stage_predict(job: JobConfig, lay: RunLayout, say: Say) -> dict:
    """Clusters, references and poses (:func:`jimray.predict.pipeline.predict`, no averaging) -> ``predict/``."""
    from jimray.predict.pipeline import predict

    p = job.pipeline.predict
    s = predict(lay.train, particles_path(job, lay), lay.predict, actors=p.actors, batch_size=p.batch_size,
                iterations=p.iterations, average=False, progress=_counting(say, 3 + p.iterations))
    return {"subtomograms": s.n_particles, "n_clusters": s.n_clusters, "cluster_sizes": s.cluster_sizes,
            "clustering_accuracy": s.clustering_accuracy}


def _average_done(job: JobConfig, lay: RunLayout) -> bool:
    return (lay.average / "report.html").is_file()


def stage_average(job: JobConfig, lay: RunLayout, say: Say) -> dict:
    """Gold-standard half maps, FSC and report.html (:func:`jimray.average.run.average_particles`) -> ``average/``."""
    from jimray.average.run import average_particles

    a = job.pipeline.average
    s = average_particles(lay.predict / "particles.star", lay.average, iterations=a.iterations,
                          angular_step_degrees=a.angular_step_degrees, refine=a.refine,
                          tilt_range_degrees=job.data.tilt_range_degrees, seed=job.train.seed,
                          progress=lambda name, done, total: (say.update(done, total),
                                                              say(f"averaged {name} ({done}/{total})")))
    return {"classes": {c.name: {"particles": len(c.rows), "resolution_angstrom": c.resolution_angstrom}
                        for c in s.classes}}


def _counting(say: StageLog, steps: int) -> Say:
    """A message callback that also moves the stage's bar by one of ``steps`` per message."""
    done = [0]
    say.update(0, steps)

    def message(text: str) -> None:
        done[0] = min(steps, done[0] + 1)
        say.update(done[0], steps)
        say(text)

    return message


def _truth(job: JobConfig, lay: RunLayout):
    """The simulated truth of a run for its report (:class:`jimray.io.pipeline_report.Truth`), else None."""
    from jimray.io.pipeline_report import NO_PARTICLE, Truth
    from jimray.io.shards import list_shards, read_shard
    from jimray.simulate.embedded import embedded_maps

    if job.pipeline.simulate_tomograms is not None:
        names = pd.read_csv(lay.tomograms / "classes.csv")["structure"].tolist()
    elif job.pipeline.subtomograms and job.data.path is None:
        names = json.loads((lay.data / "simulation.json").read_text())["class_names"]
    else:
        return None
    parts = [read_shard(path, ["id", "true_class"]) for path in list_shards(particles_path(job, lay))]
    ids = np.concatenate([p["id"] for p in parts])
    classes = np.concatenate([p["true_class"] for p in parts])[np.argsort(ids, kind="stable")].astype(np.int64)
    maps = {k: v.numpy() for k, v in embedded_maps(_voxel_size(job) or 10.0, job.data.box_size, names=names).items()}
    return Truth([*names, NO_PARTICLE] if classes.max(initial=0) >= len(names) else names, classes, maps)


def _report_done(job: JobConfig, lay: RunLayout) -> bool:
    return lay.report.is_file()


def stage_report(job: JobConfig, lay: RunLayout, say: StageLog) -> dict:
    """``report.html`` in the run directory (:func:`jimray.io.pipeline_report.write_pipeline_report`)."""
    from jimray.io.mrc import read_volume
    from jimray.io.pipeline_report import write_pipeline_report

    say.update(0, 2)
    truth = _truth(job, lay)
    say.update(1, 2)
    voxel = _voxel_size(job)
    if voxel is None:
        voxel = read_volume(next(lay.average.glob("class_*.mrc")))[1] or 1.0
    meta = {"job": job.name, "run directory": lay.root,
            "box": f"{job.data.box_size} voxels at {voxel:g} A",
            "tilt range": f"+-{job.data.tilt_range_degrees:g} deg"}
    summary = write_pipeline_report(lay.root, f"jimray run: {job.name}", lay.train, lay.predict, lay.average, truth,
                                    voxel, meta)
    say.update(2, 2)
    say(f"wrote {summary.report}")
    return {"report": str(summary.report), "n_clusters": summary.n_clusters, "cluster_sizes": summary.cluster_sizes,
            "clustering_accuracy": summary.accuracy,
            "classes": {c.name: {"particles": c.particles, "resolution_angstrom": c.resolution_angstrom,
                                 "structure": c.structure, "purity": c.purity,
                                 "resolution_vs_truth_angstrom": c.truth_resolution_angstrom}
                        for c in summary.classes}}


STAGES = {
    "simulate": (stage_simulate, _simulate_done),
    "tomograms": (stage_tomograms, _tomograms_done),
    "pick": (stage_pick, _pick_done),
    "extract": (stage_extract, _extract_done),
    "train": (stage_train, _train_done),
    "predict": (stage_predict, _predict_done),
    "average": (stage_average, _average_done),
    "report": (stage_report, _report_done),
}
TOMOGRAM_STAGES = ("tomograms", "pick", "extract", "train", "predict", "average", "report")
SUBTOMOGRAM_STAGES = ("simulate", "train", "predict", "average", "report")


def stage_names(job: JobConfig) -> tuple[str, ...]:
    """The stages of ``job``'s pipeline, in order."""
    return SUBTOMOGRAM_STAGES if job.pipeline is not None and job.pipeline.subtomograms else TOMOGRAM_STAGES


def _write_record(lay: RunLayout, job: JobConfig, stages: dict) -> dict:
    record = {"stages": stages, "job": job.model_dump(mode="json")}
    lay.root.mkdir(parents=True, exist_ok=True)
    tmp = lay.record.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=float) + "\n")
    tmp.replace(lay.record)
    return record


def _previous_stages(lay: RunLayout) -> dict:
    try:
        return json.loads(lay.record.read_text()).get("stages", {})
    except (OSError, ValueError):
        return {}


class PipelineWatcher:
    """Hooks a front end (``jimray run``'s progress bars) is told about; the default does nothing."""

    def stage_started(self, name: str) -> None:
        """``name`` begins."""

    def stage_progress(self, name: str, completed: int | None, total: int | None) -> None:
        """``name`` has done ``completed`` of ``total`` steps (None: unchanged / unknown)."""

    def stage_message(self, name: str, message: str) -> None:
        """A one-line message of ``name``."""

    def stage_finished(self, name: str, record: dict) -> None:
        """``name`` ended: its ``pipeline.json`` entry (status, seconds, counts)."""


def run_pipeline(job: JobConfig, progress: Say | None = None, watcher: PipelineWatcher | None = None,
                 ray_logs: bool = True) -> dict:
    """Run (or resume) every stage of ``job`` (which needs a ``pipeline:`` section) under ``job.output.dir``;
    returns the ``pipeline.json`` record: ``{"stages": {name: {status, seconds, counts}}, "job": ...}``.
    ``progress`` gets every stage's messages, ``watcher`` the stages' starts, progress and ends; without
    ``ray_logs`` a Ray started here does not forward its workers' output and Ray Data draws no bars."""
    from jimray.ray_setup import init_ray

    if job.pipeline is None:
        raise PipelineError("the job has no pipeline: section; add one (see jobs/synechocystis_smoke.yaml or "
                            "jobs/quickstart_pipeline.yaml) or train only with `jimray train`")
    say, lay = progress or (lambda _message: None), RunLayout(Path(job.output.dir).resolve())
    watch = watcher or PipelineWatcher()
    stages, stale = _previous_stages(lay), False
    names = stage_names(job)
    stages = {name: stages[name] for name in names if name in stages}  # drop stages of another variant
    if ray_logs:
        init_ray()
    else:
        init_ray(log_to_driver=False)
        from jimray.ray_setup import quiet_data_progress

        quiet_data_progress()
    for name in names:
        stage, done = STAGES[name]
        if name == "tomograms" and job.pipeline.simulate_tomograms is None:
            stages[name] = {"status": "input", "seconds": 0.0,
                            "counts": {"tomograms": [str(p) for p in resolve_tomograms(job.pipeline.tomograms)]}}
            watch.stage_finished(name, stages[name])
            continue
        if name == "simulate" and job.data.path is not None:
            stages[name] = {"status": "input", "seconds": 0.0, "counts": {"data": str(Path(job.data.path).resolve())}}
            watch.stage_finished(name, stages[name])
            continue
        if done(job, lay) and not stale:
            stages[name] = {**stages.get(name, {}), "status": "skipped (outputs exist)"}
            say(f"[{name}] skipped: outputs exist in {lay.stage_dir(name)}")
            watch.stage_finished(name, stages[name])
            continue
        if stale or name not in ("tomograms", "simulate", "train"):  # train resumes from its checkpoints
            shutil.rmtree(lay.stage_dir(name), ignore_errors=True)
        say(f"[{name}] running")
        watch.stage_started(name)
        log = StageLog(lambda text, name=name: (say(text), watch.stage_message(name, text)),
                       lambda completed, total, name=name: watch.stage_progress(name, completed, total))
        started = time.perf_counter()
        counts = stage(job, lay, log)
        stages[name] = {"status": "ran", "seconds": round(time.perf_counter() - started, 2), "counts": counts}
        stale = True
        _write_record(lay, job, stages)
        watch.stage_finished(name, stages[name])
    return _write_record(lay, job, stages)
