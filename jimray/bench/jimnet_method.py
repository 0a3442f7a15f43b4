"""Jim-Net, measured, as a method of ``jimray bench compare`` (issue 6).

For one SNR level's :class:`~jimray.bench.methods.Dataset` the method

1. writes the subtomograms (with their truth) as Parquet shards in a temporary folder
   (:func:`jimray.io.simulated.write_simulated_dataset`) and trains Jim-Net on them with the real training
   path, :func:`jimray.train.driver.run_training` (Ray Train, Algorithm 1: embed, GMM with ``K`` = the known
   number of classes, as the paper did, same-cluster pairs, train), sized by
   ``options.jimnet_rounds`` / ``options.jimnet_epochs`` (and ``options.jimnet_overrides``, ``--set`` strings);
2. reads the labels of the last round from the run's checkpoint (their Hungarian accuracy is the run's
   ``clustering_accuracy``, the paper's metric) and loads the trained network
   (:func:`jimray.predict.run.load_trained_run`);
3. aligns the level's same-class evaluation pairs with one forward pass each (``model(source, target)``: the
   last stage's ``(R, t)`` carries source onto target, the sense of the classical ``align_pairs``), volumes
   normalised as in training (:func:`jimray.data.reader.normalize_batch`).

With ``--jimnet-init PRETRAINED`` (a ``jimray pretrain`` model) two more rows per level: "Jim-Net (measured,
pretrained)", the same rounds started from it (``train.init_from``), and "Jim-Net (measured, pretrained, 24
starts)", that run's network aligning the pairs by multi-start from the 24 octahedral anchors
(:mod:`jimray.model.multistart`, one forward pass per anchor; its time is one pass over all pairs).

Timing: the compare runner divides a method's whole wall time by the number of subtomograms; for Jim-Net the
comparable figure with the classical pair search is the inference time per pair, so the result's ``extra``
(merged into the row last) sets ``seconds_per_subtomogram`` to it and reports the training wall time as
``train_seconds`` (Ray start-up included on the first level); the inference time is the median of three passes
over the pairs after a warm-up (the classical search is timed once, over all pairs). :func:`add_speedups` then
adds the per-pair speed-up over the classical search measured at the same level of the same run.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from jimray.bench.methods import CompareOptions, Dataset, MethodResult

METHOD_NAME = "Jim-Net (measured)"
PRETRAINED_NAME = "Jim-Net (measured, pretrained)"
MULTISTART_NAME = "Jim-Net (measured, pretrained, 24 starts)"
SEARCH_PREFIX = "constrained-CC search"
VOXEL_SIZE_ANGSTROM = 10.0  # the compare levels are simulated at the embedded maps' default 10 A voxels

# The jobs/snr_*.yaml settings (package code cannot read jobs/ at run time), sizes set per run.
BASE_OVERRIDES = [
    "model.channels=[8, 16, 32]",
    "model.stages=2",
    "gmm.pca_dims=16",
    "gmm.n_init=3",
    "train.batch_size=16",
    "train.lr=0.001",
    "train.gamma=[1.0, 1.0]",
    "scaling.num_workers=2",
    "scaling.cpus_per_worker=0.5",
]


def _write_shards(ds: Dataset, out: Path) -> Path:
    """The level's subtomograms and truth as a simulated data set folder; returns its shard folder."""
    from jimray.io.simulated import write_simulated_dataset
    from jimray.simulate.subtomogram import SimulatedSet

    sim = SimulatedSet(volumes=ds.volumes, classes=torch.as_tensor(ds.classes), rotations=ds.rotations,
                       shifts=ds.shifts, euler_degrees=_euler_degrees(ds.rotations))
    names = [f"class{k}" for k in range(ds.n_classes)]
    write_simulated_dataset(out, sim, VOXEL_SIZE_ANGSTROM, ds.tilt_range_degrees, names,
                            metadata={"snr": _json_float(ds.snr)})
    return out / "shards"


