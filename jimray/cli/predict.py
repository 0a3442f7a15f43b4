"""``jimray predict RUN_DIR --data PATH --out DIR``: clusters, references and poses from a trained run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from jimray.cli.errors import UserError


def predict(
    run_dir: Annotated[Path, typer.Argument(help="run directory of `jimray train` (config.yaml + model/)")],
    data: Annotated[Path, typer.Option(help="subtomograms: Parquet shard folder, STAR file or MRC folder")],
    out: Annotated[Path, typer.Option(help="output folder: particles.star, class_NNN.mrc, report.html")],
    actors: Annotated[int, typer.Option(min=1, help="model actors (one GPU each when there are GPUs)")] = 2,
    batch_size: Annotated[int, typer.Option(min=1, help="subtomograms per batch")] = 16,
    iterations: Annotated[int, typer.Option(min=0, help="template align-and-average iterations")] = 2,
    initial: Annotated[str, typer.Option(help="first template: 'best' (most probable member) or 'mean'")] = "best",
    no_average: Annotated[bool, typer.Option("--no-average", help="skip half maps, FSC and report.html")] = False,
    voxel_size: Annotated[float | None, typer.Option("--voxel-size", min=0.001, help="Angstrom (default: "
                          "the run's data.voxel_size_angstrom, else shards / STAR optics / MRC headers)")] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="leave bad volumes out (warned and counted)")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="clear a non-empty --out first")] = False,
) -> None:
    """Assign every subtomogram to a cluster, estimate the cluster references and each particle's pose."""
    from jimray.io.outdir import check_out_dir
    from jimray.predict.pipeline import predict as run_predict

    check_out_dir(out, overwrite, inputs=[run_dir, data])
    try:
        summary = run_predict(run_dir, data, out, actors=actors, batch_size=batch_size, iterations=iterations,
                              initial=initial, average=not no_average, progress=typer.echo,
                              voxel_size_angstrom=voxel_size, skip_bad=skip_bad, clear_out=overwrite)
    except (ValueError, KeyError) as exc:  # RunError, reader and STAR errors are ValueErrors naming the file
        raise UserError(str(exc.args[0]) if exc.args else str(exc)) from None
    accuracy = "" if summary.clustering_accuracy is None else f", accuracy {100 * summary.clustering_accuracy:.1f}%"
    typer.echo(f"{summary.n_particles} subtomograms, cluster sizes {summary.cluster_sizes}{accuracy}")
    typer.echo(f"wrote {summary.star_path} and {len(summary.reference_paths)} references ({summary.seconds:.1f} s); "
               f"averaging: {summary.averaging_note}")


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)
