"""``jimray bench capacity``: an ESTIMATE of subtomograms per GPU-hour (training and prediction) and of what a
10^6-subtomogram collection needs, from counted FLOPs and an assumed GPU throughput.

Nothing here runs on a GPU. FLOPs per pair are counted with ``torch.utils.flop_counter.FlopCounterMode``
(:func:`jimray.bench.model.flops_per_pair`: convolutions and matmuls; FFTs, ``grid_sample`` and element-wise
ops are not counted, so the estimate is optimistic by their share) on the job's model at its box size:

* training, per subtomogram and round: one embedding forward ``F(x, x)`` (the clustering pass) plus
  ``epochs_per_round`` training steps (forward + loss + backward of one pair);
* prediction, per subtomogram: two forwards (cluster pass: ``embed``; pose pass: particle against its
  cluster's reference); the template passes touch only the K most probable members and are left out.

Subtomograms per GPU-hour = ``peak * utilisation * 3600 / FLOPs per subtomogram``. The defaults assume an
H100 reaching 35% of ~60 TFLOP/s (FP32 matmuls/convolutions run as TF32 on tensor cores, dense; small 3-D
convolutions with 4-64 channels achieve ~30-40% of that). The same model's CPU speed is measured here
(:func:`jimray.bench.model.speed`) for comparison. Storage is exact arithmetic (float32 boxes, Parquet shards
hold the raw bytes uncompressed); the sampler's label index is measured with a real
:class:`jimray.train.sampler.PairSampler` at ``n`` ids, its target reservoirs computed from the job.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from jimray.bench.common import markdown_table, write_results
from jimray.config import JobConfig, ModelConfig, load_job

ASSUMED_PEAK_TFLOPS = 60.0
ASSUMED_UTILISATION = 0.35
GIB = 2.0**30


def flop_budget(model: ModelConfig, box_size: int, epochs_per_round: int = 1) -> dict[str, float]:
    """Counted GFLOP of one pair (forward; training step) and per subtomogram (one training round; predict)."""
    from jimray.bench.model import flops_per_pair

    flops = flops_per_pair(model, box_size)
    return {**flops,
            "train_round_gflop_per_subtomogram": flops["forward_gflop"] + epochs_per_round * flops["train_step_gflop"],
            "predict_gflop_per_subtomogram": 2.0 * flops["forward_gflop"]}


def per_gpu_hour(gflop_per_subtomogram: float, peak_tflops: float, utilisation: float) -> float:
    """Subtomograms per GPU-hour at ``peak_tflops * utilisation`` achieved."""
    if gflop_per_subtomogram <= 0 or peak_tflops <= 0 or not 0 < utilisation <= 1:
        raise ValueError("need positive GFLOP per subtomogram and peak, and utilisation in (0, 1]")
    return peak_tflops * utilisation * 1e12 * 3600.0 / (gflop_per_subtomogram * 1e9)


def sampler_index_bytes(n_ids: int, n_clusters: int, seed: int = 0) -> int:
    """Measured bytes of the sampler's label index (ids, labels, per-cluster grouping) at ``n_ids`` ids."""
    from jimray.train.sampler import PairSampler

    sampler = PairSampler(reservoir_per_cluster=1, seed=seed)
    rng = np.random.default_rng(seed)
    sampler.add_labels(np.arange(n_ids, dtype=np.int64), rng.integers(0, n_clusters, n_ids))
    sampler.labels_of(np.arange(min(n_ids, 10)))  # consolidates the index
    sampler.sample_pairs(1)  # builds the per-cluster grouping
    return sampler.memory_bytes()


def collection_needs(job: JobConfig, budget: dict, n_subtomograms: int, peak_tflops: float, utilisation: float,
                     index_bytes: int) -> dict:
    """GPU-hours, storage and sampler memory for ``n_subtomograms`` under ``job`` (rounds, K, box, reservoir)."""
    box, rounds = job.data.box_size, job.train.rounds
    k_max = job.gmm.n_components or max(job.gmm.candidates)
    box_bytes = 4 * box**3
    train_rate = per_gpu_hour(budget["train_round_gflop_per_subtomogram"], peak_tflops, utilisation)
    predict_rate = per_gpu_hour(budget["predict_gflop_per_subtomogram"], peak_tflops, utilisation)
    return {
        "n_subtomograms": n_subtomograms, "rounds": rounds, "k_max": k_max,
        "train_gpu_hours_per_round": n_subtomograms / train_rate,
        "train_gpu_hours": rounds * n_subtomograms / train_rate,
        "predict_gpu_hours": n_subtomograms / predict_rate,
        "shard_gib": n_subtomograms * box_bytes / GIB,
        "sampler_index_mib": index_bytes / 2**20,
        "sampler_reservoir_gib": k_max * job.train.reservoir_per_cluster * (box_bytes + 12) / GIB,
        "embeddings_gib": n_subtomograms * job.model.stages * job.model.feature_dim * 4 / GIB,
    }


def cpu_speed(job: JobConfig, batch_size: int, reps: int) -> dict:
    """Measured training / inference pairs per second of the job's model on this machine's CPU."""
    from jimray.bench.model import speed

    return speed(job.model, job.data.box_size, batch_size, "cpu", reps=reps)


