"""``jimray run JOB.yaml``: tomograms -> pick -> extract -> train -> predict -> average (:mod:`jimray.pipeline`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from jimray.cli.errors import UserError
from jimray.config import load_job


def run(
    job: Annotated[Path, typer.Argument(help="job YAML with a pipeline: section, e.g. jobs/synechocystis_smoke.yaml")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a field: pipeline.pick.threshold=4")] = None,
    out: Annotated[str | None, typer.Option(help="replace the job's run directory (output.dir)")] = None,
) -> None:
    """Run the whole pipeline of a job; a rerun skips the stages whose outputs exist."""
    from jimray.pipeline import run_pipeline

    config = load_job(job, [*(set_ or []), *([f"output.dir={out}"] if out is not None else [])])
    try:
        record = run_pipeline(config, progress=typer.echo)
    except ValueError as exc:  # PipelineError, MRC/STAR errors and bad numbers name the file and the fix
        raise UserError(f"{job}: {exc}") from None
    typer.echo(json.dumps(record["stages"], indent=2, default=float))
    typer.echo(f"run directory: {Path(config.output.dir).resolve()} (stage records in pipeline.json)")


def register(app: typer.Typer) -> None:
    app.command("run")(run)