def _euler_degrees(rotations: torch.Tensor) -> torch.Tensor:
    from jimray.conventions import matrix_to_euler

    return torch.as_tensor(matrix_to_euler(rotations.detach().cpu().numpy().astype(np.float64)), dtype=torch.float32)


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def job_config(ds: Dataset, options: CompareOptions, data_path: Path, run_dir: Path):
    """The :class:`~jimray.config.JobConfig` of one level: ``options.jimnet_job`` (a YAML path; ``{snr}`` is
    replaced by the level, e.g. ``jobs/snr_{snr}.yaml``) or the jobs/snr_*.yaml defaults, then the sizes."""
    from jimray.config import load_job

    job = options.jimnet_job.replace("{snr}", f"{ds.snr:g}") if options.jimnet_job else None
    overrides = [] if job else list(BASE_OVERRIDES)
    overrides += [
        f"name=compare_snr_{ds.snr:g}",
        f"data.path={data_path}",
        f"data.box_size={int(ds.volumes.shape[-1])}",
        f"data.voxel_size_angstrom={VOXEL_SIZE_ANGSTROM}",
        f"data.tilt_range_degrees={ds.tilt_range_degrees}",
        f"gmm.n_components={ds.n_classes}",
        f"train.rounds={options.jimnet_rounds}",
        f"train.epochs_per_round={options.jimnet_epochs}",
        f"train.seed={options.seed}",
        f"gmm.seed={options.seed}",
        f"output.dir={run_dir}",
        *options.jimnet_overrides,
    ]
    return load_job(job, overrides)


def _final_labels(run_dir: Path, n: int) -> np.ndarray:
    """Labels of the last round, indexed like the data set (its shard ids are ``0..n-1``)."""
    from jimray.run_files import MODEL_DIR
    from jimray.train.state import load_round_state

    state = load_round_state(run_dir / MODEL_DIR)
    if state.ids is None or len(state.ids) != n:
        raise RuntimeError(f"{run_dir / MODEL_DIR}: expected labels for {n} subtomograms, got "
                           f"{None if state.ids is None else len(state.ids)}")
    labels = np.empty(n, dtype=np.int64)
    labels[np.asarray(state.ids, dtype=np.int64)] = state.labels
    return labels


