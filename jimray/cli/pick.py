"""``jimray pick``: DoG particle picking in tomograms -> RELION coordinate STAR files; and
``jimray simulate-tomogram``: a simulated tomogram (MRC) with its true particle coordinates (STAR)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import typer

from jimray.cli.errors import UserError

COMBINED_STAR = "picks.star"
SIM_TOMOGRAM = "tomogram.mrc"
SIM_TRUTH_STAR = "tomogram_truth.star"
SIM_CLASSES = "classes.csv"


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def coordinate_table(micrograph: str, coords_xyz: np.ndarray, scores: np.ndarray | None = None) -> pd.DataFrame:
    """RELION coordinate rows: ``rlnMicrographName``, ``rlnCoordinateX/Y/Z`` (voxels, RELION's pixels) and
    ``rlnAutopickFigureOfMerit`` when ``scores`` are given."""
    table = pd.DataFrame({
        "rlnMicrographName": [micrograph] * len(coords_xyz),
        "rlnCoordinateX": coords_xyz[:, 0], "rlnCoordinateY": coords_xyz[:, 1], "rlnCoordinateZ": coords_xyz[:, 2],
    })
    if scores is not None:
        table["rlnAutopickFigureOfMerit"] = scores
    return table


def _star_names(tomograms: list[Path], out: Path) -> dict[str, Path]:
    names = {str(t.resolve()): out / f"{t.stem}_picks.star" for t in tomograms}
    if len(set(names.values())) != len(names):
        raise UserError("two tomograms share a file name (stem); rename them or pick them in separate runs")
    missing = [str(t) for t in tomograms if not t.is_file()]
    if missing:
        raise UserError(f"tomogram file(s) not found: {', '.join(missing)}; check the paths")
    return names


def _check_tomograms(tomograms: list[Path], voxel_size: float | None, skip_bad: bool) -> list[Path]:
    """The validation pass before any Ray work (:mod:`jimray.io.validate`): truncated, unreadable, NaN or constant
    tomograms, and ones without a voxel size; returns the tomograms to pick (``skip_bad`` leaves the bad out)."""
    from jimray.io.validate import Problem, check_volumes

    specs = [str(t) for t in tomograms]
    found = check_volumes(specs, source="the tomograms", cubic=False, check_voxel=False, voxel_size_angstrom=voxel_size)
    if voxel_size is None:
        from jimray.io.validate import header_info

        bad = found.bad_specs
        found.problems += [Problem(s, "no voxel size in its MRC header", "pass --voxel-size (Angstrom)")
                           for s in specs if s not in bad and header_info(s)[1] is None]
    skip = found.enforce(skip_bad, lambda line: typer.secho(line, err=True, fg="yellow"))
    return [t for t in tomograms if str(t) not in skip]


def _pick_and_write(paths: list[Path], settings, stars: dict[str, Path]) -> tuple[list[pd.DataFrame], float]:
    """Stream the picks of every tomogram from Ray and write its STAR as soon as it is done."""
    from jimray.data.pick import pick_tomograms
    from jimray.io.star import write_particles

    tables, voxel = [], None
    with _progress() as bar:
        task = bar.add_task("picking", total=None)
        for result in pick_tomograms(paths, settings, lambda k, n: bar.update(task, completed=k, total=n)):
            table = coordinate_table(result.path, result.picks.coords_xyz, result.picks.scores)
            write_particles(stars[result.path], table, result.voxel_size_angstrom)
            bar.console.print(f"{Path(result.path).name}: {len(table)} picks -> {stars[result.path]}")
            tables.append(table)
            if voxel is not None and abs(voxel - result.voxel_size_angstrom) > 1e-6:
                typer.secho(f"warning: {result.path} has voxel size {result.voxel_size_angstrom:g} A, not "
                            f"{voxel:g} A; {COMBINED_STAR} states {voxel:g} A", err=True, fg="yellow")
            voxel = voxel or result.voxel_size_angstrom
    return tables, voxel


def register(app: typer.Typer) -> None:
    @app.command("pick")
    def pick(
        tomograms: list[Path] = typer.Argument(..., help="tomogram MRC files (z, y, x)"),
        particle_diameter: float = typer.Option(..., "--particle-diameter", help="particle diameter in Angstrom"),
        threshold: float = typer.Option(3.0, "--threshold", help="peak threshold in noise-std units of the DoG map"),
        out: Path = typer.Option(..., "--out", help="output folder: one STAR per tomogram + picks.star"),
        edge_margin: float = typer.Option(0.0, "--edge-margin", help="ignore peaks this close to a face (voxels)"),
        min_distance: float = typer.Option(None, "--min-distance", help="voxels between picks (default: radius)"),
        voxel_size: float = typer.Option(None, "--voxel-size", help="voxel size in Angstrom (default: MRC header)"),
        invert: bool = typer.Option(False, "--invert", help="particles are dark (raw contrast): flip the sign"),
        skip_bad: bool = typer.Option(False, "--skip-bad", help="leave bad tomograms out (warned and counted)"),
    ) -> None:
        """Pick particles with a difference-of-Gaussian filter; one Ray task per tomogram (or z-slab)."""
        from jimray.data.pick import PickSettings
        from jimray.io.star import write_particles
        from jimray.ray_setup import init_ray

        stars = _star_names(tomograms, out)
        tomograms = _check_tomograms(tomograms, voxel_size, skip_bad)
        settings = PickSettings(particle_diameter, threshold, edge_margin, min_distance, voxel_size, invert)
        out.mkdir(parents=True, exist_ok=True)
        init_ray()
        try:
            tables, voxel = _pick_and_write([t.resolve() for t in tomograms], settings, stars)
        except ValueError as exc:  # bad MRC (MRCError), missing voxel size, bad numbers
            raise UserError(str(exc)) from None
        write_particles(out / COMBINED_STAR, pd.concat(tables, ignore_index=True), voxel)
        typer.echo(f"{sum(map(len, tables))} picks in {len(tables)} tomograms: {out / COMBINED_STAR}")

    @app.command("simulate-tomogram")
    def simulate_tomogram_command(
        out: Path = typer.Option(..., "--out", help="output folder (tomogram.mrc, tomogram_truth.star, classes.csv)"),
        shape: tuple[int, int, int] = typer.Option((64, 256, 256), "--shape", help="tomogram size Z Y X (voxels)"),
        particles: int = typer.Option(100, "--particles", min=0, help="number of particles"),
        snr: float = typer.Option(0.1, "--snr", help="var(signal in a particle box)/var(noise); 'inf' for none"),
        tilt_range: float = typer.Option(60.0, "--tilt-range", help="largest tilt (deg); 60 = 30-deg wedge, 90 = none"),
        voxel_size: float = typer.Option(10.0, "--voxel-size", help="voxel size in Angstrom"),
        box: int = typer.Option(32, "--box", min=4, help="box of the embedded maps (voxels)"),
        min_distance: float = typer.Option(None, "--min-distance", help="voxels between centres (default: box)"),
        structure: list[str] = typer.Option(None, "--structure", help="embedded structure name (repeatable)"),
        seed: int = typer.Option(0, "--seed", help="random seed"),
    ) -> None:
        """Simulate a tomogram of embedded structures at random positions and orientations, with the truth."""
        from jimray.io.mrc import write_volume
        from jimray.io.star import write_particles
        from jimray.simulate.embedded import embedded_maps
        from jimray.simulate.tomogram import simulate_tomogram

        try:
            maps = embedded_maps(voxel_size, box, names=structure or None)
            sim = simulate_tomogram(list(maps.values()), shape, particles, tilt_range, snr, seed, min_distance)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        out.mkdir(parents=True, exist_ok=True)
        write_volume(out / SIM_TOMOGRAM, sim.tomogram.cpu().numpy(), voxel_size)
        table = coordinate_table(SIM_TOMOGRAM, sim.coords)
        table["rlnClassNumber"] = sim.classes + 1
        for i, name in enumerate(("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
            table[name] = sim.euler_degrees[:, i]
        write_particles(out / SIM_TRUTH_STAR, table, voxel_size)
        pd.DataFrame({"rlnClassNumber": np.arange(1, len(maps) + 1), "structure": list(maps)}).to_csv(
            out / SIM_CLASSES, index=False)
        typer.echo(f"wrote {out / SIM_TOMOGRAM} {tuple(shape)} at {voxel_size:g} A and {len(table)} true "
                   f"coordinates: {out / SIM_TRUTH_STAR}")