def estimate(job: JobConfig, n_subtomograms: int, peak_tflops: float, utilisation: float,
             cpu_batch: int, cpu_reps: int) -> dict:
    """All numbers of the capacity estimate (module docstring) as one dict; ``cpu_reps = 0`` skips the CPU run."""
    budget = flop_budget(job.model, job.data.box_size, job.train.epochs_per_round)
    k_max = job.gmm.n_components or max(job.gmm.candidates)
    needs = collection_needs(job, budget, n_subtomograms, peak_tflops, utilisation,
                             sampler_index_bytes(n_subtomograms, k_max))
    result = {"job": job.name, "box": job.data.box_size, "epochs_per_round": job.train.epochs_per_round,
              "peak_tflops": peak_tflops, "utilisation": utilisation, "flops": budget, "collection": needs,
              "gpu_train_per_hour": per_gpu_hour(budget["train_round_gflop_per_subtomogram"], peak_tflops, utilisation),
              "gpu_predict_per_hour": per_gpu_hour(budget["predict_gflop_per_subtomogram"], peak_tflops, utilisation)}
    if cpu_reps > 0:
        cpu = cpu_speed(job, cpu_batch, cpu_reps)
        cpu["train_per_hour"] = 3600.0 / (1 / cpu["inference_pairs_per_s"] + job.train.epochs_per_round /
                                          cpu["train_pairs_per_s"])
        cpu["predict_per_hour"] = 3600.0 * cpu["inference_pairs_per_s"] / 2.0
        cpu["load_average_1min"] = os.getloadavg()[0]
        result["cpu"] = cpu
    return result


def markdown(r: dict) -> str:
    f, c = r["flops"], r["collection"]
    achieved = r["peak_tflops"] * r["utilisation"]
    lines = [
        f"**ESTIMATE, not a measurement** (no GPU was used): job `{r['job']}`, box {r['box']}, "
        f"{r['epochs_per_round']} epoch(s) per round. Assumed GPU: H100 at {r['utilisation']:.0%} of "
        f"{r['peak_tflops']:g} TFLOP/s (dense FP32-as-TF32) = {achieved:g} TFLOP/s achieved. FLOPs counted by "
        "`FlopCounterMode` (convolutions and matmuls only: FFTs, grid_sample and element-wise ops are not "
        "counted, so the GPU rates are upper bounds by their share).\n",
        markdown_table([{"quantity": "forward of one pair (GFLOP)", "value": f["forward_gflop"]},
                        {"quantity": "training step of one pair, fwd + bwd (GFLOP)", "value": f["train_step_gflop"]},
                        {"quantity": "training, per subtomogram per round (GFLOP)",
                         "value": f["train_round_gflop_per_subtomogram"]},
                        {"quantity": "prediction, per subtomogram (GFLOP)",
                         "value": f["predict_gflop_per_subtomogram"]},
                        {"quantity": "GPU training: subtomograms per GPU-hour per round (estimate)",
                         "value": r["gpu_train_per_hour"]},
                        {"quantity": "GPU prediction: subtomograms per GPU-hour (estimate)",
                         "value": r["gpu_predict_per_hour"]}], ["quantity", "value"]),
    ]
    if "cpu" in r:
        cpu = r["cpu"]
        lines.append(f"\nMeasured on this machine's CPU (all its cores, one process; same model, batch {cpu['batch']}; "
                     f"1-min load average {cpu['load_average_1min']:.1f} at the end): "
                     f"{cpu['train_pairs_per_s']:.3g} training pairs/s, {cpu['inference_pairs_per_s']:.3g} inference "
                     f"pairs/s = {cpu['train_per_hour']:.3g} subtomograms per machine-hour per training round and "
                     f"{cpu['predict_per_hour']:.3g} per machine-hour for prediction (model only, no data loading).\n")
    lines += [
        f"\nA collection of {c['n_subtomograms']:,} subtomograms ({c['rounds']} rounds, K up to {c['k_max']}):\n",
        markdown_table([
            {"need": "training GPU-hours per round", "value": c["train_gpu_hours_per_round"]},
            {"need": f"training GPU-hours, {c['rounds']} rounds", "value": c["train_gpu_hours"]},
            {"need": "prediction GPU-hours", "value": c["predict_gpu_hours"]},
            {"need": f"Parquet shards, {r['box']}^3 float32 (GiB)", "value": c["shard_gib"]},
            {"need": "sampler label index, measured (MiB)", "value": c["sampler_index_mib"]},
            {"need": "sampler target reservoirs, K x reservoir_per_cluster boxes (GiB)",
             "value": c["sampler_reservoir_gib"]},
            {"need": "embeddings of one round, float32, spread over the workers (GiB)", "value": c["embeddings_gib"]},
        ], ["need", "value"]),
    ]
    return "\n".join(lines)


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("capacity")
    def capacity(
        job: Annotated[Path, typer.Option(help="job whose model, box, rounds and K are costed")] = Path(
            "jobs/synechocystis.yaml"),
        n: Annotated[int, typer.Option(min=1, help="subtomograms in the collection")] = 1_000_000,
        peak_tflops: Annotated[float, typer.Option(help="assumed dense FP32/TF32 peak, TFLOP/s")] = ASSUMED_PEAK_TFLOPS,
        utilisation: Annotated[float, typer.Option(help="assumed achieved fraction of peak")] = ASSUMED_UTILISATION,
        cpu_batch: Annotated[int, typer.Option(min=1, help="batch of the CPU speed measurement")] = 8,
        cpu_reps: Annotated[int, typer.Option(min=0, help="timed CPU steps (0 = skip the CPU measurement)")] = 2,
        out: Annotated[Path, typer.Option(help="folder for capacity.json / capacity.md")] = Path("benchmarks"),
    ) -> None:
        """ESTIMATE of subtomograms per GPU-hour (counted FLOPs x assumed H100 throughput) and 10^6-scale needs."""
        result = estimate(load_job(job), n, peak_tflops, utilisation, cpu_batch, cpu_reps)
        text = markdown(result)
        write_results(out, "capacity", result, text, "jimray " + " ".join(sys.argv[1:]))
        typer.echo(text)
