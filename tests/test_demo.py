"""``make demo``: the quickstart pipeline job (``base:`` reuse of jobs/quickstart.yaml), the run's report.html
(built from a synthetic run directory, rendered in headless Chromium: every image loads) and, marked ``ray``,
the demo shrunk with ``--set`` run as a user runs it (a subprocess): quiet output, summary table, report files."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import accuracy_from_files

from jimray.config import ConfigError, load_job

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "jobs" / "quickstart_pipeline.yaml"

# The demo shrunk: 4 particles of each of the six structures in 16^3 boxes at 20 A, a tiny net, one round.
TINY_DEMO = [
    "data.box_size=16", "data.voxel_size_angstrom=20", "data.simulate_per_class=4", "train.rounds=1",
    "model.channels=[4, 8]", "model.feature_size=4", "model.feature_dim=8", "model.regressor_channels=8",
    "model.local_radius=1", "model.dilations=[1, 2]", "gmm.pca_dims=4", "gmm.n_init=1", "gmm.candidates=[2, 3]",
    "train.batch_size=4", "train.reservoir_per_cluster=8", "frame.n_references=4", "frame.members_per_reference=3",
    "pipeline.predict.actors=1", "pipeline.predict.iterations=1",
]


def test_demo_job_reuses_the_quickstart_settings():
    demo, quick = load_job(DEMO), load_job(ROOT / "jobs" / "quickstart.yaml")
    for section in ("data", "model", "gmm", "train", "scaling"):
        assert getattr(demo, section) == getattr(quick, section), section
    assert demo.pipeline.subtomograms and demo.data.path is None and demo.output.dir != quick.output.dir
    from jimray.pipeline import stage_names

    assert stage_names(demo) == ("simulate", "train", "predict", "average", "report")


def test_base_key_merges_sections_and_reports_mistakes(tmp_path):
    (tmp_path / "a.yaml").write_text("name: a\ntrain:\n  rounds: 7\n  lr: 0.01\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain:\n  rounds: 2\n")
    job = load_job(tmp_path / "b.yaml", ["train.batch_size=3"])
    assert (job.name, job.train.rounds, job.train.lr, job.train.batch_size) == ("a", 2, 0.01, 3)
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="base 'missing.yaml' does not exist"):
        load_job(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: e.yaml\n")
    (tmp_path / "e.yaml").write_text("base: d.yaml\n")
    with pytest.raises(ConfigError, match="loop"):
        load_job(tmp_path / "d.yaml")


def test_pipeline_needs_exactly_one_source():
    with pytest.raises(ConfigError, match="either pipeline.tomograms"):
        load_job(DEMO, ["pipeline.tomograms=[a.mrc]"])


# --- the report, from a synthetic run directory -----------------------------------------------------------


def _blob(box: int, centre: tuple[float, float, float], width: float) -> np.ndarray:
    z, y, x = np.mgrid[:box, :box, :box].astype(np.float32)
    return np.exp(-((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) / (2 * width**2))


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """A run directory as the stages leave it: train/metrics.csv, predict/predict.json + particles.star,
    average/class_NNN.mrc + fsc.csv + particles.star; two classes of 6 particles, truth known."""
    from jimray.io.mrc import write_volume
    from jimray.io.star import write_particles

    root, box, voxel = tmp_path_factory.mktemp("run"), 16, 20.0
    for name in ("train", "predict", "average"):
        (root / name).mkdir()
    pd.DataFrame({"round": [1, 2], "n_clusters": [3, 2], "clustering_accuracy": [0.5, 0.9],
                  "cluster_sizes": ["4 4 4", "6 6"], "seconds": [3.0, 2.5]}).to_csv(root / "train" / "metrics.csv")
    classes = np.array([1] * 6 + [2] * 6)
    star = pd.DataFrame({"rlnImageName": [f"p{i}.mrc" for i in range(12)], "rlnClassNumber": classes})
    for folder in ("predict", "average"):
        write_particles(root / folder / "particles.star", star, voxel, box_size=box)
    (root / "predict" / "predict.json").write_text(json.dumps({"n_clusters": 2, "clustering_accuracy": 0.9}))
    maps = {"round": _blob(box, (8, 8, 8), 3.0), "long": _blob(box, (8, 8, 8), 1.5) + _blob(box, (8, 8, 12), 1.5)}
    rng = np.random.default_rng(0)
    for number, name in ((1, "round"), (2, "long")):
        write_volume(root / "average" / f"class_{number:03d}.mrc", maps[name] + 0.05 * rng.standard_normal(
            (box,) * 3).astype(np.float32), voxel)
    freq = np.arange(box // 2 + 1) / (box * voxel)
    rows = [(c, k, f, np.cos(k / 4)) for c in (1, 2) for k, f in enumerate(freq)]
    pd.DataFrame(rows, columns=["class", "shell", "frequency_per_angstrom", "fsc"]).to_csv(
        root / "average" / "fsc.csv", index=False)
    (root / "pipeline.json").write_text(json.dumps({"stages": {"train": {"status": "ran", "seconds": 5.5}}}))
    return root, maps, voxel


def _write(root: Path, maps: dict, voxel: float):
    from jimray.io.pipeline_report import Truth, write_pipeline_report

    truth = Truth(["round", "long"], np.array([0] * 5 + [1] + [1] * 6), maps)
    return write_pipeline_report(root, "test run", root / "train", root / "predict", root / "average", truth, voxel,
                                 {"job": "synthetic"})


def test_pipeline_report_writes_every_figure_and_the_numbers(synthetic_run):
    root, maps, voxel = synthetic_run
    summary = _write(root, maps, voxel)
    assert summary.report == root / "report.html" and summary.n_clusters == 2 and summary.cluster_sizes == [6, 6]
    assert summary.accuracy == pytest.approx(11 / 12)
    assert [(c.structure, round(c.purity, 3)) for c in summary.classes] == [("round", 0.833), ("long", 1.0)]
    assert all(np.isfinite(c.resolution_angstrom) and c.truth_resolution_angstrom > 0 for c in summary.classes)
    assert [r["K"] for r in summary.rounds] == [3, 2] and summary.rounds[-1]["accuracy"] == 0.9
    for name in ("class_001.png", "class_002.png", "fsc.png", "cluster_sizes.png", "training_rounds.png"):
        assert (root / "report" / name).read_bytes().startswith(b"\x89PNG")
    text = summary.report.read_text()
    assert text.count("<img ") == 5 and "beside the true maps" in text and "K and accuracy per round" in text


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


_PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const out = document.createElement("pre");
  out.id = "image-probe";
  out.textContent = JSON.stringify(images.map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth})));
  document.body.appendChild(out);
});
</script>"""


