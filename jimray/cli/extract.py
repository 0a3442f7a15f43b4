"""``jimray extract``: cut subtomograms at STAR coordinates from their tomograms into Parquet shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import typer

from jimray.cli.errors import UserError

COORDINATE_COLUMNS = ["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]
SKIPPED_CSV = "skipped.csv"


def _read_star(star: Path):
    from jimray.io.star import StarError, read_particles

    try:
        table = read_particles(star)
    except StarError as exc:
        raise UserError(str(exc)) from None
    missing = [c for c in ["rlnMicrographName", *COORDINATE_COLUMNS] if c not in table.particles.columns]
    if missing:
        raise UserError(f"{star}: missing column(s) {missing}; give a coordinate STAR (e.g. from jimray pick)")
    return table


def _truth(rows: pd.DataFrame, coords: np.ndarray) -> dict:
    """Ground truth of a simulation truth STAR (class numbers 1-based, RELION angles, sub-voxel shifts)."""
    angles = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    if not {"rlnClassNumber", *angles} <= set(rows.columns):
        raise UserError("--truth needs rlnClassNumber and rlnAngleRot/Tilt/Psi (a jimray simulate-tomogram STAR)")
    from jimray.pick.extract import sub_voxel_shifts

    return {"class": rows["rlnClassNumber"].to_numpy(np.int64) - 1, "euler_degrees": rows[angles].to_numpy(float),
            "shift_voxels": sub_voxel_shifts(coords)}


def _extract_one(tomogram: str, rows: pd.DataFrame, box: int, voxel, tilt_range, truth, out, shard_index):
    """Cut the rows of one tomogram into shards; returns (n written shards, skipped rows, voxel size)."""
    import torch

    from jimray.io.mrc import MRCError, read_volume
    from jimray.io.shards import write_shards
    from jimray.pick.extract import cut_boxes

    try:
        volume, header_voxel = read_volume(tomogram)
    except MRCError as exc:
        coords = rows[COORDINATE_COLUMNS].to_numpy(float)
        return 0, [(i, tomogram, *c, exc.reason) for i, c in zip(rows.index, coords, strict=True)], voxel
    voxel = voxel or header_voxel
    if voxel is None:
        raise UserError(f"{tomogram}: no voxel size in the STAR or the MRC header; pass --voxel-size")
    coords = rows[COORDINATE_COLUMNS].to_numpy(float)
    boxes, inside = cut_boxes(torch.from_numpy(volume), coords, box)
    skipped = [(i, tomogram, *c, f"box of {box} reaches outside the tomogram {volume.shape}")
               for i, c in zip(rows.index[~inside], coords[~inside], strict=True)]
    if not inside.any():
        return 0, skipped, voxel
    kept = rows[inside]
    part_truth = {k: np.asarray(v)[inside] for k, v in _truth(rows, coords).items()} if truth else None
    paths = write_shards(out, kept.index.to_numpy(np.int64), boxes.numpy(), voxel, tilt_range, tomogram,
                         truth=part_truth, start_index=shard_index)
    return len(paths), skipped, voxel


def register(app: typer.Typer) -> None:
    @app.command("extract")
    def extract(
        particles: Path = typer.Option(..., "--particles", help="STAR with rlnMicrographName, rlnCoordinateX/Y/Z"),
        box: int = typer.Option(..., "--box", min=4, help="box edge in voxels"),
        out: Path = typer.Option(..., "--out", help="output folder for the Parquet shards and skipped.csv"),
        tilt_range: float = typer.Option(60.0, "--tilt-range", help="largest tilt (deg); 90 = no wedge"),
        voxel_size: float = typer.Option(None, "--voxel-size", help="voxel size in Angstrom (default: STAR/MRC)"),
        truth: bool = typer.Option(False, "--truth", help="the STAR is a simulation truth file: keep classes/poses"),
    ) -> None:
        """Cut subtomograms at the STAR coordinates into Parquet shards (the ingest schema)."""
        from jimray.io.star import resolve_image_path

        table = _read_star(particles)
        if out.exists() and any(out.glob("*.parquet")):
            raise UserError(f"{out} already holds Parquet shards; pass a new or empty --out folder")
        rows = table.particles
        tomograms = [resolve_image_path(str(m), particles) for m in rows["rlnMicrographName"]]
        voxel, n_shards, skipped = voxel_size or table.voxel_size_angstrom, 0, []
        for tomogram, group in rows.groupby(pd.Series(tomograms, index=rows.index), sort=True):
            written, bad, voxel = _extract_one(tomogram, group, box, voxel, tilt_range, truth, out, n_shards)
            n_shards, skipped = n_shards + written, skipped + bad
        out.mkdir(parents=True, exist_ok=True)
        columns = ["row", "tomogram", "x", "y", "z", "reason"]
        pd.DataFrame(skipped, columns=columns).sort_values("row").to_csv(out / SKIPPED_CSV, index=False)
        for row, tomogram, x, y, z, reason in sorted(skipped):
            typer.echo(f"skipped particle {row} ({x:g}, {y:g}, {z:g}) of {tomogram}: {reason}", err=True)
        typer.echo(f"extracted {len(rows) - len(skipped)} of {len(rows)} particles into {n_shards} shards in {out}; "
                   f"{len(skipped)} skipped (listed in {out / SKIPPED_CSV})")
