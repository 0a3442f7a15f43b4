"""The report of a ``jimray run`` (:mod:`jimray.pipeline`): one ``report.html`` in the run directory, its
figures as PNG files in ``report/`` next to it and embedded in the page (base64), so the page opens on its own.

Per class: the central slices (xy, xz, yz) and a projection along z of the class average, beside the true
map of the structure most of its members come from when the data are simulated (rotated and shifted into the
average's frame by a constrained-correlation search); the FSC curves of the gold-standard half maps; the
cluster sizes (split by true structure when known); and the per-round K and clustering accuracy of training
(``train/metrics.csv``). :func:`pipeline_summary` gathers the same numbers for the terminal's summary table.
"""

from __future__ import annotations

import csv
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from jimray.io.plots import SLICE_PLANES, central_slices
from jimray.io.report import _STYLE, _pyplot, _save, _table, png_data_uri
from jimray.run_files import METRICS_CSV, PREDICT_JSON

__all__ = ["ClassRow", "PipelineSummary", "Truth", "pipeline_summary", "write_pipeline_report", "REPORT_NAME"]

REPORT_NAME = "report.html"
FIGURE_DIR = "report"
NO_PARTICLE = "no particle"


@dataclass
class Truth:
    """What a simulated run knows: structure names (index = true class), the true class of every row of the
    predicted ``particles.star`` (same order) and the true maps ``(d, h, w)`` by name."""

    names: list[str]
    classes: np.ndarray
    maps: dict[str, np.ndarray]


@dataclass
class ClassRow:
    """One class of the run, as the summary table and the report show it."""

    name: str
    particles: int
    resolution_angstrom: float
    structure: str | None = None
    purity: float | None = None
    truth_resolution_angstrom: float | None = None


@dataclass
class PipelineSummary:
    """The numbers of a finished run (:func:`pipeline_summary`)."""

    n_clusters: int
    cluster_sizes: list[int]
    accuracy: float | None
    training_accuracy: float | None
    classes: list[ClassRow]
    seconds: dict[str, float]
    rounds: list[dict] = field(default_factory=list)
    report: Path | None = None


