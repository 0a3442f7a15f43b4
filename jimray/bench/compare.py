"""``jimray bench compare``: the classical methods (and Jim-Net, once plugged in) on the paper's SNR sweep.

Per SNR level a data set is simulated with :func:`jimray.simulate.subtomogram.simulate_subtomograms` from the
embedded maps (:func:`jimray.simulate.embedded.embedded_maps`): ``per_class`` subtomograms of each structure,
tilt range 60 (30-degree missing wedge), box 32, shifts up to 2 voxels; plus ``pairs`` random same-class pairs
with their true relative pose (``target ~ transform(source, R, t)``, the Jim-Net pair sense).

Every method is a callable ``method(dataset) -> MethodResult`` (the records and the registry are in
:mod:`jimray.bench.methods`; :func:`build_methods` lists the methods explicitly, then those added with
:func:`~jimray.bench.methods.register_method`); it returns cluster labels and/or the predicted pose of each
pair. The runner times it and scores it with the paper's metrics (:mod:`jimray.conventions`): rotation error
``||R - R'||_F`` and translation error (voxels) over the pairs, clustering accuracy (percent, Hungarian-matched)
over all subtomograms, and wall seconds per subtomogram (per pair for pair-only methods). Jim-Net's numbers from the
paper are printed alongside for reference.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import typer
from rich.console import Console

from jimray.bench import jimnet_method, peer  # peer: registers the opt-in pytme rows
from jimray.bench.common import markdown_table, split_list, timer, write_results
from jimray.bench.methods import PAPER_SNRS, CompareOptions, Dataset, MethodResult, registered_methods
from jimray.conventions import clustering_accuracy, compose_poses, invert_pose, rotation_error, translation_error

console = Console(stderr=True)

# Jim-Net, as reported in the paper (clustering %, rotation error, translation error in voxels) per SNR.
PAPER_JIMNET = {
    100.0: (100.0, 0.29, 1.28),
    0.1: (99.7, 0.51, 2.12),
    0.05: (96.1, 0.80, 3.20),
    0.03: (85.5, 1.02, 4.12),
    0.01: (48.1, 1.58, 6.78),
}
COLUMNS = ["method", "snr", "rotation_error_mean", "rotation_error_std", "rotation_error_asymmetric_mean",
           "translation_error_mean",
           "translation_error_std", "clustering_accuracy", "seconds_per_subtomogram"]


def pair_truth(rotations: torch.Tensor, shifts: torch.Tensor, pairs: np.ndarray):
    """True pair poses from particle poses: ``target ~ transform(source, R_t R_s^T, t_t - R_t R_s^T t_s)``."""
    src, tgt = torch.as_tensor(pairs[:, 0]), torch.as_tensor(pairs[:, 1])
    inv_r, inv_t = invert_pose(rotations[src], shifts[src])
    return compose_poses(inv_r, inv_t, rotations[tgt], shifts[tgt])


def compare_maps(options: CompareOptions) -> list[torch.Tensor]:
    """The classes' maps: embedded structures by name, or ``pseudo:N[:SEED]`` for N random pseudo-molecules
    (:mod:`jimray.simulate.pseudo`: structures no setting was tuned on)."""
    from jimray.simulate.embedded import embedded_maps
    from jimray.simulate.pseudo import pseudo_molecules

    if len(options.structures) == 1 and options.structures[0].startswith("pseudo:"):
        fields = options.structures[0].split(":")
        try:
            n, seed = int(fields[1]), int(fields[2]) if len(fields) > 2 else 0
        except ValueError:
            raise ValueError(f"--structures {options.structures[0]}: write pseudo:N or pseudo:N:SEED") from None
        return list(pseudo_molecules(n, box_size=options.box_size, seed=seed).values())
    return list(embedded_maps(box_size=options.box_size, names=list(options.structures)).values())


def make_dataset(snr: float, options: CompareOptions, maps: list[torch.Tensor] | None = None) -> Dataset:
    """Simulate one SNR level (seeded by ``options.seed``, so every level shares classes and poses)."""
    from jimray.simulate.subtomogram import simulate_subtomograms

    if maps is None:
        maps = compare_maps(options)
    sim = simulate_subtomograms(maps, options.per_class, snr, options.tilt_range_degrees, seed=options.seed)
    classes = sim.classes.cpu().numpy()
    rng = np.random.default_rng(options.seed + 1)
    pairs = []
    while len(pairs) < options.pairs:
        label = rng.integers(len(maps))
        members = np.flatnonzero(classes == label)
        if len(members) >= 2:
            pairs.append(rng.choice(members, size=2, replace=False))
    pairs = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    pair_r, pair_t = pair_truth(sim.rotations, sim.shifts, pairs)
    return Dataset(sim.volumes, classes, sim.rotations, sim.shifts, options.tilt_range_degrees, snr, len(maps),
                   pairs, pair_r, pair_t, asymmetric_classes(options, len(maps)))


def asymmetric_classes(options: CompareOptions, n_classes: int) -> np.ndarray:
    """``(n_classes,)`` bool: True where the structure is asymmetric (embedded maps: their recorded point group,
    :data:`jimray.simulate.embedded.POINT_GROUPS`; random pseudo-molecules: always)."""
    from jimray.simulate.embedded import POINT_GROUPS

    if len(options.structures) == 1 and options.structures[0].startswith("pseudo:"):
        return np.ones(n_classes, dtype=bool)
    return np.array([POINT_GROUPS.get(name, "C1") == "C1" for name in options.structures], dtype=bool)


def classical_search_method(options: CompareOptions) -> Callable[[Dataset], MethodResult]:
    """Constrained-CC search (:func:`jimray.baselines.search.align_pairs`) on every pair."""
    from jimray.baselines.search import align_pairs

    def run(ds: Dataset) -> MethodResult:
        res = align_pairs(ds.volumes[ds.pairs[:, 0]], ds.volumes[ds.pairs[:, 1]], ds.tilt_range_degrees,
                          ds.tilt_range_degrees, angular_step_degrees=options.angular_step_degrees,
                          refine_steps=options.refine_steps)
        return MethodResult(pair_rotations=res.rotations, pair_shifts=res.shifts)

    return run


def mra_method(options: CompareOptions) -> Callable[[Dataset], MethodResult]:
    """MRA (:func:`jimray.baselines.mra.multi_reference_alignment`); pair poses composed from the particles'
    poses relative to their class references (meaningful when both land in the same class)."""
    from jimray.baselines.mra import multi_reference_alignment

    def run(ds: Dataset) -> MethodResult:
        res = multi_reference_alignment(ds.volumes, ds.tilt_range_degrees, ds.n_classes, options.mra_iterations,
                                        angular_step_degrees=options.angular_step_degrees, seed=options.seed,
                                        n_components=options.pca_components, refine_steps=options.refine_steps)
        pair_r, pair_t = pair_truth(res.rotations, res.shifts, ds.pairs)
        return MethodResult(labels=res.labels, pair_rotations=pair_r, pair_shifts=pair_t,
                            extra={"changed_per_iteration": res.changed})

    return run


def pca_method(kind: str, options: CompareOptions) -> Callable[[Dataset], MethodResult]:
    """k-means or GMM on PCA of raw voxels (:mod:`jimray.baselines.pca_cluster`)."""
    from jimray.baselines.pca_cluster import pca_gmm, pca_kmeans

    fit = pca_kmeans if kind == "kmeans" else pca_gmm

    def run(ds: Dataset) -> MethodResult:
        return MethodResult(labels=fit(ds.volumes, ds.n_classes, n_components=options.pca_components,
                                       seed=options.seed))

    return run


def true_pose_ceiling_method(options: CompareOptions) -> Callable[[Dataset], MethodResult]:
    """The ceiling: every subtomogram turned back with its TRUE pose, normalised, masked (sphere of a third of
    the box), PCA 16 + GMM. No method can know the poses; it shows what clustering in a perfect frame gives."""
    from jimray.average.wedge_average import align_to_reference_frame
    from jimray.baselines.pca_cluster import pca_gmm
    from jimray.cluster.frame import spherical_mask

    def run(ds: Dataset) -> MethodResult:
        aligned = align_to_reference_frame(ds.volumes, ds.rotations, ds.shifts)
        aligned = (aligned - aligned.mean(dim=(1, 2, 3), keepdim=True)) / aligned.std(dim=(1, 2, 3), keepdim=True)
        masked = aligned * spherical_mask(tuple(aligned.shape[1:]), 0.33 * aligned.shape[-1])
        return MethodResult(labels=pca_gmm(masked, ds.n_classes, n_components=16, seed=options.seed))

    return run


def _embedding_gmm(embedding: torch.Tensor, k: int, seed: int, pca_dims: int = 8) -> np.ndarray:
    from jimray.cluster.gmm import GaussianMixture
    from jimray.cluster.pca import whitened_projection

    z, _ = whitened_projection(embedding.double(), pca_dims)
    gmm = GaussianMixture(k, covariance_type="diag", reg_covar=1e-3, n_init=5, max_iter=300, random_state=seed)
    return np.asarray(gmm.fit(z).predict(z), dtype=np.int64)


def _embedding_consensus(embedding: torch.Tensor, k: int, seed: int) -> np.ndarray:
    """The clustering rule of `jimray train` (gmm.consensus_* defaults, :mod:`jimray.cluster.consensus`)."""
    from jimray.cluster.consensus import consensus_mixture
    from jimray.config import GMMConfig

    return consensus_mixture(embedding.double(), k, seed=seed, restarts=GMMConfig().consensus_restarts)[0]


def _cluster(embedding: torch.Tensor, k: int, seed: int, clustering: str) -> np.ndarray:
    return _embedding_consensus(embedding, k, seed) if clustering == "consensus" else _embedding_gmm(embedding, k, seed)


def invariant_method(options: CompareOptions, clustering: str = "single") -> Callable[[Dataset], MethodResult]:
    """Rotation-invariant features (radial profile + radially averaged power spectrum over the measured
    voxels, :mod:`jimray.cluster.invariant`), whitened PCA 8 + diagonal GMM (``clustering="single"``) or the
    consensus of mixtures (``"consensus"``): no alignment, no network."""
    from jimray.cluster.invariant import invariant_features

    def run(ds: Dataset) -> MethodResult:
        features = invariant_features(ds.volumes, ds.tilt_range_degrees)
        return MethodResult(labels=_cluster(features, ds.n_classes, options.seed, clustering))

    return run


def frame_method(options: CompareOptions, clustering: str = "consensus") -> Callable[[Dataset], MethodResult]:
    """jimray's common frame (:mod:`jimray.cluster.frame`, the default embedding of `jimray train`): mode-seeking
    references, ``options.frame_rounds`` rounds, aligned-score embedding, clustered by the consensus of mixtures
    (`jimray train`'s default) or, as an ablation (``clustering="single"``), one whitened PCA 8 + diagonal GMM.
    Pair poses: source and target aligned onto the source's best reference (the frame's grid, then a local
    refinement at :data:`PAIR_REFINE_LOWPASS`), composed."""
    from jimray.cluster.frame import FrameOptions, frame_scores
    from jimray.cluster.reduce import LocalReducer
    from jimray.train.frame_step import frame_step

    def run(ds: Dataset) -> MethodResult:
        ids, tilts = np.arange(len(ds.classes)), np.full(len(ds.classes), ds.tilt_range_degrees, np.float32)
        frame, history = None, []
        for _ in range(options.frame_rounds):
            embedding, frame = frame_step(ds.volumes, tilts, ids, ds.volumes.shape[-1],
                                          FrameOptions(angular_step_degrees=options.angular_step_degrees,
                                                       seed=options.seed), LocalReducer(), frame)
            labels = _cluster(embedding, ds.n_classes, options.seed, clustering)
            history.append(round(100.0 * clustering_accuracy(ds.classes, labels), 1))
        src, tgt = ds.pairs[:, 0], ds.pairs[:, 1]
        scores = frame_scores(ds.volumes[np.concatenate([src, tgt])], tilts[: 2 * len(src)], frame.references,
                              frame.options, frame.reference_tilt_range_degrees)
        best = scores.scores[: len(src)].argmax(dim=1).repeat(2)
        rot, shift = _refine_pair_poses(ds.volumes[np.concatenate([src, tgt])], tilts[: 2 * len(src)],
                                        frame, best, scores)
        r_s, t_s, r_t, t_t = rot[: len(src)], shift[: len(src)], rot[len(src) :], shift[len(src) :]
        inv_r, inv_t = invert_pose(r_s, t_s)
        pair_r, pair_t = compose_poses(inv_r, inv_t, r_t, t_t)
        extra = {"accuracy_per_round": history}
        if clustering == "consensus":  # K as `jimray train` chooses it when not given (gmm.n_components null)
            extra.update(_frame_k(ds, embedding, frame, options.seed))
        return MethodResult(labels=labels, pair_rotations=pair_r, pair_shifts=pair_t, extra=extra)

    return run


K_CANDIDATES = tuple(range(2, 11))
PAIR_REFINE_LOWPASS = 0.4  # cycles/voxel: local pose refinement uses frequencies the 0.25 of the frame's grid skips


def _refine_pair_poses(volumes: torch.Tensor, tilts: np.ndarray, frame, which: torch.Tensor, scores):
    """Poses ``(rotations (n, 3, 3), shifts (n, 3))`` of ``volumes (n, d, h, w)`` against references
    ``frame.references[which]``: the frame's grid pose refined locally (:func:`jimray.align.multiref.
    refine_poses`, three rounds of 27 rotations from 15 degrees) at :data:`PAIR_REFINE_LOWPASS`."""
    from jimray.align.multiref import refine_poses
    from jimray.cluster.frame import masked_references, normalised_volumes

    idx = torch.arange(volumes.shape[0])
    rot, shift, _ = refine_poses(normalised_volumes(volumes.float()), masked_references(frame.references,
                                 frame.options), which, scores.rotations[idx, which], tilts,
                                 max_shift_voxels=frame.options.max_shift_voxels,
                                 lowpass_cycles_per_voxel=PAIR_REFINE_LOWPASS)
    return rot, shift


def _frame_k(ds: Dataset, embedding: torch.Tensor, frame, seed: int) -> dict:
    """K as `jimray train` chooses it with the defaults (``gmm.k_selection: distinct``: held-out class averages
    over the consensus partitions, :func:`jimray.train.frame_step.frame_k_chooser`), its scan, and K by the
    held-out likelihood (``k_selection: heldout``) for comparison."""
    from jimray.cluster.consensus import consensus_mixture, select_k
    from jimray.cluster.reduce import LocalReducer
    from jimray.config import GMMConfig
    from jimray.train.frame_step import frame_k_chooser

    defaults = GMMConfig()
    ids, tilts = np.arange(len(ds.classes)), np.full(len(ds.classes), ds.tilt_range_degrees, np.float32)
    choose = frame_k_chooser(ds.volumes, tilts, ids, frame, list(K_CANDIDATES), LocalReducer(), seed,
                             defaults.distinct_lowpass_cycles_per_voxel, defaults.distinct_scoring)
    partitions: dict[int, np.ndarray] = {}

    def labels_for(k: int) -> np.ndarray:
        if k not in partitions:
            partitions[k] = consensus_mixture(embedding.double(), k, seed=seed,
                                              restarts=defaults.consensus_restarts)[0]
        return partitions[k]

    k, table = choose(labels_for)
    k_heldout, _ = select_k(embedding.double(), K_CANDIDATES, seed=seed, restarts=defaults.consensus_restarts,
                            score_dims=defaults.selection_pca_dims)
    return {"k_selected": k, "k_heldout_likelihood": k_heldout,
            "accuracy_k_selected": round(100.0 * clustering_accuracy(ds.classes, labels_for(k)), 1),
            "k_scan": {row["k"]: [row["distinct"], round(row["t"], 1), round(row["effect"], 2)] for row in table}}


def frame_notes(rows: list[dict]) -> str:
    """One line on K as the common frame chooses it (held-out class averages, and held-out likelihood, over
    :data:`K_CANDIDATES`), per level."""
    picks = [f"SNR {r['snr']:g}: {r['k_selected']} ({r['accuracy_k_selected']} %)" for r in rows
             if "k_selected" in r]
    if not picks:
        return ""
    heldout = [f"SNR {r['snr']:g}: {r['k_heldout_likelihood']}" for r in rows if "k_heldout_likelihood" in r]
    return (f"K chosen by the common frame's default selection, held-out class averages (true K known to the "
            f"table's rows; candidates {K_CANDIDATES[0]}-{K_CANDIDATES[-1]}): " + ", ".join(picks) + ". By the "
            "held-out likelihood (gmm.k_selection: heldout): " + ", ".join(heldout) + ".\n\n")


def build_methods(options: CompareOptions) -> dict[str, Callable[[Dataset], MethodResult]]:
    """The registry: name -> ``method(dataset) -> MethodResult``: the classical methods, the common frame and
    Jim-Net (measured; the pretrained variants only with ``options.jimnet_init``), then any method added with
    :func:`jimray.bench.methods.register_method`."""
    step = f"{options.angular_step_degrees:g} deg"
    methods = {
        "true poses (ceiling)": true_pose_ceiling_method(options),
        "rotation-invariant features": invariant_method(options),
        "rotation-invariant features + consensus": invariant_method(options, "consensus"),
        f"common frame (jimray, {options.frame_rounds} rounds)": frame_method(options),
        f"common frame, one mixture (PCA 8; ablation, {options.frame_rounds} rounds)":
            frame_method(options, "single"),
        f"constrained-CC search ({step})": classical_search_method(options),
        f"MRA ({options.mra_iterations} it, {step})": mra_method(options),
        "PCA + k-means": pca_method("kmeans", options),
        "PCA + GMM": pca_method("gmm", options),
    }
    factories = {
        jimnet_method.METHOD_NAME: jimnet_method.jimnet_method,
        jimnet_method.PRETRAINED_NAME: jimnet_method.pretrained_method,
        jimnet_method.MULTISTART_NAME: jimnet_method.pretrained_multistart_method,
        **registered_methods(),
    }
    extra = {name: factory(options) for name, factory in factories.items()}
    methods.update({name: method for name, method in extra.items() if method is not None})
    return methods


def evaluate(name: str, ds: Dataset, result: MethodResult, seconds: float) -> dict:
    """One record of :data:`COLUMNS` (errors over the pairs; clustering in percent; NaN where not predicted)."""
    row = {"method": name, "snr": ds.snr, "n_subtomograms": len(ds.classes), "n_pairs": len(ds.pairs)}
    nan = float("nan")
    if result.pair_rotations is not None:
        rot = rotation_error(ds.pair_rotations, result.pair_rotations)
        tra = translation_error(ds.pair_shifts, result.pair_shifts)
        row.update(rotation_error_mean=float(rot.mean()), rotation_error_std=float(rot.std()),
                   translation_error_mean=float(tra.mean()), translation_error_std=float(tra.std()))
        pair_class = ds.classes[ds.pairs[:, 0]]
        asym = ds.asymmetric[pair_class] if ds.asymmetric is not None else np.ones(len(pair_class), dtype=bool)
        row["rotation_error_asymmetric_mean"] = float(rot[asym].mean()) if asym.any() else nan  # C1 pairs only
        row["rotation_error_per_class"] = {int(c): round(float(rot[pair_class == c].mean()), 3)
                                           for c in np.unique(pair_class)}
    else:
        row.update(rotation_error_mean=nan, rotation_error_std=nan, rotation_error_asymmetric_mean=nan,
                   translation_error_mean=nan, translation_error_std=nan)
    row["clustering_accuracy"] = (100.0 * clustering_accuracy(ds.classes, result.labels)
                                  if result.labels is not None else nan)
    per = len(ds.classes) if result.labels is not None else len(ds.pairs)
    row["seconds_per_subtomogram"] = seconds / max(per, 1)
    row["seconds"] = seconds
    row.update(result.extra)
    return row


def run_compare(options: CompareOptions, only: list[str] | None = None,
                maps: list[torch.Tensor] | None = None) -> list[dict]:
    """Every method (or those named in ``only``) on every SNR level, plus the paper's Jim-Net rows; ``maps``
    the classes' maps when already built (default :func:`compare_maps`)."""
    maps = compare_maps(options) if maps is None else maps
    methods = build_methods(options)
    if only:
        unknown = [m for m in only if not any(m.lower() in name.lower() for name in methods)]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose among {list(methods)}")
        methods = {k: v for k, v in methods.items() if any(m.lower() in k.lower() for m in only)}
    rows = []
    for snr in options.snrs:
        ds = make_dataset(snr, options, maps)
        for name, method in methods.items():
            console.print(f"[bold]compare[/] snr={snr:g}: {name} on {len(ds.classes)} subtomograms ...")
            with timer() as elapsed:
                result = method(ds)
            rows.append(evaluate(name, ds, result, elapsed()))
            console.print({k: rows[-1][k] for k in COLUMNS})
        if snr in PAPER_JIMNET:
            acc, rot, tra = PAPER_JIMNET[snr]
            rows.append({"method": "Jim-Net (paper)", "snr": snr, "rotation_error_mean": rot,
                         "translation_error_mean": tra, "clustering_accuracy": acc})
    return rows


def benchmark_records(rows: list[dict]) -> list[dict]:
    """BENCHMARKS.json records (issue 6): one per (method, snr) with the :data:`COLUMNS` keys; NaN or missing
    values become None (valid JSON); extra keys (e.g. ``train_seconds``, ``speedup_vs_search``) are kept."""
    import math

    def clean(v):
        if isinstance(v, (float, np.floating)):
            return float(v) if math.isfinite(v) else None
        if isinstance(v, np.integer):
            return int(v)
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    keys = ("train_seconds", "inference_seconds_per_pair", "speedup_vs_search", "n_subtomograms", "n_pairs",
            "k_selected")
    return [{k: clean(r.get(k)) for k in COLUMNS} | {k: clean(r[k]) for k in keys if k in r} for r in rows]


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(s) for s in text.split(",") if s.strip())


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("compare")
    def compare(
        snrs: str = typer.Option(",".join(f"{s:g}" for s in PAPER_SNRS), help="comma-separated SNR levels"),
        structures: str = typer.Option("6zu5_ribosome,4v8r_tric", help="embedded structures (the classes)"),
        per_class: int = typer.Option(10, help="subtomograms per structure and level"),
        pairs: int = typer.Option(10, help="same-class pairs aligned per level"),
        angular_step: float = typer.Option(30.0, help="classical search grid step, degrees"),
        mra_iterations: int = typer.Option(3, help="MRA iterations"),
        frame_rounds: int = typer.Option(5, help="common frame (jimray): mode-seeking rounds"),
        methods: str = typer.Option("", help="comma-separated substrings of method names to run (default all but "
                                    "the pytme peer rows, which run when named: 'pytme')"),
        seed: int = typer.Option(0, help="simulation and method seed"),
        out: str = typer.Option("benchmarks", help="folder for compare.json and compare.md"),
        jimnet_rounds: int = typer.Option(3, help="Jim-Net (measured): training rounds per level"),
        jimnet_epochs: int = typer.Option(2, help="Jim-Net (measured): epochs per round"),
        jimnet_job: str = typer.Option("", help="Jim-Net job YAML ('{snr}' = the level); default jobs/snr_* settings"),
        benchmarks_json: str = typer.Option("", help="also write the issue-6 records here (e.g. BENCHMARKS.json)"),
        jimnet_init: str = typer.Option("", help="a `jimray pretrain` model: also run Jim-Net started from it"),
    ) -> None:
        """Classical alignment/clustering baselines vs Jim-Net's paper numbers on the SNR sweep (box 32, tilt 60)."""
        opts = CompareOptions(snrs=_floats(snrs), structures=tuple(s.strip() for s in structures.split(",")),
                              per_class=per_class, pairs=pairs, angular_step_degrees=angular_step,
                              mra_iterations=mra_iterations, frame_rounds=frame_rounds, seed=seed,
                              jimnet_rounds=jimnet_rounds,
                              jimnet_epochs=jimnet_epochs, jimnet_job=jimnet_job or None,
                              jimnet_init=jimnet_init or None, pytme="pytme" in methods.lower())
        from jimray.cli.errors import UserError

        try:
            maps = compare_maps(opts)
        except ValueError as exc:
            raise UserError(f"--structures: {exc}") from None
        if opts.pytme and not peer.pytme_peer.pytme_available():
            raise UserError(f"--methods names pytme, which is not installed: {peer.pytme_peer.INSTALL_HINT}")
        only = [m.strip() for m in methods.split(",") if m.strip()] or None
        rows = jimnet_method.add_speedups(run_compare(opts, only, maps))
        note = (f"{len(maps)} classes x {per_class} subtomograms per level, {pairs} same-class pairs, box "
                f"{opts.box_size}, tilt range {opts.tilt_range_degrees:g}; torch threads {torch.get_num_threads()}. "
                "Errors over pairs (target ~ transform(source, R, t)); seconds per subtomogram (per pair for the "
                "pair search). 'Jim-Net (paper)' rows are the paper's numbers, not measured here.\n\n")
        md = note + jimnet_method.markdown_notes(rows) + frame_notes(rows) + markdown_table(rows, COLUMNS)
        command = "jimray bench compare " + " ".join(sys.argv[3:]) if len(sys.argv) > 3 else "jimray bench compare"
        write_results(out, "compare", {"options": opts.__dict__, "rows": rows}, md, command)
        if benchmarks_json:
            import json
            from pathlib import Path

            Path(benchmarks_json).write_text(json.dumps(benchmark_records(rows), indent=2, allow_nan=False) + "\n")
        typer.echo(md)

    register_speed(bench_app)


def speed_level(pairs: int, box_size: int = 32, snr: float = 0.1, seed: int = 0) -> tuple[Dataset, torch.Tensor]:
    """The compare-speed data: ``pairs`` same-class ribosome pairs and ``2 * pairs`` particles (SNR ``snr``, tilt
    range 60), and the wedge-free ribosome map ``(d, h, w)`` (the shared reference)."""
    from jimray.simulate.embedded import embedded_maps

    opts = CompareOptions(structures=("6zu5_ribosome",), per_class=2 * pairs, pairs=pairs, box_size=box_size,
                          seed=seed)
    reference = next(iter(embedded_maps(box_size=box_size, names=list(opts.structures)).values()))
    return make_dataset(snr, opts, [reference]), reference


def search_speed(steps: tuple[float, ...], binnings: tuple[int, ...], pairs: int, box_size: int = 32,
                 snr: float = 0.1, seed: int = 0, level: tuple[Dataset, torch.Tensor] | None = None) -> list[dict]:
    """Wall seconds per pair (:func:`align_pairs`, both wedged) and per particle against one shared reference
    (:func:`align_to_reference`, the MRA inner loop) of the constrained-CC search, with accuracy; on ``level``
    (:func:`speed_level`, made here when None). ``cpu_seconds_per_pair``: the process's CPU time per pair (all
    its threads; on a shared machine less inflated by other jobs than the wall time)."""
    from jimray.baselines.search import align_pairs, align_to_reference, so3_grid

    ds, reference = level if level is not None else speed_level(pairs, box_size, snr, seed)
    src, tgt = ds.volumes[ds.pairs[:, 0]], ds.volumes[ds.pairs[:, 1]]
    parts = ds.volumes[:pairs]
    rows = []
    for step in steps:
        for binning in binnings:
            kw = dict(angular_step_degrees=step, coarse_binning=binning)
            cpu = time.process_time()
            with timer() as t_pair:
                res = align_pairs(src, tgt, 60.0, 60.0, **kw)
            cpu = time.process_time() - cpu
            with timer() as t_ref:
                ref_res = align_to_reference(parts, reference, 60.0, 90.0, **kw)
            rows.append({
                "method": "constrained-CC search (jimray)",
                "box": box_size, "snr": snr, "angular_step_degrees": step, "coarse_binning": binning,
                "rotations": int(so3_grid(step).shape[0]), "refine_rotations": 4 * 27, "n": pairs,
                "seconds_per_pair": t_pair() / pairs, "seconds_per_particle_shared_reference": t_ref() / pairs,
                "cpu_seconds_per_pair": cpu / pairs,
                "pair_rotation_error_mean": float(rotation_error(ds.pair_rotations, res.rotations).mean()),
                "reference_rotation_error_mean": float(rotation_error(ds.rotations[:pairs], ref_res.rotations).mean()),
                "torch_threads": torch.get_num_threads(),
            })
            console.print(rows[-1])
    return rows


def _columns(rows: list[dict]) -> list[str]:
    """Every key of ``rows``, in order of first appearance."""
    return list(dict.fromkeys(k for r in rows for k in r))


def _pytme_rows(level, steps, wedges, snr) -> tuple[list[dict], str]:
    """The pytme rows (:func:`jimray.bench.peer.pytme_speed_rows`) on the same ``level``, and a note (threads;
    or why there are none)."""
    if not wedges:
        return [], ""
    if not peer.pytme_peer.pytme_available():
        return [], f"No pytme rows: pytme is not installed ({peer.pytme_peer.INSTALL_HINT}).\n\n"
    rows = peer.pytme_speed_rows(*level, steps, wedges, snr)
    for row in rows:
        console.print(row)
    return rows, peer.THREAD_NOTE.format(version=peer.pytme_peer.PYTME_VERSION) + "\n\n"


def _wedge_filters(text: str, enabled: bool) -> tuple[str, ...]:
    wedges = split_list(text) if enabled else ()
    bad = [w for w in wedges if w not in peer.pytme_peer.WEDGE_FILTERS]
    if bad:
        from jimray.cli.errors import UserError

        raise UserError(f"--pytme-wedges: {bad} not among {list(peer.pytme_peer.WEDGE_FILTERS)}")
    return wedges


def register_speed(bench_app: typer.Typer) -> None:
    @bench_app.command("compare-speed")
    def compare_speed(
        steps: str = typer.Option("30,15", help="angular steps of the global grid, degrees"),
        binnings: str = typer.Option("1,2", help="coarse-stage Fourier binning factors to time"),
        pairs: int = typer.Option(2, help="pairs (and particles) timed per setting"),
        box: int = typer.Option(32, help="box size"),
        threads: int = typer.Option(0, help="torch threads (0 = default)"),
        pytme: bool = typer.Option(True, help="pytme peer rows (when installed: jimray's 'peer' extra)"),
        pytme_wedges: str = typer.Option("none,target", help="pytme wedge filters: none, target (on the template)"),
        jimnet_model: str = typer.Option("", help="a `jimray pretrain` model for the Jim-Net single-pass row "
                                         "(default: an untrained network, its time only)"),
        out: str = typer.Option("benchmarks", help="folder for compare_speed.json and .md"),
    ) -> None:
        """Per-pair CPU/GPU time and rotation error of the classical constrained-CC search, the pytme peer and
        Jim-Net's single pass on the same pairs (SNR 0.1, tilt 60, ribosome)."""
        if threads > 0:
            torch.set_num_threads(threads)
        wedges = _wedge_filters(pytme_wedges, pytme)
        level = speed_level(pairs, box)
        jimnet = peer.jimnet_speed_row(level[0], jimnet_model or None, 0.1)  # first: a bad model fails fast
        console.print(jimnet)
        rows = search_speed(_floats(steps), tuple(int(b) for b in _floats(binnings)), pairs, box, level=level)
        pytme_rows, note = _pytme_rows(level, _floats(steps), wedges, 0.1)
        rows += [*pytme_rows, jimnet]
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        md = (f"Load average at the end: {load:.1f}.\n\n" + note + peer.ratio_note(rows)
              + markdown_table(rows, _columns(rows)))
        args = " ".join(sys.argv[3:])
        write_results(out, "compare_speed", {"rows": rows}, md, f"jimray bench compare-speed {args}".strip())
        typer.echo(md)
