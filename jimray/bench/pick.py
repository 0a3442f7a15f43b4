"""``jimray bench pick``: recall / precision of DoG picking on a simulated tomogram, and its throughput.

A tomogram of the six embedded structures (90-260 Angstrom across) is simulated with
:func:`jimray.simulate.tomogram.simulate_tomogram`; :func:`jimray.pick.pick_particles` picks it with one
particle diameter at several thresholds; a pick matches a true particle within the particle radius
(:func:`jimray.pick.match_picks`, one-to-one). Throughput is tomogram voxels per second of the whole
``pick_particles`` call (filter, statistics, peaks), in this process, best of ``--repeats``.
"""

from __future__ import annotations

import sys

import numpy as np
import typer

from jimray.bench.common import markdown_table, timer, write_results


def run_pick_benchmark(
    shape: tuple[int, int, int], n_particles: int, snr: float, diameter: float, thresholds: list[float],
    voxel_size: float, seed: int, min_distance: float, repeats: int,
) -> dict:
    from jimray.pick import match_picks, pick_particles
    from jimray.simulate.embedded import embedded_maps
    from jimray.simulate.tomogram import simulate_tomogram

    maps = embedded_maps(voxel_size, 32)
    sim = simulate_tomogram(list(maps.values()), shape, n_particles, 60.0, snr, seed, min_distance)
    radius = diameter / 2.0 / voxel_size
    lowest = min(thresholds)
    seconds = []
    for _ in range(max(1, repeats)):
        with timer() as elapsed:
            picks = pick_particles(sim.tomogram, diameter, voxel_size, threshold=lowest)
        seconds.append(elapsed())
    rows = []
    for threshold in sorted(thresholds):
        keep = picks.scores >= threshold  # higher thresholds only drop picks: the same peaks, fewer of them
        score = match_picks(picks.coords_xyz[keep], sim.coords, radius)
        matched = np.zeros(len(sim.coords), bool)
        matched[score.matches[:, 1]] = True
        row = {"threshold": threshold, "picked": score.n_picked, "true": score.n_true, "recall": score.recall,
               "precision": score.precision, "f1": score.f1, "mean_error_vox": score.mean_distance_voxels}
        for k, name in enumerate(maps):
            row[f"recall_{name}"] = float(matched[sim.classes == k].mean())
        rows.append(row)
    voxels = int(np.prod(shape))
    return {"rows": rows, "voxels": voxels, "seconds": min(seconds), "voxels_per_second": voxels / min(seconds),
            "structures": list(maps), "shape": list(shape), "n_particles": n_particles, "snr": snr,
            "particle_diameter_angstrom": diameter, "voxel_size_angstrom": voxel_size, "seed": seed}


def _markdown(result: dict) -> str:
    names = result["structures"]
    columns = ["threshold", "picked", "true", "recall", "precision", "f1", "mean_error_vox"]
    per_class = [{"threshold": r["threshold"], **{n: r[f"recall_{n}"] for n in names}} for r in result["rows"]]
    shape = "x".join(map(str, result["shape"]))
    return (
        f"Tomogram {shape} voxels at {result['voxel_size_angstrom']:g} A, {result['n_particles']} particles of "
        f"{len(names)} embedded structures, SNR {result['snr']:g}, 30-degree missing wedge, seed {result['seed']}; "
        f"picked with --particle-diameter {result['particle_diameter_angstrom']:g}; match = within the particle "
        f"radius.\n\n" + markdown_table(result["rows"], columns)
        + "\nRecall per structure:\n\n" + markdown_table(per_class, ["threshold", *names])
        + f"\nThroughput (pick_particles, one process): {result['voxels_per_second'] / 1e6:.2f} M voxels/s "
        f"({result['voxels'] / 1e6:.1f} M voxels in {result['seconds']:.2f} s).\n"
    )


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("pick")
    def pick(
        out: str = typer.Option("benchmarks", "--out", help="folder for pick.json / pick.md"),
        shape: tuple[int, int, int] = typer.Option((64, 256, 256), "--shape", help="tomogram Z Y X (voxels)"),
        particles: int = typer.Option(100, "--particles", help="particles in the tomogram"),
        snr: float = typer.Option(0.1, "--snr", help="var(signal in a particle box)/var(noise)"),
        diameter: float = typer.Option(150.0, "--particle-diameter", help="picking diameter in Angstrom"),
        thresholds: list[float] = typer.Option([3.0, 4.0, 5.0, 6.0], "--threshold", help="thresholds (repeatable)"),
        voxel_size: float = typer.Option(10.0, "--voxel-size", help="voxel size in Angstrom"),
        min_distance: float = typer.Option(24.0, "--min-distance", help="voxels between particle centres"),
        seed: int = typer.Option(0, "--seed", help="simulation seed"),
        repeats: int = typer.Option(3, "--repeats", help="timed picking runs (best is reported)"),
    ) -> None:
        """Recall/precision of DoG picking on a simulated tomogram, and picking throughput (voxels/s)."""
        result = run_pick_benchmark(shape, particles, snr, diameter, thresholds, voxel_size, seed, min_distance,
                                    repeats)
        md = _markdown(result)
        typer.echo(md)
        command = "jimray bench pick " + " ".join(sys.argv[3:]) if len(sys.argv) > 3 else "jimray bench pick"
        write_results(out, "pick", result, md, command)
