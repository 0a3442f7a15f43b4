"""``jimray bench train``: training throughput with 1 and 2 workers, and clustering accuracy per round on the
simulated six-structure benchmark (the embedded structures) at chosen SNRs, against the paper's Jim-Net."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer

from jimray.bench.common import markdown_table, write_results
from jimray.config import load_job
from jimray.run_files import METRICS_CSV

PAPER_ACCURACY = {100.0: 100.0, 0.1: 99.7, 0.05: 96.1, 0.03: 85.5, 0.01: 48.1}
JOBS = Path(__file__).resolve().parents[2] / "jobs"


def _job_overrides(snr: float, per_class: int, rounds: int, epochs: int, out: Path) -> list[str]:
    return [f"data.simulate_snr={snr}", f"data.simulate_per_class={per_class}", f"train.rounds={rounds}",
            f"train.epochs_per_round={epochs}", f"output.dir={out}"]


def _snr_job(snr: float) -> Path | None:
    path = JOBS / f"snr_{snr:g}.yaml"
    return path if path.is_file() else None


def measure_throughput(workers: int, per_class: int, out: Path, total_cpus: float) -> dict:
    """One round (fixed K = 6) with ``workers`` DDP workers; the round's step timings."""
    from jimray.train.driver import run_training

    cpus = max(0.25, round((total_cpus - 1.0) / workers, 2))
    overrides = _job_overrides(0.1, per_class, 1, 1, out) + [
        "gmm.n_components=6", f"scaling.num_workers={workers}", f"scaling.cpus_per_worker={cpus}"]
    config = load_job(_snr_job(0.1), overrides)
    run_training(config, command=["jimray", "bench", "train"])
    row = pd.read_csv(out / METRICS_CSV).iloc[-1]
    n = int(row["n_subtomograms"])
    return {"workers": workers, "cpus_per_worker": cpus, "subtomograms": n,
            "embed_per_second": n / row["seconds_embed"], "train_pairs_per_second": row["pairs_per_second"],
            "seconds_cluster": row["seconds_cluster"], "seconds_round": row["seconds"]}


def measure_accuracy(snr: float, per_class: int, rounds: int, epochs: int, out: Path) -> list[dict]:
    """Train on the simulated set at ``snr``; clustering accuracy (percent) after each round."""
    from jimray.train.driver import run_training

    config = load_job(_snr_job(snr), _job_overrides(snr, per_class, rounds, epochs, out))
    run_training(config, command=["jimray", "bench", "train"])
    frame = pd.read_csv(out / METRICS_CSV)
    return [{"snr": snr, "round": int(r["round"]), "K": int(r["n_clusters"]),
             "clustering_accuracy": 100.0 * float(r["clustering_accuracy"]),
             "paper_jimnet": PAPER_ACCURACY.get(snr, float("nan")), "loss_total": float(r["loss_total"]),
             "seconds_round": float(r["seconds"])} for _, r in frame.iterrows()]


def bench_train(
    snr: Annotated[list[float], typer.Option(help="SNR levels for the accuracy runs")] = [0.1, 0.01],  # noqa: B006
    per_class: Annotated[int, typer.Option(help="subtomograms per structure (6 structures)")] = 60,
    rounds: Annotated[int, typer.Option(help="pair-matching rounds per accuracy run")] = 4,
    epochs: Annotated[int, typer.Option(help="epochs per round")] = 2,
    workers: Annotated[list[int], typer.Option(help="worker counts for the throughput runs")] = [1, 2],  # noqa: B006
    throughput_per_class: Annotated[int, typer.Option(help="per structure, throughput runs")] = 30,
    out: Annotated[Path, typer.Option(help="where the JSON and Markdown go")] = Path("benchmarks"),
) -> None:
    """Training throughput (1, 2 workers) and clustering accuracy per round on the simulated benchmark."""
    import os

    import ray

    from jimray.ray_setup import init_ray

    init_ray()
    total_cpus = float(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="jimray-bench-train-") as tmp:
        speed = [measure_throughput(w, throughput_per_class, Path(tmp) / f"speed{w}", total_cpus) for w in workers]
        acc = [r for s in snr for r in measure_accuracy(s, per_class, rounds, epochs, Path(tmp) / f"snr{s:g}")]
    md = "### Training throughput (box 32, one round, K = 6)\n\n" + markdown_table(
        speed, ["workers", "cpus_per_worker", "subtomograms", "embed_per_second", "train_pairs_per_second",
                "seconds_cluster", "seconds_round"])
    md += (f"\n### Clustering accuracy per round (six embedded structures x {per_class}, 30-degree wedge, "
           f"{epochs} epochs/round)\n\n") + markdown_table(
        acc, ["snr", "round", "K", "clustering_accuracy", "paper_jimnet", "loss_total", "seconds_round"])
    command = "jimray bench train " + " ".join(sys.argv[3:])
    write_results(out, "train", {"throughput": speed, "accuracy": acc}, md, command)
    typer.echo(md)


def register(bench_app: typer.Typer) -> None:
    bench_app.command("train")(bench_train)
