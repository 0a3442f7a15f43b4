"""``jimray bench io``: data-path throughput, ingest (MRC -> Parquet) and Ray Data reads, against the raw read.

In a temporary folder: ``n`` random ``box``^3 float32 volumes as single MRC files and a STAR file. Measured:

1. ingest (``jimray.io.ingest.ingest_star``: check + convert to Parquet shards), subtomograms/s and MB/s;
2. Ray Data read of the Parquet shards and of the MRC files (``read_subtomograms``, every batch iterated);
3. the physical limit in the same run: a plain sequential ``open().read()`` of the same bytes (Parquet files,
   MRC files), and, between the two, the Parquet decode alone (``read_shard``, pyarrow, no Ray).

Files are freshly written, so all reads come from the page cache (the bench does not drop caches on a shared
machine); the raw read is therefore a memory-bandwidth limit, the strictest comparison for Ray Data. Each Ray
read runs twice and the faster pass is reported (the first pays for worker start-up). Ray: an existing cluster
via ``RAY_ADDRESS``, else a local one (2 CPUs, no dashboard, auth off).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import typer

from jimray.bench.common import markdown_table, timer, write_results

MB = 1e6


def make_dataset(root: Path, n: int, box: int, seed: int = 0, progress=None) -> Path:
    """``n`` random volumes as ``root/mrc/p00000.mrc`` ... and ``root/particles.star``; returns the STAR path."""
    import pandas as pd

    from jimray.io.mrc import write_volume
    from jimray.io.star import write_particles

    rng = np.random.default_rng(seed)
    (root / "mrc").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        write_volume(root / "mrc" / f"p{i:05d}.mrc", rng.standard_normal((box, box, box), dtype=np.float32), 4.0)
        names.append(f"mrc/p{i:05d}.mrc")
        if progress:
            progress()
    write_particles(root / "particles.star", pd.DataFrame({"rlnImageName": names}), 4.0, box_size=box)
    return root / "particles.star"


def raw_read_seconds(files: list[Path]) -> tuple[float, int]:
    """Sequential ``open().read()`` of every file: (seconds, bytes)."""
    total = 0
    with timer() as t:
        for f in files:
            with open(f, "rb") as fh:
                total += len(fh.read())
    return t(), total


def ray_read_seconds(path: Path, batch_size: int, repeats: int = 2) -> tuple[float, float, int, int]:
    """Best of ``repeats`` full passes over ``read_subtomograms(path, normalize=False)``:
    (seconds, seconds to the first batch, rows, rows of the first batch), from the pass with the best total."""
    from jimray.data.reader import read_subtomograms

    best = (float("inf"), 0.0, 0, 0)
    for _ in range(repeats):
        rows, first, first_rows = 0, None, 0
        with timer() as t:
            ds = read_subtomograms(path, normalize=False)
            for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
                rows += len(batch["id"])
                if first is None:
                    first, first_rows = t(), len(batch["id"])
        if t() < best[0]:
            best = (t(), first, rows, first_rows)
    return best


def decode_seconds(files: list[Path]) -> float:
    """Sequential :func:`jimray.io.shards.read_shard` (Parquet decode to numpy, no Ray) of every shard."""
    from jimray.io.shards import read_shard

    with timer() as t:
        for f in files:
            read_shard(f, columns=["id", "volume"])
    return t()


def _start_ray():
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
    else:
        os.environ["RAY_AUTH_MODE"] = "disabled"
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    return True


def _row(stage, n, nbytes, seconds, raw_seconds=None):
    row = {"stage": stage, "subtomograms": n, "MB": nbytes / MB, "seconds": seconds,
           "subtomograms/s": n / seconds, "MB/s": nbytes / MB / seconds}
    if raw_seconds is not None:
        row["time / raw read"] = seconds / raw_seconds
    return row


def run(n: int, box: int, rows_per_shard: int, batch_size: int, workdir: Path, progress=None) -> tuple[dict, str]:
    """Run every measurement in ``workdir``; returns (results dict, Markdown table)."""
    from jimray.io.ingest import ingest_star
    from jimray.io.shards import list_shards

    load_before = os.getloadavg()[0]
    star = make_dataset(workdir, n, box, progress=progress)
    mrc_files = sorted((workdir / "mrc").glob("*.mrc"))
    with timer() as t:
        report = ingest_star(star, workdir / "shards", rows_per_shard=rows_per_shard)
    ingest_s = t()
    if not report.ok:
        raise RuntimeError(f"benchmark data failed its own check: {report.bad[:3]}")
    shard_files = list_shards(workdir / "shards")
    raw_mrc_s, mrc_bytes = raw_read_seconds(mrc_files)
    raw_pq_s, pq_bytes = raw_read_seconds(shard_files)
    decode_pq_s = decode_seconds(shard_files)
    started = _start_ray()
    try:
        ray_pq_s, first_pq_s, rows_pq, first_rows_pq = ray_read_seconds(workdir / "shards", batch_size)
        ray_mrc_s, first_mrc_s, rows_mrc, first_rows_mrc = ray_read_seconds(star, batch_size)
    finally:
        if started:
            import ray

            ray.shutdown()
    if rows_pq != n or rows_mrc != n:
        raise RuntimeError(f"Ray read {rows_pq} (Parquet) / {rows_mrc} (MRC) rows, expected {n}")
    rest_pq, rest_mrc = n - first_rows_pq, n - first_rows_mrc
    steady_pq_s, steady_mrc_s = ray_pq_s - first_pq_s, ray_mrc_s - first_mrc_s
    rows = [
        _row("ingest MRC -> Parquet (check + convert)", n, mrc_bytes, ingest_s),
        _row("raw read, Parquet files (open().read())", n, pq_bytes, raw_pq_s),
        _row("pyarrow decode, Parquet shards (read_shard, no Ray)", n, pq_bytes, decode_pq_s, raw_pq_s),
        _row("Ray Data read, Parquet shards (whole pass)", n, pq_bytes, ray_pq_s, raw_pq_s),
        _row("Ray Data read, Parquet shards (after 1st batch)", rest_pq, pq_bytes * rest_pq / n, steady_pq_s,
             raw_pq_s * rest_pq / n),
        _row("raw read, MRC files (open().read())", n, mrc_bytes, raw_mrc_s),
        _row("Ray Data read, MRC files via STAR (whole pass)", n, mrc_bytes, ray_mrc_s, raw_mrc_s),
        _row("Ray Data read, MRC files via STAR (after 1st batch)", rest_mrc, mrc_bytes * rest_mrc / n,
             steady_mrc_s, raw_mrc_s * rest_mrc / n),
    ]
    ratio = ray_pq_s / raw_pq_s
    steady_ratio = steady_pq_s / (raw_pq_s * rest_pq / n) if rest_pq else float("nan")
    load = (load_before, os.getloadavg()[0])
    columns = ["stage", "subtomograms", "MB", "seconds", "subtomograms/s", "MB/s", "time / raw read"]
    md = markdown_table(rows, columns)
    md += (f"\nParquet streaming / raw read of the same bytes: **{ratio:.1f}x** for a whole pass, "
           f"**{steady_ratio:.1f}x** after the first batch (goal: within 2x). Time to the first batch: "
           f"{first_pq_s:.2f} s (Parquet), {first_mrc_s:.2f} s (MRC). "
           f"{n} volumes of {box}^3 float32, {len(shard_files)} shards of {rows_per_shard} rows, "
           f"batch size {batch_size}; warm page cache; best of 2 passes for the Ray reads. "
           f"1-minute load average of the machine: {load[0]:.1f} before, {load[1]:.1f} after.\n")
    results = {"n": n, "box": box, "rows_per_shard": rows_per_shard, "batch_size": batch_size, "rows": rows,
               "parquet_ray_over_raw": ratio, "parquet_ray_over_raw_after_first_batch": steady_ratio,
               "first_batch_seconds": {"parquet": first_pq_s, "mrc": first_mrc_s},
               "goal_within_2x": bool(ratio <= 2.0), "load_average_1min": load}
    return results, md


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("io")
    def io_bench(
        n: int = typer.Option(2000, "--n", help="number of random subtomograms"),
        box: int = typer.Option(32, help="box size in voxels"),
        rows_per_shard: int = typer.Option(256, help="rows per Parquet shard"),
        batch_size: int = typer.Option(256, help="Ray Data batch size"),
        out: Path = typer.Option(Path("benchmarks"), help="folder for io.json / io.md"),
    ) -> None:
        """Ingest throughput and Ray Data read throughput (Parquet, MRC) against a raw sequential read."""
        from rich.progress import Progress

        from jimray.cli.errors import UserError

        if n < 1 or box < 2 or rows_per_shard < 1 or batch_size < 1:
            raise UserError("--n, --rows-per-shard and --batch-size must be >= 1 and --box >= 2")
        command = f"jimray bench io --n {n} --box {box} --rows-per-shard {rows_per_shard} --batch-size {batch_size}"
        with tempfile.TemporaryDirectory(prefix="jimray-bench-io-") as tmp, Progress(transient=True) as bar:
            task = bar.add_task("writing test MRC files", total=n)
            results, md = run(n, box, rows_per_shard, batch_size, Path(tmp), lambda: bar.advance(task))
        write_results(out, "io", results, md, command)
        typer.echo(md)
