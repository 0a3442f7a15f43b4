"""``jimray train JOB.yaml``: run (or resume) the pair-matching rounds of a job, locally or on a cluster."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from jimray.config import load_job


def _notice(line: str) -> None:
    """Skipped volumes and --force go to stderr in yellow; the run directory to stdout."""
    if line.startswith(("skip", "--force")):
        typer.secho(line, err=True, fg="yellow")
    else:
        typer.echo(line)


def train(
    job: Annotated[Path, typer.Argument(help="job YAML, e.g. jobs/quickstart.yaml")],
    data: Annotated[str | None, typer.Option(help="replace the job's data: STAR, shard folder or MRC folder")] = None,
    out: Annotated[str | None, typer.Option(help="replace the job's run directory")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a field: train.rounds=3")] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="leave bad volumes out (warned and counted)")] = False,
    force: Annotated[bool, typer.Option("--force", help="if the run dir holds another job's run, start this one "
                                        "in a fresh sibling folder (RUN-2, ...) instead of refusing")] = False,
) -> None:
    """Train Jim-Net on a job's subtomograms (pair-matching rounds); resumes a run dir that has checkpoints.

    The data are checked first (missing, truncated, NaN, constant, wrong-box or wrong-voxel-size volumes: exit 2);
    a rerun into an existing run must be the same job on the same data."""
    from jimray.train.driver import run_training

    overrides = list(set_ or [])
    overrides += [f"data.path={data}"] if data is not None else []
    overrides += [f"output.dir={out}"] if out is not None else []
    config = load_job(job, overrides)
    summary = run_training(config, command=["jimray", *sys.argv[1:]], skip_bad=skip_bad, force=force, notice=_notice)
    typer.echo(json.dumps(summary, indent=2))


def config_schema() -> None:
    """Print the job configuration's JSON schema (every key, type and default)."""
    from jimray.config import JobConfig

    typer.echo(json.dumps(JobConfig.model_json_schema(), indent=2))


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("config-schema")(config_schema)
