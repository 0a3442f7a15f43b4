"""The run directory's records: resolved config, run info, per-round metrics (CSV, PNG) and summary."""

from __future__ import annotations

import datetime as _dt
import json
import sys
from pathlib import Path

import yaml

from jimray import __version__
from jimray.config import JobConfig
from jimray.run_files import METRICS_CSV, METRICS_PNG, RUN_CONFIG, RUN_INFO, SUMMARY_JSON


def write_run_info(run_dir: Path, config: JobConfig, command: list[str] | None = None) -> None:
    """Save the resolved config (``config.yaml``) and ``run.json`` (version, command, date)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_CONFIG).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    info = {
        "jimray_version": __version__,
        "command": " ".join(command if command is not None else sys.argv),
        "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    runs = run_dir / RUN_INFO
    previous = json.loads(runs.read_text()) if runs.is_file() else []
    previous = previous if isinstance(previous, list) else [previous]
    runs.write_text(json.dumps([*previous, info], indent=2))


def _flat(row: dict) -> dict:
    out = {}
    for key, value in row.items():
        if isinstance(value, list | tuple):
            out[key] = " ".join(str(v) for v in value)
        else:
            out[key] = value
    return out


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    """Write ``metrics.csv`` (a row per round), ``summary.json`` and ``metrics.png`` from the history."""
    import pandas as pd

    if not history:
        return
    frame = pd.DataFrame([_flat(r) for r in history])
    frame.to_csv(run_dir / METRICS_CSV, index=False)
    last = history[-1]
    summary = {
        "rounds_completed": len(history),
        "n_clusters": last.get("n_clusters"),
        "cluster_sizes": last.get("cluster_sizes"),
        "loss_total": last.get("loss_total"),
        "bic": last.get("bic"),
        "fraction_changed": last.get("fraction_changed"),
    }
    if "clustering_accuracy" in last:
        summary["clustering_accuracy"] = last["clustering_accuracy"]
        summary["clustering_accuracy_per_round"] = [r.get("clustering_accuracy") for r in history]
    (run_dir / SUMMARY_JSON).write_text(json.dumps(summary, indent=2))
    plot_metrics(history, run_dir / METRICS_PNG)


def plot_metrics(history: list[dict], path: Path) -> None:
    """Loss terms, fraction of labels changed, clustering accuracy (if known) and cluster sizes per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key in sorted(k for k in history[0] if k.startswith("loss_")):
        axes[0].plot(rounds, [r.get(key) for r in history], marker="o", label=key[5:])
    axes[0].set(xlabel="round", ylabel="loss", title="training loss terms")
    axes[0].legend(fontsize=7)
    axes[1].plot(rounds, [r.get("fraction_changed", float("nan")) for r in history], marker="o", label="changed")
    if "clustering_accuracy" in history[0]:
        axes[1].plot(rounds, [r["clustering_accuracy"] for r in history], marker="s", label="accuracy")
    axes[1].set(xlabel="round", ylim=(-0.02, 1.02), title="labels")
    axes[1].legend(fontsize=7)
    sizes = history[-1].get("cluster_sizes") or []
    axes[2].bar(range(len(sizes)), sizes)
    axes[2].set(xlabel="cluster", ylabel="subtomograms", title=f"cluster sizes, round {rounds[-1]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
