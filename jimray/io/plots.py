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