def images_in_chromium(report: Path, tmp_path: Path) -> list[dict]:
    """Load ``report`` (a copy with a small probe script) in headless Chromium; per ``<img>``: alt, complete,
    naturalWidth (0 = the image did not load)."""
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace("</body>", _PROBE + "</body>"))
    done = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                           "--dump-dom", probe.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="image-probe">(.*?)</pre>', done.stdout, re.S)
    assert found, f"the probe did not run in chromium (rc {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


@pytest.mark.skipif(chromium() is None, reason="no chromium on this machine (apt-get install chromium) to render "
                    "report.html headless")
def test_pipeline_report_every_image_loads_in_headless_chromium(synthetic_run, tmp_path):
    root, maps, voxel = synthetic_run
    report = _write(root, maps, voxel).report
    images = images_in_chromium(report, tmp_path)
    assert len(images) == 5
    assert all(i["complete"] and i["width"] > 0 for i in images), images


# --- the demo itself, shrunk ------------------------------------------------------------------------------


@pytest.mark.ray
def test_demo_pipeline_shrunk_prints_the_summary_and_writes_the_report(tmp_path):
    """``jimray run jobs/quickstart_pipeline.yaml`` as ``make demo`` runs it (own Ray, quiet), shrunk."""
    out = tmp_path / "demo"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "COLUMNS": "200", "HOME": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    args = [sys.executable, "-m", "jimray", "run", str(DEMO), "--out", str(out)]
    args += [a for s in TINY_DEMO for a in ("--set", s)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-4000:]
    # quiet: our lines and the tables only; no Ray worker/driver log lines, no warnings
    for noise in ("pid=", "INFO", "WARNING", "Warning", "core_worker", "Reporting training result"):
        assert noise not in text, f"{noise!r} in the output:\n{text}"
    for stage in ("simulate subtomograms", "train (rounds)", "predict classes", "average classes", "write report"):
        assert re.search(rf"done {re.escape(stage)}", text), text
    assert re.search(r"K found\s*│\s*\d", text) and "accuracy vs truth" in text and "FSC-0.143" in text
    assert re.search(r"class_001\s*│\s*\d+\s*│", text) and "seconds: train" in text
    assert str(out / "report.html") in text
    record = json.loads((out / "pipeline.json").read_text())
    assert [s["status"] for s in record["stages"].values()] == ["ran"] * 5
    report = record["stages"]["report"]["counts"]
    assert sum(report["cluster_sizes"]) == 24
    recomputed = accuracy_from_files(out / "predict" / "particles.star", out / "data" / "shards")
    assert report["clustering_accuracy"] == pytest.approx(recomputed)  # the report's number is the files' number
    predicted = record["stages"]["predict"]["counts"]["clustering_accuracy"]
    assert predicted == pytest.approx(recomputed)
    html = (out / "report.html").read_text()
    assert html.count("<img ") == len(report["classes"]) + 3  # per class, FSC, sizes, training rounds
    assert len(list((out / "report").glob("class_*.png"))) == len(report["classes"])
