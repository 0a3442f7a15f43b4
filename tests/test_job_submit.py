"""``ray job submit -- jimray train jobs/quickstart.yaml`` against a local cluster started with ``ray start --head``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {seconds} s")


@pytest.fixture
def head_node(tmp_path):
    """A separate head node (``ray start --head --block``), stopped by signalling its process group."""
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "HOME": str(tmp_path / "home"),
                        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    (tmp_path / "home").mkdir()
    temp_dir = tempfile.mkdtemp(prefix="/tmp/jrj")  # short: socket paths have a length limit
    dash = _free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={_free_port()}", "--num-cpus=2",
           f"--object-store-memory={150 * 2**20}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
           # the session's cluster already holds the default agent ports: without these the new head's job
           # agent cannot start ("No available agent to submit job")
           f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
           f"--metrics-export-port={_free_port()}"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_http(f"http://127.0.0.1:{dash}/api/version", 120)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_quickstart_through_ray_job_submit(head_node, tmp_path):
    address, env = head_node
    out = tmp_path / "run"
    shrink = ["data.simulate_per_class=3", "data.box_size=16", "data.voxel_size_angstrom=20", "train.rounds=1",
              "model.channels=[4, 8]", "model.feature_size=4", "model.feature_dim=8", "model.regressor_channels=8",
              "model.local_radius=1", "gmm.candidates=[2, 3]", "gmm.n_init=1", "gmm.pca_dims=4",
              "train.batch_size=6", "train.reservoir_per_cluster=6",
              "scaling.num_workers=1", "scaling.cpus_per_worker=1"]  # the single-worker path (no DDP)
    sets = [arg for item in shrink for arg in ("--set", item)]
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--", sys.executable, "-m", "jimray", "train",
           str(ROOT / "jobs" / "quickstart.yaml"), "--out", str(out), *sets]
    deadline = time.time() + 300
    while True:  # the node's dashboard agent may still be starting: "No available agent to submit job"
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in done.stdout + done.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in (done.stdout + done.stderr).lower()
    for name in ("config.yaml", "metrics.csv", "summary.json", "model/state.pt"):
        assert (out / name).is_file(), name
