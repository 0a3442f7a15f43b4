"""``jimray ingest STAR --out DIR``: check a RELION particle set and convert it to Parquet shards."""

from __future__ import annotations

from pathlib import Path

import typer

from jimray.cli.errors import UserError


def _progress_bar():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    transient=True)


def ingest(
    star: Path = typer.Argument(..., help="RELION particle STAR file (rlnImageName -> .mrc / n@.mrcs)."),
    out: Path = typer.Option(..., "--out", help="Output folder for the Parquet shards (new or empty)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Convert the good files; list the bad in skipped.csv."),
    voxel_size: float | None = typer.Option(None, "--voxel-size", help="Voxel size in Angstrom (else STAR/MRC)."),
    tilt_range: float = typer.Option(60.0, "--tilt-range", help="Largest tilt angle in degrees (90 = no wedge)."),
    rows_per_shard: int = typer.Option(256, "--rows-per-shard", help="Subtomograms per Parquet shard."),
) -> None:
    """Check every referenced file (header, size, box, voxel size, finite values) and write Parquet shards."""
    from jimray.io.ingest import ingest_star
    from jimray.io.star import StarError

    with _progress_bar() as bar:
        task = bar.add_task(f"ingest {star.name}", total=None)
        try:
            report = ingest_star(star, out, skip_bad=skip_bad, voxel_size_angstrom=voxel_size,
                                 tilt_range_degrees=tilt_range, rows_per_shard=rows_per_shard,
                                 progress=lambda k, total: bar.update(task, advance=k, total=total))
        except (StarError, FileExistsError, ValueError) as exc:
            raise UserError(str(exc)) from None
    for spec, reason in report.bad:
        typer.echo(f"bad: {spec}: {reason}", err=True)
    if report.bad and not skip_bad:
        raise UserError(f"{len(report.bad)} of {report.n_particles} particle files in {star} are bad (listed above); "
                        "fix them or pass --skip-bad to convert the rest. Nothing was written.")
    if skip_bad and report.n_converted == 0:
        raise UserError(f"every one of the {report.n_particles} particle files in {star} is bad (listed above); "
                        "nothing to convert, nothing was written")
    skipped = f"; {len(report.bad)} skipped, listed in {out / 'skipped.csv'}" if skip_bad else ""
    typer.echo(f"wrote {report.n_converted} subtomograms (box {report.box_size}, {report.voxel_size_angstrom} A) "
               f"in {len(report.shards)} shards to {out}{skipped}")


def register(app: typer.Typer) -> None:
    app.command("ingest")(ingest)