def normalised(volumes: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit std per volume ``(b, d, h, w)``, exactly as the training reader does."""
    from jimray.data.reader import normalize_batch

    return torch.from_numpy(normalize_batch({"volume": volumes.detach().cpu().numpy()})["volume"])


@torch.no_grad()
def align_pairs_jimnet(model, sources: torch.Tensor, targets: torch.Tensor, batch_size: int = 16):
    """Jim-Net poses of ``(m, d, h, w)`` pairs (normalised): ``(R (m, 3, 3), t (m, 3))`` with
    target ~ transform_volumes(source, R, t); the model's device; returns CPU tensors."""
    model.eval()
    device = next(model.parameters()).device
    rotations, shifts = [], []
    for i in range(0, len(sources), batch_size):
        out = model(sources[i : i + batch_size].to(device), targets[i : i + batch_size].to(device))
        rotations.append(out.rotations[-1].cpu())
        shifts.append(out.shifts[-1].cpu())
    return torch.cat(rotations), torch.cat(shifts)


def _timed_alignment(model, ds: Dataset, repeats: int = 3) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Pair poses and inference wall seconds per pair: the median of ``repeats`` passes over all pairs, after
    one warm-up pass (like a loaded model; the median damps a shared machine's scheduling noise)."""
    volumes = normalised(ds.volumes)
    sources, targets = volumes[ds.pairs[:, 0]], volumes[ds.pairs[:, 1]]
    align_pairs_jimnet(model, sources[:1], targets[:1])
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        rotations, shifts = align_pairs_jimnet(model, sources, targets)
        if next(model.parameters()).device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return rotations, shifts, float(np.median(seconds)) / max(len(ds.pairs), 1)


_TRAINED: dict[tuple[int, str | None], tuple] = {}  # (id(dataset), init_from) -> that level's trained run


def _train_level(ds: Dataset, options: CompareOptions, init_from: str | None):
    """Train on one level (or reuse that level's run): ``(labels, model, summary, train_seconds, config)``."""
    key = (id(ds), init_from)
    if key in _TRAINED and _TRAINED[key][0] is ds:  # the very same level object, not a reused id
        return _TRAINED[key][1:]
    from jimray.predict.run import load_trained_run
    from jimray.train.driver import run_training

    with tempfile.TemporaryDirectory(prefix="jimray-compare-jimnet-") as tmp:
        tmp_path = Path(tmp)
        config = job_config(ds, options, _write_shards(ds, tmp_path / "data"), tmp_path / "run")
        if init_from:
            config.train.init_from = str(Path(init_from).resolve())
        start = time.perf_counter()
        summary = run_training(config, command=["jimray", "bench", "compare", f"(snr {ds.snr:g})"])
        train_seconds = time.perf_counter() - start
        labels = _final_labels(tmp_path / "run", len(ds.classes))
        trained = load_trained_run(tmp_path / "run")
    _TRAINED.clear()  # one level at a time: keep only the latest run
    _TRAINED[key] = (ds, labels, trained.model, summary, train_seconds, config)
    return _TRAINED[key][1:]


def _multistart_alignment(model, ds: Dataset, anchors: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Pair poses by :func:`jimray.model.multistart.multistart_align` and wall seconds per pair (one pass)."""
    from jimray.model.multistart import anchor_rotations, multistart_align

    model.eval()
    volumes = normalised(ds.volumes)
    device = next(model.parameters()).device
    sources, targets = volumes[ds.pairs[:, 0]].to(device), volumes[ds.pairs[:, 1]].to(device)
    start = time.perf_counter()
    rotations, shifts, _ = multistart_align(model, sources, targets, ds.tilt_range_degrees, ds.tilt_range_degrees,
                                            anchor_rotations(anchors, device=device))  # fmt: skip
    return rotations.cpu(), shifts.cpu(), (time.perf_counter() - start) / max(len(ds.pairs), 1)


def jimnet_method(
    options: CompareOptions, init_from: str | None = None, anchors: str | None = None
) -> Callable[[Dataset], MethodResult]:
    """Factory for the compare registry: ``method(dataset) -> MethodResult`` (train, cluster, align pairs);
    ``init_from``: start the rounds from this pretrained model (``train.init_from``); ``anchors``: align the pairs
    by multi-start from these anchors (the level's trained run is reused when it exists)."""

    def run(ds: Dataset) -> MethodResult:
        labels, model, summary, train_seconds, config = _train_level(ds, options, init_from)
        if anchors:
            rotations, shifts, per_pair = _multistart_alignment(model, ds, anchors)
        else:
            rotations, shifts, per_pair = _timed_alignment(model, ds)
        run_accuracy = summary.get("clustering_accuracy")
        extra = {
            "seconds_per_subtomogram": per_pair,
            "inference_seconds_per_pair": per_pair,
            "train_seconds": train_seconds,
            "train_rounds": summary.get("rounds_completed"),
            "epochs_per_round": config.train.epochs_per_round,
            "run_clustering_accuracy": None if run_accuracy is None else 100.0 * run_accuracy,
            "clustering_accuracy_per_round": [None if a is None else 100.0 * a
                                              for a in summary.get("clustering_accuracy_per_round", [])],
        }
        return MethodResult(labels=labels, pair_rotations=rotations, pair_shifts=shifts, extra=extra)

    return run


def add_speedups(rows: list[dict]) -> list[dict]:
    """Add ``speedup_vs_search`` (classical search seconds per pair / Jim-Net inference seconds per pair, the
    same level of the same run) to each measured Jim-Net row; returns ``rows``."""
    search = {r["snr"]: r["seconds_per_subtomogram"] for r in rows if str(r["method"]).startswith(SEARCH_PREFIX)}
    for row in rows:
        if _measured(row) and row["snr"] in search and row.get("seconds_per_subtomogram"):
            row["speedup_vs_search"] = search[row["snr"]] / row["seconds_per_subtomogram"]
    return rows


def markdown_notes(rows: list[dict]) -> str:
    """One paragraph on the measured Jim-Net rows: training time and per-pair speed-up (empty if none)."""
    ours = [r for r in rows if _measured(r)]
    if not ours:
        return ""
    parts = [f"{r['method']}, SNR {r['snr']:g}: train {r['train_seconds']:.0f} s, inference "
             f"{r['seconds_per_subtomogram']:.4f} "
             f"s/pair" + (f", {r['speedup_vs_search']:.2g}x the search's speed" if "speedup_vs_search" in r
                          else "") for r in ours]
    return (f"{METHOD_NAME}: trained here ({ours[0]['train_rounds']} rounds x {ours[0]['epochs_per_round']} "
            "epochs per level, K known); its seconds_per_subtomogram is the inference time per pair (training "
            "wall time is separate, `train_seconds`). " + "; ".join(parts) + ".\n\n")


def _measured(row: dict) -> bool:
    return str(row["method"]).startswith(METHOD_NAME[:-1])  # "Jim-Net (measured" and "..., pretrained)"


def pretrained_method(options: CompareOptions) -> Callable[[Dataset], MethodResult] | None:
    """The same method started from ``options.jimnet_init`` (None, so no row, when it is not set)."""
    return jimnet_method(options, options.jimnet_init) if options.jimnet_init else None


def pretrained_multistart_method(options: CompareOptions) -> Callable[[Dataset], MethodResult] | None:
    """The pretrained run's network aligning the pairs by multi-start from the 24 octahedral anchors."""
    return jimnet_method(options, options.jimnet_init, "octahedral") if options.jimnet_init else None
