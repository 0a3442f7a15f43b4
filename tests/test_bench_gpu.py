"""``jimray bench gpu``: the CPU smoke run covers every section, a missing GPU is one clear message, the budget
and the watchdog bound the run, and (marked gpu) the real thing at small sizes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from jimray.bench import gpu
from jimray.config import ModelConfig


def _jimray(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jimray", *args], capture_output=True, text=True, timeout=timeout)


def test_cpu_smoke_runs_every_section(tmp_path):
    done = _jimray("bench", "gpu", "--device", "cpu", "--smoke", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "gpu_smoke.json").read_text())
    assert record["command"].startswith("jimray bench gpu --device cpu --smoke") and record["date"]
    assert record["machine"]["cpu_count"] >= 1
    sections = record["sections"]
    assert {name: part["status"] for name, part in sections.items()} == dict.fromkeys(gpu.SECTIONS, "done")
    assert [r["precision"] for r in sections["jimnet"]["rows"]] == list(gpu.BENCH_PRECISIONS)
    assert all(r["train_pairs_per_s"] > 0 and r["inference_pairs_per_s"] > 0 for r in sections["jimnet"]["rows"])
    assert {r["impl"] for r in sections["gmm"]["rows"]} == {"jimray torch EM", "scikit-learn GaussianMixture"}
    assert all(math.isfinite(r["mean_loglik"]) for r in sections["gmm"]["rows"])
    methods = [r["method"] for r in sections["search"]["rows"]]
    assert sum(m.startswith("constrained-CC search") for m in methods) == 2 and len(methods) == 6
    assert all(0 <= r["rotation_error_mean"] <= 2 * math.sqrt(2) + 1e-6 for r in sections["search"]["rows"])
    markdown = (tmp_path / "gpu_smoke.md").read_text()
    assert "Command: `jimray bench gpu" in markdown and "constrained-CC search" in markdown


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_one_clear_message():
    done = _jimray("bench", "gpu", timeout=60)
    assert done.returncode == 2
    assert "needs a CUDA GPU" in done.stderr and "--device cpu --smoke" in done.stderr
    assert "Traceback" not in done.stderr


def test_budget_skips_what_does_not_fit_and_keeps_partial_results(tmp_path):
    s = replace(gpu.smoke_settings("cpu", 0.01), sections=("jimnet",))
    rec = gpu.Recorder(tmp_path, "partial", "test", s)
    results = gpu.run(s, rec, log=lambda line: None)
    part = results["sections"]["jimnet"]
    assert part["status"] == "partial (budget)" and len(part["rows"]) + len(part["skipped"]) == 3
    saved = json.loads((tmp_path / "partial.json").read_text())
    assert saved["sections"]["jimnet"]["status"] == "partial (budget)"


def test_watchdog_stops_the_process(tmp_path):
    code = ("import time; from jimray.bench import gpu; "
            f"rec = gpu.Recorder({str(tmp_path)!r}, 'w', 'test', gpu.smoke_settings('cpu', 1.0)); "
            "gpu.start_watchdog(rec, 0.2); time.sleep(30)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3 and "hard time limit" in done.stderr


@pytest.mark.parametrize(("name", "model"), [("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"),
                                             ("NVIDIA H200", "H200"), ("NVIDIA A100-SXM4-80GB", "A100"),
                                             ("NVIDIA L4", "L4"), ("NVIDIA L40S", "unknown")])  # fmt: skip
def test_device_peaks_by_name(monkeypatch, name, model):
    monkeypatch.setattr(gpu, "_device_name", lambda device: name)
    peaks = gpu.device_peaks("cuda")
    assert peaks["model"] == model
    assert model == "unknown" or peaks["bf16"] > peaks["tf32"] > 0


@pytest.mark.gpu
def test_gpu_bench_small(tmp_path):
    """The real thing at small sizes: the default model at box 32, a small GMM, 4 search pairs, all on CUDA."""
    s = replace(gpu.smoke_settings("cuda", 240.0), model=ModelConfig(), boxes=(32,), batches=(4,), gmm_n=20000, gmm_d=8,
                gmm_k=4, search_box=32, search_pairs=4, angular_steps=(30.0,), anchors="octahedral",
                max_train_steps=5)  # fmt: skip
    results = gpu.run(s, gpu.Recorder(tmp_path, "gpu_small", "test", s), log=lambda line: None)
    assert {name: part["status"] for name, part in results["sections"].items()} == dict.fromkeys(gpu.SECTIONS, "done")
    assert all(r["train_tflops"] > 0 for r in results["sections"]["jimnet"]["rows"])
    assert results["sections"]["gmm"]["rows"][0]["device"].startswith("cuda")
    assert (tmp_path / "gpu_small.md").is_file()
