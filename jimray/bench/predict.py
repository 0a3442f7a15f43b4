"""``jimray bench predict``: throughput (subtomograms/s) of ``jimray predict``'s Ray Data actor passes.

A few hundred simulated subtomograms (six embedded structures, box 32, SNR 0.1, 30-degree wedge) are written
as Parquet shards; the run is an untrained Jim-Net (default model config) with PCA + a K=6 GMM fitted on its
embeddings, saved like a training round (prediction costs the same whatever the weights). Measured, with 1
and 2 actors (one GPU each when the cluster has GPUs): the cluster pass (:class:`ClusterPredictor`), the pose
pass (:class:`PosePredictor` against the most probable member of each cluster) and the whole ``predict``
(cluster pass, one template iteration, pose pass, STAR + references; no averaging). Wall times include
actor start-up (model load) and reading the shards; the in-process row (no Ray) is the model's own rate.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import typer
import yaml

from jimray.bench.common import markdown_table, write_results
from jimray.run_files import MODEL_DIR, RUN_CONFIG

N_CLUSTERS = 6


def build_untrained_run(run_dir: Path, volumes: torch.Tensor, n_clusters: int, seed: int = 0) -> None:
    """Write ``run_dir`` (config.yaml + model/) for an untrained default Jim-Net with PCA + GMM on its embeddings."""
    from jimray.cluster.gmm import GaussianMixture
    from jimray.cluster.pca import fit_pca
    from jimray.config import load_job
    from jimray.model.jimnet import JimNet
    from jimray.train.state import RoundState, save_round_state

    config = load_job(None, [f"data.box_size={volumes.shape[-1]}", f"gmm.n_components={n_clusters}"])
    torch.manual_seed(seed)
    model = JimNet(config.model, n_clusters).eval()
    with torch.no_grad():
        embeddings = torch.cat([model.embed(chunk).double() for chunk in volumes.split(32)])
    pca = fit_pca(embeddings, config.gmm.pca_dims)
    gmm = GaussianMixture(n_clusters, reg_covar=config.gmm.reg_covar, random_state=seed).fit(pca.transform(embeddings))
    save_round_state(run_dir / MODEL_DIR, RoundState(1, n_clusters, model.state_dict(), None, gmm.get_state(),
                                                   pca.get_state(), config=config.model_dump(mode="json")))
    (run_dir / RUN_CONFIG).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def _simulate(folder: Path, per_class: int, box: int, seed: int) -> tuple[Path, torch.Tensor]:
    from jimray.data.reader import normalize_batch
    from jimray.io.simulated import simulate_dataset, write_simulated_dataset

    sim, names = simulate_dataset(None, per_class=per_class, snr=0.1, box=box, voxel_size_angstrom=10.0,
                                  tilt_range_degrees=60.0, seed=seed)
    write_simulated_dataset(folder, sim, 10.0, 60.0, names, rows_per_shard=32)
    return folder / "shards", torch.from_numpy(normalize_batch({"volume": sim.volumes.numpy()})["volume"])


def _in_process_rate(run_dir: Path, volumes: torch.Tensor, batch_size: int) -> float:
    from jimray.predict.run import load_trained_run

    run = load_trained_run(run_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    for chunk in volumes.split(batch_size):
        run.cluster_probabilities(chunk)
    return len(volumes) / (time.perf_counter() - start)


def _passes(run_dir: Path, shards: Path, actors: int, batch_size: int, say) -> list[dict]:
    import ray

    from jimray.data.reader import read_subtomograms
    from jimray.predict.pipeline import cluster_table, predict, predict_poses
    from jimray.predict.predictors import actor_resources
    from jimray.predict.run import load_trained_run
    from jimray.predict.templates import fetch_volumes

    run = load_trained_run(run_dir)
    ds = read_subtomograms(shards, box_size=run.config.data.box_size)
    run_ref, rows = ray.put(run.payload()), []
    resources = actor_resources(actors)
    per_actor = "1 GPU" if resources["num_gpus"] else f"{resources['num_cpus']:g} CPU"
    where = f"{resources['size']} x {per_actor}"
    start = time.perf_counter()
    table = cluster_table(ds, run_ref, actors=actors, batch_size=batch_size)
    rows.append({"pass": "cluster (ClusterPredictor)", "actors": where, "seconds": time.perf_counter() - start})
    best = table.best_members()
    volumes = fetch_volumes(ds, best.values())
    references = np.stack([volumes[best[k]] if k in best else np.zeros_like(next(iter(volumes.values())))
                           for k in range(run.n_clusters)])
    start = time.perf_counter()
    predict_poses(ds, run_ref, ray.put(references), ray.put(table), actors=actors, batch_size=batch_size)
    rows.append({"pass": "pose (PosePredictor)", "actors": where, "seconds": time.perf_counter() - start})
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        predict(run_dir, shards, out, actors=actors, batch_size=batch_size, iterations=1, average=False)
        rows.append({"pass": "whole predict (1 template iteration)", "actors": where,
                     "seconds": time.perf_counter() - start})
    for row in rows:
        row["subtomograms"] = len(table)
        row["subtomograms_per_s"] = len(table) / row["seconds"]
        say(row)
    return rows


def run(per_class: int, box: int, batch_size: int, actor_counts: list[int], seed: int, say) -> tuple[dict, str]:
    from jimray.ray_setup import init_ray

    with tempfile.TemporaryDirectory() as tmp:
        shards, volumes = _simulate(Path(tmp) / "data", per_class, box, seed)
        run_dir = Path(tmp) / "run"
        build_untrained_run(run_dir, volumes, N_CLUSTERS, seed)
        rate = _in_process_rate(run_dir, volumes, batch_size)
        rows = [{"pass": "cluster, in-process (no Ray)", "actors": "driver", "subtomograms": len(volumes),
                 "seconds": len(volumes) / rate, "subtomograms_per_s": rate}]
        say(rows[0])
        init_ray()
        for actors in actor_counts:
            rows += _passes(run_dir, shards, actors, batch_size, say)
    results = {"settings": {"per_class": per_class, "box": box, "batch_size": batch_size, "snr": 0.1,
                            "n_clusters": N_CLUSTERS, "model": "default ModelConfig, untrained"}, "rows": rows}
    md = (f"{len(volumes)} simulated subtomograms (box {box}, SNR 0.1, 30-degree wedge), untrained default Jim-Net, "
          f"K={N_CLUSTERS}, batch {batch_size}. Wall times include actor start-up (model load) and shard reads.\n\n")
    md += markdown_table(rows, ["pass", "actors", "subtomograms", "seconds", "subtomograms_per_s"])
    return results, md


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("predict")
    def predict_bench(
        per_class: int = typer.Option(50, help="simulated subtomograms per structure (6 structures)"),
        box: int = typer.Option(32, help="box size in voxels"),
        batch_size: int = typer.Option(16, help="subtomograms per batch"),
        actors: list[int] = typer.Option([1, 2], help="actor pool sizes to measure (repeat the option)"),
        seed: int = typer.Option(0, help="simulation seed"),
        out: Path = typer.Option(Path("benchmarks"), help="folder for predict.json / predict.md"),
    ) -> None:
        """Throughput of jimray predict's actor passes (cluster, pose, whole) with 1 and 2 actors."""
        from jimray.cli.errors import UserError

        if per_class < 1 or box < 16 or batch_size < 1 or min(actors) < 1:
            raise UserError("--per-class, --batch-size and --actors must be >= 1 and --box >= 16")
        command = (f"jimray bench predict --per-class {per_class} --box {box} --batch-size {batch_size} "
                   + " ".join(f"--actors {a}" for a in actors))
        results, md = run(per_class, box, batch_size, actors, seed, lambda row: typer.echo(
            {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
        write_results(out, "predict", results, md, command)
        typer.echo(md)
