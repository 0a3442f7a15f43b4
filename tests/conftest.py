"""Shared fixtures. The ``ray_cluster`` fixture starts one local 2-CPU cluster for the whole session."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch


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


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster: token auth off, a temporary HOME, 2 CPUs, ~100 MiB object store, no dashboard."""
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    home = tempfile.mkdtemp(prefix="jimray-home-")
    old_home = os.environ.get("HOME")
    os.environ["HOME"] = home
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        num_cpus=2,
        object_store_memory=100 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    yield ray
    ray.shutdown()
    if old_home is not None:
        os.environ["HOME"] = old_home
