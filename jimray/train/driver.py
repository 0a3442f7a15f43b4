"""The driver of ``jimray train``: Ray set-up, data, sampler actor, TorchTrainer, run-directory records.

The run directory (``output.dir``) holds ``config.yaml``, ``run.json``, ``metrics.csv``, ``summary.json``,
``metrics.png``, ``checkpoints/`` (Ray Train storage: one checkpoint per round) and ``model/`` (the last
round's checkpoint, which ``jimray predict`` loads). Running the same job again with the same run
directory resumes from the last checkpoint rather than starting again; a different job or other data is refused
before anything is written (:mod:`jimray.train.rundir`, which also writes ``data.json``), and the data are
validated first (:mod:`jimray.io.validate`).
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from pathlib import Path

import ray
import ray.data
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from jimray.config import ConfigError, JobConfig
from jimray.data.reader import is_parquet_input, read_subtomograms
from jimray.ray_setup import init_ray, quiet_data_progress
from jimray.run_files import CHECKPOINTS_DIR, MODEL_DIR, SUMMARY_JSON
from jimray.train.loop import FAULT_ENV, train_loop_per_worker
from jimray.train.records import write_metrics, write_run_info
from jimray.train.rundir import prepare_run, write_data_record
from jimray.train.sampler import PairSamplerActor
from jimray.train.state import load_round_state


class EveryRowDataConfig(DataConfig):
    """Split every dataset over the workers with ``equal=False``.

    Ray Train's default split is ``streaming_split(equal=True)``, which drops up to ``world_size - 1`` rows per
    epoch to keep the shards equal. Algorithm 1 must embed and label every subtomogram every round, so the shards
    may differ by a row; the training loop's DDP ``Join`` handles the uneven number of batches.
    """

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        for name, dataset in datasets.items():
            if dataset.name is None:
                dataset.set_name(name)
            ds = dataset.copy(dataset)
            ds.context.execution_options = self._resolve_execution_options(name)
            for rank, split in enumerate(ds.streaming_split(world_size, equal=False)):
                output[rank][name] = split
        return output


def prepare_data(config: JobConfig, run_dir: Path) -> Path:
    """The job's data path; with none, simulate the embedded six-structure set once into ``run_dir/data``."""
    if config.data.path is not None:
        return Path(config.data.path)
    from jimray.io.simulated import simulate_dataset, write_simulated_dataset

    out = run_dir / "data"
    shards = out / "shards"
    if shards.is_dir() and any(shards.glob("*.parquet")):
        return shards
    d = config.data
    voxel = d.voxel_size_angstrom or 10.0
    sim, names = simulate_dataset(None, d.simulate_per_class, d.simulate_snr, d.box_size, voxel,
                                  d.tilt_range_degrees, d.simulate_seed)
    write_simulated_dataset(out, sim, voxel, d.tilt_range_degrees, names,
                            metadata={"snr": d.simulate_snr, "seed": d.simulate_seed})
    return shards


def build_dataset(config: JobConfig, data_path: Path, skip: set[str] | frozenset[str] = frozenset()):
    """Ray Data stream of subtomograms (id, volume, tilt_range_degrees[, true_class], ...) for the trainer.

    Workers iterate numpy batches and pick the columns they need by name, so no schema pass is needed here.
    STAR / MRC input gets the job's ``data.tilt_range_degrees`` (shards keep the tilt range they were written
    with); ``skip``: the bad volumes left out by ``--skip-bad``.
    """
    d = config.data
    quiet_data_progress()
    tilt = None if is_parquet_input(data_path) else d.tilt_range_degrees
    return read_subtomograms(data_path, box_size=d.box_size, voxel_size_angstrom=d.voxel_size_angstrom,
                             tilt_range_degrees=tilt, normalize=d.normalize, skip=skip)


