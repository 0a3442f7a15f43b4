"""``jimray run JOB.yaml``: the whole chain of a job (:mod:`jimray.pipeline`), e.g. ``make demo``'s
simulate -> train -> predict -> average -> report, ending on a summary table and the path of report.html.

Quiet by default: one progress bar per stage, one line per finished stage, no Ray worker output and no library
warnings; ``--verbose`` brings Ray's worker logs and every stage message back.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Annotated

import typer

from jimray.cli.errors import UserError
from jimray.config import load_job

STAGE_LABELS = {"simulate": "simulate subtomograms", "tomograms": "simulate tomograms", "pick": "pick particles",
                "extract": "extract subtomograms", "train": "train (rounds)", "predict": "predict classes",
                "average": "average classes", "report": "write report"}


LOG_NAME = "pipeline.log"


def quiet_libraries() -> None:
    """No library warnings and no Ray progress bars (Ray workers inherit the environment)."""
    warnings.simplefilter("ignore")
    os.environ["PYTHONWARNINGS"] = "ignore"
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


@contextmanager
def stderr_into(path: Path):
    """Send this process's standard error (file descriptor 2: Python's and Ray's C++ log lines, and the Ray
    processes started meanwhile) to ``path`` until the block ends; our own output goes to stdout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with path.open("a") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield path
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _stage_note(name: str, record: dict) -> str:
    """One line for a finished stage: what it made."""
    c = record.get("counts") or {}
    if record.get("status") == "input":
        return "input"
    if not str(record.get("status", "")).startswith("ran"):
        return "skipped: outputs exist"
    if name == "simulate":
        return f"{c.get('subtomograms')} subtomograms of {len(c.get('structures', []))} structures"
    if name == "train":
        acc = c.get("clustering_accuracy")
        rounds = c.get("rounds_completed")
        return f"{rounds} round{'s' if rounds != 1 else ''}, K={c.get('n_clusters')}" + (
            f", accuracy {100 * acc:.1f}%" if acc is not None else "")
    if name == "predict":
        return f"{c.get('subtomograms')} subtomograms in {c.get('n_clusters')} clusters"
    if name == "average":
        return f"{len(c.get('classes', {}))} class averages"
    if name == "report":
        return _short(c.get("report", ""))
    return ", ".join(f"{k} {v}" for k, v in c.items() if isinstance(v, int | float))


def _short(path) -> str:
    """``path`` relative to the current folder when it lies below it (short lines in the terminal)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


class RichWatcher:
    """A :class:`jimray.pipeline.PipelineWatcher` drawing one rich progress bar per stage."""

    def __init__(self, progress, console, verbose: bool):
        self.progress, self.console, self.verbose, self.tasks = progress, console, verbose, {}

    def stage_started(self, name: str) -> None:
        self.tasks[name] = self.progress.add_task(STAGE_LABELS.get(name, name), total=None)

    def stage_progress(self, name: str, completed: int | None, total: int | None) -> None:
        if name in self.tasks:
            self.progress.update(self.tasks[name], **({"completed": completed} if completed is not None else {}),
                                 **({"total": total} if total is not None else {}))

    def stage_message(self, name: str, message: str) -> None:
        if self.verbose:
            self.console.print(f"  [dim]{name}: {message}[/dim]")

    def stage_finished(self, name: str, record: dict) -> None:
        task = self.tasks.pop(name, None)
        if task is not None:
            self.progress.remove_task(task)
        seconds = record.get("seconds")
        timing = f" [dim]({seconds:.0f} s)[/dim]" if str(record.get("status", "")).startswith("ran") else ""
        mark = "[green]done[/green]" if timing else "[dim]----[/dim]"
        self.console.print(f"{mark} {STAGE_LABELS.get(name, name):<22} {_stage_note(name, record)}{timing}")


def _fmt(value, unit: str = "", scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{scale * value:.1f}{unit}"


def summary_tables(record: dict):
    """The rich tables printed at the end: per class, then K, accuracy, seconds per stage and the report."""
    from rich.table import Table

    stages = record["stages"]
    report = (stages.get("report") or {}).get("counts") or {}
    classes = report.get("classes") or {}
    simulated = any(c.get("structure") for c in classes.values())
    per_class = Table(title="classes", title_justify="left")
    per_class.add_column("class")
    per_class.add_column("particles", justify="right")
    if simulated:
        per_class.add_column("main true structure", no_wrap=True, min_width=17)
        per_class.add_column("share", justify="right")
    per_class.add_column("FSC-0.143 (A)", justify="right")
    if simulated:
        per_class.add_column("vs truth FSC-0.5 (A)", justify="right")
    for name, c in classes.items():
        row = [name, str(c.get("particles"))]
        if simulated:
            row += [str(c.get("structure")), _fmt(c.get("purity"), " %", 100.0)]
        row.append(_fmt(c.get("resolution_angstrom")))
        if simulated:
            row.append(_fmt(c.get("resolution_vs_truth_angstrom")))
        per_class.add_row(*row)

    overview = Table(show_header=False, title="run", title_justify="left")
    overview.add_column("what")
    overview.add_column("value")
    overview.add_row("K found", str(report.get("n_clusters", "n/a")))
    overview.add_row("cluster sizes", " ".join(str(s) for s in report.get("cluster_sizes", [])) or "n/a")
    accuracy = report.get("clustering_accuracy")
    overview.add_row("accuracy vs truth", "unknown (real data)" if accuracy is None else f"{100 * accuracy:.1f} %")
    for name, s in stages.items():
        seconds = s.get("seconds")
        ran = str(s.get("status", "")).startswith("ran")
        earlier = f"{seconds:.1f} (earlier run)" if isinstance(seconds, int | float) and seconds else s.get("status")
        overview.add_row(f"seconds: {name}", f"{seconds:.1f}" if ran else str(earlier))
    overview.add_row("report", str(report.get("report", "n/a")))
    return per_class, overview


def run(
    job: Annotated[Path, typer.Argument(help="job YAML with a pipeline: section, e.g. jobs/quickstart_pipeline.yaml")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a field: train.rounds=1")] = None,
    out: Annotated[str | None, typer.Option(help="replace the job's run directory (output.dir)")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Ray's worker logs and every stage message")]
    = False,
) -> None:
    """Run the whole pipeline of a job; a rerun skips the stages whose outputs exist."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    if not verbose:
        quiet_libraries()
    from jimray.pipeline import run_pipeline

    config = load_job(job, [*(set_ or []), *([f"output.dir={out}"] if out is not None else [])])
    console = Console()
    columns = [TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn()]
    console.print(f"[bold]jimray run[/bold] {job} -> {Path(config.output.dir).resolve()}")
    root = Path(config.output.dir).resolve()
    try:
        with stderr_into(root / LOG_NAME) if not verbose else nullcontext(), \
                Progress(*columns, console=console, transient=True) as progress:
            record = run_pipeline(config, progress=None, watcher=RichWatcher(progress, console, verbose),
                                  ray_logs=verbose)
    except ValueError as exc:  # PipelineError, MRC/STAR errors and bad numbers name the file and the fix
        raise UserError(f"{job}: {exc}") from None
    for table in summary_tables(record):
        console.print(table)
    log = "" if verbose else f"; Ray and library messages in {LOG_NAME}"
    console.print(f"run directory: {root} (stage records in pipeline.json{log})")


def register(app: typer.Typer) -> None:
    app.command("run")(run)
