"""Shared fixtures. The ``ray_cluster`` fixture starts a local 2-CPU cluster per test module."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch

from jimray.bench.common import TINY_TRAINING  # noqa: F401  (the tests' tiny Jim-Net and GMM settings)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu); none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def start_local_ray():
    """Start the tests' local Ray cluster: 2 CPUs, ~100 MiB object store, no dashboard, no token auth."""
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        num_cpus=2,
        object_store_memory=100 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    return ray


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster per test module (see :func:`start_local_ray`), with a temporary HOME. Per module, not
    per session: a cluster that had served every earlier module (Ray Train runs, Ray Data pools, killed
    workers) left the sampler actor's first call waiting forever in the full suite (2026-12-07); a fresh
    cluster costs a few seconds."""
    import ray

    home = tempfile.mkdtemp(prefix="jimray-home-")
    old_home = os.environ.get("HOME")
    os.environ["HOME"] = home
    start_local_ray()
    yield ray
    ray.shutdown()
    if old_home is not None:
        os.environ["HOME"] = old_home


def accuracy_from_files(star, shard_dir) -> float:
    """Clustering accuracy recomputed from what a run wrote: ``rlnClassNumber`` of a predict STAR against
    ``true_class`` of the Parquet shards it read, matched by image name (``[index@]file``, the file by its
    name: predict rewrites the paths relative to its output). Tests compare a reported accuracy with it, so a
    wrong report (or a wrong matching of rows to particles) fails."""
    from pathlib import Path

    from jimray.conventions import clustering_accuracy
    from jimray.io.mrc import split_image_name
    from jimray.io.shards import read_shard
    from jimray.io.star import read_particles

    def key(name: str) -> str:
        prefix, file = split_image_name(name)
        return f"{prefix}{Path(file).name}"

    truth: dict[str, int] = {}
    for shard in sorted(Path(shard_dir).glob("*.parquet")):
        cols = read_shard(shard, columns=["image_name", "true_class"])
        truth.update(zip(map(key, cols["image_name"]), cols["true_class"].astype(int).tolist(), strict=True))
    table = read_particles(star).particles
    keys = [key(name) for name in table["rlnImageName"]]
    assert len(set(keys)) == len(keys) == len(truth), "the STAR must name every subtomogram once"
    return float(clustering_accuracy(np.array([truth[k] for k in keys]), table["rlnClassNumber"].to_numpy()))