def build_trainer(config: JobConfig, ds, run_dir: Path, sampler_name: str) -> TorchTrainer:
    s = config.scaling
    resources = {"CPU": s.cpus_per_worker} | ({"GPU": s.gpus_per_worker} if s.use_gpu else {})
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": config.model_dump(mode="json"), "sampler": sampler_name,
                           "fault": os.environ.get(FAULT_ENV)},
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources,
                                     placement_strategy=s.placement_strategy),
        run_config=RunConfig(
            name=CHECKPOINTS_DIR,
            storage_path=str(run_dir),
            failure_config=FailureConfig(max_failures=s.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=3),
        ),
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        datasets={"train": ds},
        dataset_config=EveryRowDataConfig(),
    )


def check_init_from(config: JobConfig) -> None:
    """Fail before any Ray work when ``train.init_from`` is missing, not a pretrained model, or was pretrained
    with another model section (the message names the file and each differing field)."""
    if not config.train.init_from:
        return
    from jimray.train.pretrain import check_pretrained_fits
    from jimray.train.state import load_pretrained

    try:
        pretrained = load_pretrained(config.train.init_from)
        check_pretrained_fits(config.model.model_dump(mode="json"), pretrained.model_config,
                              f"train.init_from {config.train.init_from}")  # fmt: skip
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def _watch_rounds(sampler, total: int, progress, stop) -> None:
    """Poll the sampler actor's round (set when each round's labels arrive) until ``stop`` is set;
    ``progress(rounds done, total)`` on every change."""
    last = -1
    while not stop.wait(1.0):
        try:
            current = int(ray.get(sampler.current_round.remote(), timeout=5))
        except Exception:  # noqa: BLE001 -- progress only; the actor may be busy or gone
            continue
        done = max(0, min(total, current - 1))
        if done != last:
            progress(done, total)
            last = done


def run_training(config: JobConfig, command: list[str] | None = None, progress=None, *, skip_bad: bool = False,
                 force: bool = False, notice=None) -> dict:
    """Run (or resume) a training job; returns the summary written to ``summary.json``. ``progress(done,
    total)`` (optional) is told the rounds completed while training runs (polled about once a second).

    Before any Ray work or write: the data are validated (:mod:`jimray.io.validate`; ``skip_bad`` leaves bad
    volumes out with a ``notice``) and a rerun into an existing run must be the same job on the same data
    (:mod:`jimray.train.rundir`; ``force`` starts a differing run in a fresh sibling folder instead)."""
    check_init_from(config)
    config, skip, data = prepare_run(config, skip_bad=skip_bad, force=force, notice=notice)
    run_dir = Path(config.output.dir).resolve()
    if notice is not None:
        notice(f"run directory: {run_dir}")
    write_run_info(run_dir, config, command)
    write_data_record(run_dir, data)
    init_ray()
    ds = build_dataset(config, prepare_data(config, run_dir), skip)
    sampler_name = f"jimray-sampler-{uuid.uuid4().hex[:8]}"
    sampler = PairSamplerActor.options(name=sampler_name, num_cpus=0).remote(
        config.train.reservoir_per_cluster, config.train.seed
    )
    stop, watcher = threading.Event(), None
    if progress is not None:
        watcher = threading.Thread(target=_watch_rounds, args=(sampler, config.train.rounds, progress, stop),
                                   daemon=True)
        watcher.start()
    try:
        result = build_trainer(config, ds, run_dir, sampler_name).fit()
    finally:
        stop.set()
        if watcher is not None:
            watcher.join(timeout=10)
        ray.kill(sampler)
    summary = finish_run(run_dir, result.checkpoint)
    if progress is not None:
        progress(summary.get("rounds_completed", config.train.rounds), config.train.rounds)
    return summary


def finish_run(run_dir: Path, checkpoint) -> dict:
    """Write metrics/summary/plot from the last checkpoint and export it as ``run_dir/model``."""
    import json

    if checkpoint is None:
        raise RuntimeError(f"training in {run_dir} reported no checkpoint; see the log above")
    with checkpoint.as_directory() as directory:
        state = load_round_state(directory)
        target = run_dir / MODEL_DIR
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(directory, target)
    write_metrics(run_dir, state.history)
    return json.loads((run_dir / SUMMARY_JSON).read_text())