def _read_fsc(average_dir: Path) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``fsc.csv`` of the average stage: class number -> (frequency per Angstrom, FSC)."""
    path = average_dir / "fsc.csv"
    if not path.is_file():
        return {}
    frame = pd.read_csv(path)
    return {int(c): (np.array(g["frequency_per_angstrom"], dtype=float), np.array(g["fsc"], dtype=float))
            for c, g in frame.groupby("class")}


def _training_rounds(train_dir: Path) -> list[dict]:
    """Per-round K, accuracy (when known) and seconds from ``train/metrics.csv``."""
    path = train_dir / METRICS_CSV
    if not path.is_file():
        return []
    rows = []
    with path.open() as fh:
        for row in csv.DictReader(fh):
            out = {"round": int(float(row["round"])), "K": int(float(row["n_clusters"]))}
            if row.get("clustering_accuracy") not in (None, ""):
                out["accuracy"] = float(row["clustering_accuracy"])
            if row.get("cluster_sizes"):
                out["cluster sizes"] = row["cluster_sizes"]
            if row.get("seconds") not in (None, ""):
                out["seconds"] = round(float(row["seconds"]), 1)
            rows.append(out)
    return rows


def _class_numbers(average_dir: Path, predict_dir: Path) -> tuple[np.ndarray, list[int]]:
    """The class number (1-based) of every particle (rows of the predicted STAR) and the classes averaged."""
    from jimray.io.star import read_particles

    star = average_dir / "particles.star"
    star = star if star.is_file() else predict_dir / "particles.star"
    classes = read_particles(star).particles["rlnClassNumber"].to_numpy(np.int64)
    return classes, sorted(int(c) for c in np.unique(classes))


def _align_truth(average: np.ndarray, true_map: np.ndarray) -> np.ndarray:
    """``true_map`` rotated and shifted into the frame of ``average`` (30-degree grid + local refinement)."""
    import torch

    from jimray.baselines.search import align_to_reference
    from jimray.geometry.rigid import transform_volumes

    avg, ref = torch.as_tensor(average, dtype=torch.float32), torch.as_tensor(true_map, dtype=torch.float32)
    pose = align_to_reference(avg[None], ref, 90.0, 90.0, angular_step_degrees=30.0, refine_steps=3)
    return transform_volumes(ref[None], pose.rotations, pose.shifts)[0].numpy()


def _fsc_vs_truth(average: np.ndarray, truth: np.ndarray, voxel: float) -> float:
    import torch

    from jimray.fourier.fsc import fsc, resolution_at

    curve = fsc(torch.as_tensor(average, dtype=torch.float32), torch.as_tensor(truth, dtype=torch.float32))
    return float(resolution_at(curve, 0.5, voxel_size_angstrom=voxel, box_voxels=average.shape[-1]))


def _projection(volume: np.ndarray) -> np.ndarray:
    """Sum along z: what a projection image of the density looks like (an isosurface stand-in, cheap)."""
    return volume.sum(axis=0)


def plot_class_panel(path: Path, title: str, average: np.ndarray, truth: np.ndarray | None,
                     truth_label: str | None) -> Path:
    """PNG of one class: the average's central slices and z projection; below, the aligned true map's."""
    plt = _pyplot()
    rows = [("class average", average)] + ([(truth_label or "true map", truth)] if truth is not None else [])
    fig, axes = plt.subplots(len(rows), 4, figsize=(7.2, 1.9 * len(rows) + 0.5), squeeze=False)
    for r, (label, volume) in enumerate(rows):
        panels = [*(central_slices(volume)[p] for p in SLICE_PLANES), _projection(volume)]
        for c, image in enumerate(panels):
            ax = axes[r, c]
            lo, hi = np.percentile(image, [1.0, 99.5])
            ax.imshow(image, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title([*SLICE_PLANES, "projection (z)"][c], fontsize=8)
        axes[r, 0].set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_fsc_curves(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray]],
                    resolutions: dict[str, float]) -> Path:
    from jimray.io.report import plot_fsc

    return plot_fsc(path, curves, 0.143, resolutions)


def plot_sizes(path: Path, classes: list[str], counts: np.ndarray, structures: list[str] | None) -> Path:
    """Bar chart of the particles per class; with the truth, each bar split by true structure."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.5, 0.6 * len(classes) + 3), 3.4))
    x = np.arange(len(classes))
    if structures is None:
        bars = ax.bar(x, counts.sum(axis=1), color="tab:blue")
        ax.bar_label(bars, fontsize=8)
    else:
        bottom = np.zeros(len(classes))
        cmap = plt.get_cmap("tab10")
        for s, name in enumerate(structures):
            if counts[:, s].any():
                ax.bar(x, counts[:, s], bottom=bottom, color=cmap(s % 10), label=name)
                bottom += counts[:, s]
        ax.legend(fontsize=7, title="true structure", title_fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    ax.set_xticks(x, classes, rotation=45 if len(classes) > 8 else 0, fontsize=8)
    ax.set_ylabel("particles")
    ax.set_title("cluster sizes", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_rounds(path: Path, rounds: list[dict]) -> Path:
    """Per training round: K found and, when the truth is known, the clustering accuracy."""
    plt = _pyplot()
    has_accuracy = any("accuracy" in r for r in rounds)
    fig, axes = plt.subplots(1, 2 if has_accuracy else 1, figsize=(7.5 if has_accuracy else 4, 3.0), squeeze=False)
    x = [r["round"] for r in rounds]
    ks = [r["K"] for r in rounds]
    axes[0, 0].plot(x, ks, "o-")
    axes[0, 0].set(xlabel="round", ylabel="K", title="clusters found per round",
                   ylim=(min(ks) - 1.5, max(ks) + 1.5) if ks else None)
    axes[0, 0].yaxis.get_major_locator().set_params(integer=True)  # K is a count: whole-number ticks
    axes[0, 0].set_xticks(x)
    if has_accuracy:
        axes[0, 1].plot(x, [100 * r.get("accuracy", float("nan")) for r in rounds], "s-", color="tab:green")
        axes[0, 1].set(xlabel="round", ylabel="accuracy (%)", ylim=(0, 102), title="clustering accuracy vs truth")
        axes[0, 1].set_xticks(x)
    for ax in axes.ravel():
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _read_stage_seconds(root: Path) -> dict[str, float]:
    try:
        stages = json.loads((root / "pipeline.json").read_text())["stages"]
    except (OSError, ValueError, KeyError):
        return {}
    return {name: float(s.get("seconds", 0.0)) for name, s in stages.items()}


def pipeline_summary(root: Path, train_dir: Path, predict_dir: Path, average_dir: Path,
                     truth: Truth | None, voxel: float) -> tuple[PipelineSummary, dict[int, np.ndarray]]:
    """The run's numbers and, by class number, the true map aligned to each class average (simulated data)."""
    from jimray.conventions import clustering_accuracy
    from jimray.io.mrc import read_volume

    predicted = json.loads((predict_dir / PREDICT_JSON).read_text())
    classes, numbers = _class_numbers(average_dir, predict_dir)
    fsc = _read_fsc(average_dir)
    rounds = _training_rounds(train_dir)
    accuracy = predicted.get("clustering_accuracy")
    if truth is not None and len(truth.classes) == len(classes):
        accuracy = clustering_accuracy(truth.classes, classes)
    rows, aligned = [], {}
    for number in numbers:
        members = classes == number
        curve = fsc.get(number)
        row = ClassRow(f"class_{number:03d}", int(members.sum()), _resolution(curve, voxel))
        if truth is not None and len(truth.classes) == len(classes):
            counts = np.bincount(truth.classes[members], minlength=len(truth.names))
            best = int(np.argmax(counts))
            row.structure, row.purity = truth.names[best], float(counts[best] / max(1, members.sum()))
            average_path = average_dir / f"{row.name}.mrc"
            if row.structure in truth.maps and average_path.is_file():
                average, _ = read_volume(average_path)
                aligned[number] = _align_truth(average, truth.maps[row.structure])
                row.truth_resolution_angstrom = _fsc_vs_truth(average, aligned[number], voxel)
        rows.append(row)
    summary = PipelineSummary(int(predicted.get("n_clusters", len(numbers))), [r.particles for r in rows], accuracy,
                              rounds[-1].get("accuracy") if rounds else None, rows, _read_stage_seconds(root),
                              rounds)
    return summary, aligned


def _resolution(curve: tuple[np.ndarray, np.ndarray] | None, voxel: float, threshold: float = 0.143) -> float:
    """Where the half-map FSC first drops below ``threshold`` (Angstrom, :func:`jimray.fourier.fsc.resolution_at`)."""
    from jimray.fourier.fsc import resolution_at

    if curve is None:
        return math.nan
    freq, values = curve
    box = round(1.0 / (freq[1] * voxel)) if len(freq) > 1 and freq[1] > 0 else 2 * (len(values) - 1)
    return float(resolution_at(values, threshold, voxel_size_angstrom=voxel, box_voxels=box))


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.1f}{unit}"


def write_pipeline_report(root: Path, title: str, train_dir: Path, predict_dir: Path, average_dir: Path,
                          truth: Truth | None, voxel: float, meta: dict[str, object] | None = None) -> PipelineSummary:
    """Write ``root/report.html`` and ``root/report/*.png`` (module docstring); returns the summary shown."""
    from jimray.io.mrc import read_volume

    summary, aligned = pipeline_summary(root, train_dir, predict_dir, average_dir, truth, voxel)
    figures_dir = root / FIGURE_DIR
    figures_dir.mkdir(parents=True, exist_ok=True)
    sections: list[tuple[str, str]] = []  # (heading, html)

    rows = []
    for r in summary.classes:
        row: dict[str, object] = {"class": r.name, "particles": r.particles,
                                  "resolution at FSC 0.143 (A)": _fmt(r.resolution_angstrom)}
        if truth is not None:
            row |= {"main true structure": r.structure or "n/a",
                    "share of members": _fmt(None if r.purity is None else 100 * r.purity, " %"),
                    "vs true map, FSC 0.5 (A)": _fmt(r.truth_resolution_angstrom)}
        rows.append(row)
    sections.append(("Classes", _table(rows)))

    panels = []
    for r in summary.classes:
        number = int(r.name.split("_")[1])
        path = average_dir / f"{r.name}.mrc"
        if not path.is_file():
            continue
        average, _ = read_volume(path)
        label = f"true {r.structure}" if number in aligned else None
        title_text = f"{r.name}: {r.particles} particles" + (
            f", {100 * r.purity:.0f} % {r.structure}" if r.purity is not None else "")
        png = plot_class_panel(figures_dir / f"{r.name}.png", title_text, average, aligned.get(number), label)
        panels.append(_figure(png, root, f"{r.name} central slices"))
    heading = "Class averages (top) beside the true maps (bottom)" if aligned else "Class averages"
    sections.append((heading, "<p class='meta'>Central slices through the box centre and the projection along z; "
                     "each panel scaled to its own 1st..99.5th percentile (bright = dense). True maps are rotated "
                     "into the average's frame.</p>" + "".join(panels)))

    fsc = _read_fsc(average_dir)
    if fsc:
        curves = {f"class_{c:03d}": v for c, v in fsc.items()}
        res = {r.name: r.resolution_angstrom for r in summary.classes}
        sections.append(("FSC between gold-standard half maps",
                         _figure(plot_fsc_curves(figures_dir / "fsc.png", curves, res), root, "FSC curves")))

    classes_star, numbers = _class_numbers(average_dir, predict_dir)
    names = [f"class_{n:03d}" for n in numbers]
    if truth is not None and len(truth.classes) == len(classes_star):
        counts = np.stack([np.bincount(truth.classes[classes_star == n], minlength=len(truth.names))
                           for n in numbers])
        sizes_png = plot_sizes(figures_dir / "cluster_sizes.png", names, counts, truth.names)
    else:
        counts = np.array([[int((classes_star == n).sum())] for n in numbers])
        sizes_png = plot_sizes(figures_dir / "cluster_sizes.png", names, counts, None)
    sections.append(("Cluster sizes", _figure(sizes_png, root, "cluster sizes")))

    if summary.rounds:
        rounds_png = plot_rounds(figures_dir / "training_rounds.png", summary.rounds)
        sections.append(("Training: K and accuracy per round",
                         _figure(rounds_png, root, "training rounds") + _table(summary.rounds)))

    overview = {"K found": summary.n_clusters, "particles": sum(summary.cluster_sizes),
                "clustering accuracy vs truth": _fmt(None if summary.accuracy is None else 100 * summary.accuracy,
                                                     " %"),
                **(meta or {}),
                "seconds per stage": ", ".join(f"{k} {v:.0f}" for k, v in summary.seconds.items())}
    items = "".join(f"<li><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</li>" for k, v in overview.items())
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>", f'<ul class="meta">{items}</ul>']
    for heading_text, body in sections:
        parts += [f"<h2>{html.escape(heading_text)}</h2>", body]
    parts.append("</body></html>")
    report = root / REPORT_NAME
    report.write_text("\n".join(parts), encoding="utf-8")
    summary.report = report
    return summary


def _figure(png: Path, root: Path, alt: str) -> str:
    """An ``<img>`` embedding ``png`` (the file stays in ``report/`` too)."""
    name = html.escape(png.relative_to(root).as_posix())
    return f'<img src="{png_data_uri(png)}" alt="{html.escape(alt)}" title="{name}">'
