"""Shared helpers for benchmark commands: machine description, timing, result files."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

# A tiny Jim-Net and mixture for CI-sized training runs (``--set`` overrides of a job): the tests' settings and
# ``jimray bench scaling --tiny``.
TINY_TRAINING = (
    "model.channels=[4, 8]",
    "model.feature_size=4",
    "model.feature_dim=8",
    "model.regressor_channels=8",
    "model.local_radius=1",
    "model.dilations=[1, 2]",
    "gmm.pca_dims=4",
    "gmm.n_init=1",
    "train.batch_size=4",
    "train.reservoir_per_cluster=8",
)


def split_list(text: str) -> tuple[str, ...]:
    """A comma-separated option ``"a, b,,c"`` -> ``("a", "b", "c")`` (stripped, empty items dropped)."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def machine_info() -> dict:
    """Where a benchmark ran: CPU, cores, memory, GPU, versions."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        with open("/proc/meminfo") as fh:
            info["memory_gib"] = round(int(fh.readline().split()[1]) / 2**20, 1)
    except OSError:  # not Linux: memory unknown
        info["memory_gib"] = None
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:  # benchmarks of the pure kernels run without Ray
        info["ray"] = None
    return info


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


@contextmanager
def timer():
    """``with timer() as t: ...; t()`` gives elapsed seconds (perf_counter)."""
    start = time.perf_counter()
    end: list[float] = []
    yield lambda: (end[0] if end else time.perf_counter()) - start
    end.append(time.perf_counter())


def write_results(out_dir: str | Path, name: str, results: dict, markdown: str, command: str) -> Path:
    """Write ``name.json`` (results + machine + command + date) and ``name.md`` under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "date": now_iso(), "command": command, "machine": machine_info(), **results}
    (out / f"{name}.json").write_text(json.dumps(record, indent=2, default=float))
    header = f"Machine: {_machine_line(record['machine'])}  \nCommand: `{command}`  \nDate: {record['date']}\n\n"
    (out / f"{name}.md").write_text(header + markdown)
    return out / f"{name}.json"


def _machine_line(m: dict) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    return f"{m['processor']} x{m['cpu_count']} cores, {m.get('memory_gib') or '?'} GiB{gpu}, torch {m['torch']}"


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of ``rows`` (dicts) with the given ``columns``."""
    def fmt(v):
        if isinstance(v, float):
            return "" if v != v else f"{v:.4g}"  # NaN: not applicable, an empty cell
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
