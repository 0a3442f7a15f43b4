"""Averaging figures (PNG, matplotlib ``Agg``) and a self-contained HTML report (images embedded as base64
``data:`` URIs, so the file opens in any browser without a server and can be moved on its own)."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from jimray.io.plots import SLICE_PLANES, central_slices

__all__ = ["plot_fsc", "plot_gallery", "plot_cluster_sizes", "png_data_uri", "write_html_report"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_fsc(
    path: str | Path,
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    threshold: float = 0.143,
    resolutions_angstrom: Mapping[str, float] | None = None,
) -> Path:
    """PNG of FSC curves: ``curves[label] = (frequency_per_angstrom (k,), fsc (k,))``; a dashed line marks
    ``threshold``; the legend gives each label's resolution if ``resolutions_angstrom`` has it."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, (freq, curve) in curves.items():
        res = (resolutions_angstrom or {}).get(label)
        name = f"{label} ({res:.1f} A)" if res is not None and math.isfinite(res) else label
        ax.plot(np.asarray(freq), np.asarray(curve), marker=".", lw=1.5, label=name)
    ax.axhline(threshold, color="grey", ls="--", lw=1, label=f"FSC = {threshold:g}")
    ax.axhline(0.0, color="black", lw=0.5)
    ax.set_xlabel("spatial frequency (1/Angstrom)")
    ax.set_ylabel("FSC (half maps, masked)")
    ax.set_ylim(-0.2, 1.05)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_gallery(path: str | Path, volumes: Mapping[str, np.ndarray]) -> Path:
    """PNG gallery: one row per volume ``(z, y, x)``, its central ``xy``, ``xz``, ``yz`` slices, each row
    scaled to its own 1st..99.5th percentile (bright = high density)."""
    if not volumes:
        raise ValueError("plot_gallery needs at least one volume")
    plt = _pyplot()
    names = list(volumes)
    fig, axes = plt.subplots(len(names), 3, figsize=(5.4, 1.8 * len(names) + 0.4), squeeze=False)
    for row, name in enumerate(names):
        volume = np.asarray(volumes[name], dtype=np.float32)
        lo, hi = np.percentile(volume, [1.0, 99.5])
        for col, plane in enumerate(SLICE_PLANES):
            ax = axes[row, col]
            ax.imshow(central_slices(volume)[plane], cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(plane, fontsize=9)
            if col == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_cluster_sizes(path: str | Path, sizes: Mapping[str, int]) -> Path:
    """PNG bar chart of the number of particles per class."""
    plt = _pyplot()
    names = list(sizes)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(names) + 2), 3.2))
    bars = ax.bar(range(len(names)), [sizes[n] for n in names], color="tab:blue")
    ax.bar_label(bars, fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=45 if len(names) > 8 else 0, fontsize=8)
    ax.set_ylabel("particles")
    ax.set_title("cluster sizes", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def png_data_uri(path: str | Path) -> str:
    """``data:image/png;base64,...`` of a PNG file."""
    data = Path(path).read_bytes()
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError(f"{path}: not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; } th, td { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f2f2f2; } td.num { text-align: right; } img { max-width: 100%; border: 1px solid #eee; }
.meta { color: #555; font-size: 0.9em; }
"""


def _table(rows: Sequence[Mapping[str, object]]) -> str:
    if not rows:
        return "<p>(none)</p>"
    columns = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)

    def cell(value) -> str:
        if isinstance(value, float):
            return f'<td class="num">{value:.4g}</td>'
        if isinstance(value, (int, np.integer)):
            return f'<td class="num">{value}</td>'
        return f"<td>{html.escape(str(value))}</td>"

    body = "".join("<tr>" + "".join(cell(r.get(c, "")) for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_html_report(
    path: str | Path,
    title: str,
    meta: Mapping[str, object],
    table_rows: Sequence[Mapping[str, object]],
    figures: Sequence[tuple[str, str | Path]],
) -> Path:
    """One self-contained HTML page: ``title``, a key/value ``meta`` list, a table of ``table_rows`` (dicts
    with the same keys) and each ``(caption, png_path)`` figure embedded as a base64 data URI."""
    items = "".join(f"<li><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</li>" for k, v in meta.items())
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<ul class="meta">{items}</ul>',
        "<h2>Classes</h2>",
        _table(table_rows),
    ]
    for caption, png in figures:
        parts.append(f"<h2>{html.escape(caption)}</h2>")
        parts.append(f'<img src="{png_data_uri(png)}" alt="{html.escape(caption)}">')
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
