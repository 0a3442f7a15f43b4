"""``jimray average``: class averages, gold-standard half maps, FSC and an HTML report from a particle STAR."""

from __future__ import annotations

from pathlib import Path

import typer

from jimray.cli.errors import UserError


def _warn(line: str) -> None:
    typer.secho(line, err=True, fg="yellow")


def register(app: typer.Typer) -> None:
    @app.command("average")
    def average(
        particles: Path = typer.Option(..., "--particles", help="particle STAR with rlnImageName, poses, classes"),
        out: Path = typer.Option(..., "--out", help="output folder (class_NNN*.mrc, fsc.csv, PNGs, report.html)"),
        iterations: int = typer.Option(3, "--iterations", min=0, help="template refinement iterations per half"),
        angular_step: float = typer.Option(30.0, "--angular-step", help="rotation search step (deg) when refining"),
        no_refine: bool = typer.Option(False, "--no-refine", help="average under the STAR poses as they are"),
        mask_radius: float = typer.Option(None, "--mask-radius", help="FSC/alignment mask radius in voxels"),
        tilt_range: float = typer.Option(60.0, "--tilt-range", help="largest tilt (deg); 60 = 30-deg wedge, 90 = none"),
        seed: int = typer.Option(0, "--seed", help="seed of the split into half sets (by particle id)"),
        skip_bad: bool = typer.Option(False, "--skip-bad", help="leave bad volumes out (warned and counted)"),
        overwrite: bool = typer.Option(False, "--overwrite", help="clear a non-empty --out first"),
    ) -> None:
        """Wedge-aware class averages with gold-standard FSC, written with a self-contained report.html."""
        from rich.progress import Progress

        from jimray.average.run import average_particles
        from jimray.io.outdir import check_out_dir

        if not particles.is_file():
            raise UserError(f"--particles {particles}: file not found; pass a particle STAR file")
        check_out_dir(out, overwrite, inputs=[particles])
        try:
            with Progress(transient=True) as bar:
                task = bar.add_task("averaging classes", total=None)
                summary = average_particles(
                    particles, out, iterations=iterations, angular_step_degrees=angular_step, refine=not no_refine,
                    mask_radius_voxels=mask_radius, tilt_range_degrees=tilt_range, seed=seed, skip_bad=skip_bad,
                    clear_out=overwrite, warn=_warn,
                    progress=lambda name, done, total: bar.update(task, completed=done, total=total, description=name),
                )
        except ValueError as exc:  # StarError, MRCError, AveragingError, BadInputError and bad numbers
            raise UserError(str(exc)) from None
        for c in summary.classes:
            typer.echo(f"{c.name}: {len(c.rows)} particles, FSC-0.143 resolution {c.resolution_angstrom:.1f} A")
        typer.echo(f"wrote {out / 'report.html'} ({summary.seconds:.1f} s)")
