"""``jimray simulate``: a simulated data set (STAR + MRC + Parquet shards) with ground-truth classes and poses."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import typer

from jimray.cli.errors import UserError


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def _check_out(out: Path, overwrite: bool) -> None:
    from jimray.io.simulated import STAR_NAME

    if (out / STAR_NAME).exists() and not overwrite:
        raise UserError(f"{out / STAR_NAME} already exists: pass another --out folder or --overwrite")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: pass a folder path")


@contextlib.contextmanager
def _user_errors():
    """Library input errors (bad structure file, bad numbers) -> one-line UserError; warnings -> one line each."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            yield
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from None
    for warning in caught:
        if issubclass(warning.category, UserWarning):
            typer.secho(f"warning: {warning.message}", err=True, fg="yellow")


def register(app: typer.Typer) -> None:
    @app.command("simulate")
    def simulate(
        out: Path = typer.Option(..., "--out", help="output folder (particles.star, subtomograms/, shards/)"),
        structure: list[str] = typer.Option(None, "--structure", help="PDB/mmCIF file, or FILE:PREFIX to keep "
                                            "chains starting with PREFIX (repeatable); default: 6 embedded ones"),
        per_class: int = typer.Option(50, "--per-class", min=1, help="subtomograms per structure"),
        snr: float = typer.Option(0.1, "--snr", help="var(signal)/var(noise); 'inf' for no noise"),
        box: int = typer.Option(32, "--box", min=4, help="box edge in voxels"),
        voxel_size: float = typer.Option(10.0, "--voxel-size", help="voxel size in Angstrom"),
        tilt_range: float = typer.Option(60.0, "--tilt-range", help="largest tilt (deg); 60 = 30-deg wedge, 90 = none"),
        resolution: float = typer.Option(None, "--resolution",
                                         help="map resolution in A (default 2 x voxel size; embedded maps: >= 12)"),
        ctf: bool = typer.Option(False, "--ctf/--no-ctf", help="apply a 3D CTF (300 kV, Cs 2.7 mm, 7% amplitude)"),
        defocus_um: float = typer.Option(3.0, "--defocus-um", help="defocus in micrometres (with --ctf)"),
        max_shift: float = typer.Option(2.0, "--max-shift", help="largest shift per axis, voxels"),
        seed: int = typer.Option(0, "--seed", help="random seed (same seed, same data set)"),
        figure: Path = typer.Option(None, "--figure", help="also write a PNG of central slices at SNR inf/0.1/0.01"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing data set in --out"),
    ) -> None:
        """Simulate subtomograms of known structures with known classes and poses."""
        from jimray.io.simulated import simulate_dataset, structure_maps, write_simulated_dataset
        from jimray.simulate.subtomogram import CTFParams

        _check_out(out, overwrite)
        params = dict(structures=structure or None, per_class=per_class, snr=snr, box=box, seed=seed,
                      voxel_size_angstrom=voxel_size, tilt_range_degrees=tilt_range, resolution_angstrom=resolution,
                      max_shift_voxels=max_shift)
        with _user_errors():
            ctf_params = CTFParams(defocus_um=defocus_um) if ctf else None
            with _progress() as bar:
                task = bar.add_task("simulating", total=None)
                sim, names = simulate_dataset(**params, ctf=ctf_params, progress=lambda k: bar.update(task, advance=k))
                bar.update(task, total=len(sim), completed=len(sim))
                task = bar.add_task("writing", total=len(sim))
                meta = {**params, "structures": [str(s) for s in structure or []] or "embedded", "ctf": ctf_params}
                star = write_simulated_dataset(out, sim, voxel_size, tilt_range, names, metadata=meta,
                                               progress=lambda k: bar.update(task, advance=k))
            typer.echo(f"wrote {len(sim)} subtomograms of {len(names)} structures: {star}")
            if figure is not None:
                _plot(figure, structure_maps(structure or None, voxel_size, box, resolution), tilt_range, seed)


def _plot(figure: Path, maps, tilt_range: float, seed: int) -> None:
    from jimray.io.plots import plot_simulated_slices

    plot_simulated_slices(figure, maps, tilt_range_degrees=tilt_range, seed=seed)
    typer.echo(f"wrote figure {figure}")
