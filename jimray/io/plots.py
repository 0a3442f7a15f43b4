"""Figures written to files (matplotlib, headless ``Agg`` backend)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from jimray.simulate.subtomogram import simulate_subtomograms

SLICE_PLANES = ("xy", "xz", "yz")


def central_slices(volume: np.ndarray) -> dict[str, np.ndarray]:
    """Central ``xy``, ``xz`` and ``yz`` slices of a ``(z, y, x)`` volume (through voxel ``N // 2``)."""
    d, h, w = volume.shape
    return {"xy": volume[d // 2], "xz": volume[:, h // 2, :], "yz": volume[:, :, w // 2]}


def plot_simulated_slices(
    path: str | Path,
    maps: dict[str, torch.Tensor],
    snrs: Sequence[float] = (math.inf, 0.1, 0.01),
    tilt_range_degrees: float = 60.0,
    seed: int = 0,
    title: str | None = None,
) -> Path:
    """PNG of the central slices (xy, xz, yz) of one simulated subtomogram per structure (rows) at each SNR.

    The same pose (same ``seed``) is used at every SNR of a structure, so the columns differ only by noise.
    Each panel is scaled to its own 1st..99th percentile. Returns the written path.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not maps:
        raise ValueError("plot_simulated_slices needs at least one map")
    names = list(maps)
    ncols = len(snrs) * len(SLICE_PLANES)
    fig, axes = plt.subplots(len(names), ncols, figsize=(1.3 * ncols, 1.4 * len(names) + 0.6), squeeze=False)
    for row, name in enumerate(names):
        for k, snr in enumerate(snrs):
            sim = simulate_subtomograms([maps[name]], 1, snr, tilt_range_degrees, seed=seed + row)
            slices = central_slices(sim.volumes[0].cpu().numpy())
            for j, plane in enumerate(SLICE_PLANES):
                ax = axes[row, k * len(SLICE_PLANES) + j]
                lo, hi = np.percentile(slices[plane], [1, 99])
                ax.imshow(slices[plane], cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, origin="lower")
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(f"SNR {_snr_label(snr)}\n{plane}" if j == 1 else f"\n{plane}", fontsize=8)
            axes[row, 0].set_ylabel(name, fontsize=7)
    fig.suptitle(title or f"Simulated subtomograms: central slices, tilt range +-{tilt_range_degrees:g} deg",
                 fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _snr_label(snr: float) -> str:
    return "inf" if math.isinf(snr) else f"{snr:g}"


def plot_alignment_curve(curve: list[dict], path: Path, title: str, reference: float | None = 0.62) -> None:
    """Held-out rotation error along alignment training (:func:`jimray.train.pretrain.train_on_pairs`'s curve):
    uniform-SO(3) pairs (final and first stage) and, with a curriculum, pairs of the current angle; grey lines
    mark the curriculum's stage changes, the dotted line the paper's Gum-Net at SNR 0.1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    pairs = [c["pairs_seen"] for c in curve]
    ax.plot(pairs, [c["rotation_error"] for c in curve], "o-", label="uniform SO(3) pairs, final stage")
    ax.plot(pairs, [c["rotation_error_stage1"] for c in curve], "s--", label="uniform SO(3) pairs, stage 1")
    if "rotation_error_at_angle" in curve[0]:
        ax.plot(pairs, [c["rotation_error_at_angle"] for c in curve], "^-", label="pairs of the curriculum angle")
        for before, row in zip(curve, curve[1:], strict=False):
            if row["max_relative_angle"] != before["max_relative_angle"]:
                ax.axvline(before["pairs_seen"], color="lightgrey", lw=0.8)
                ax.text(before["pairs_seen"], 2.75, f" {row['max_relative_angle']:g} deg", fontsize=7, color="grey")
    if reference is not None:
        ax.axhline(reference, color="grey", ls=":", label="Gum-Net, paper (SNR 0.1)")
    ax.set_xlabel("training pairs seen")
    ax.set_ylabel("mean rotation error ||R_true - R_pred||_F")
    ax.set_ylim(0, 2.9)
    ax.legend(fontsize=8, loc="center right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
