"""``jimray bench gpu``: one budgeted command that measures what the CPU benches could only estimate on a GPU.

Three sections, run in this order; each gets a share of what is left of ``--budget-seconds`` (unused time
rolls over), every measurement first checks that it fits, and the result files are rewritten after each
measurement, so a run cut short still leaves its numbers. A watchdog ends the process (exit code 3) at the
budget plus a grace period, whatever is running.

1. ``jimnet``: Jim-Net training and inference pairs/s (:func:`jimray.train.step.pair_step`, the rounds' step:
   eq. 7 loss with CE) at box 32 and 64 (batch 32, then 128) on random volumes, in bf16 (autocast), tf32 and
   strict fp32 (IEEE: no TF32 anywhere); FLOPs per pair counted once per box with ``FlopCounterMode``
   (convolutions and matmuls only, not FFTs or ``grid_sample``), achieved TFLOP/s and its fraction of the
   device's dense peak for that precision (:data:`GPU_PEAKS`).
2. ``gmm``: the torch EM of :class:`jimray.cluster.gmm.GaussianMixture` on the device (float64 and float32)
   against scikit-learn's ``GaussianMixture`` on the CPU, 10^6 x 32 points, K = 20, full covariances, from
   the same start (our k-means++ + one EM step) for the same number of iterations (``tol = 0``).
   scikit-learn runs on a random subsample when the full set would not fit the budget; its per-iteration
   time is then scaled to n (EM is linear in n), and the output says so.
3. ``search``: Jim-Net's single forward pass (and 24-anchor multi-start) against the classical constrained-CC
   search (:func:`jimray.baselines.search.align_pairs`, 30-degree grid, then 15 while the budget lasts, 4
   local refinements), both on the device, on the same 128 simulated pairs (ribosome, SNR 0.1, 30-degree
   wedge, box 32, relative rotations uniform on SO(3); the search takes as many as fit): pairs/s and the
   paper's errors (:func:`jimray.conventions.rotation_error`). The
   network is ``--model`` (a ``jimray pretrain`` output) or trained here for a share of the section (pairs
   within 30 then 60 degrees, bf16), so its numbers are those of a briefly trained network.

``--device cpu --smoke`` runs every code path at tiny sizes on the CPU (seconds), for the tests.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import typer

from jimray.bench.common import markdown_table, split_list, write_results
from jimray.config import ModelConfig
from jimray.precision import autocast, tf32_scope

# Dense (no sparsity) peak TFLOP/s from NVIDIA's datasheets: (FP32 on CUDA cores, TF32 and BF16 on tensor cores),
# matched against torch.cuda.get_device_name in this order (word boundaries: "L4" is not "L40S").
GPU_PEAKS: list[tuple[str, str, tuple[float, float, float]]] = [
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe", (51.2, 378.0, 756.0)),
    (r"\bH100\b.*\bNVL\b", "H100 NVL", (60.0, 417.5, 835.5)),
    (r"\bH200\b.*\bNVL\b", "H200 NVL", (60.0, 417.5, 835.5)),
    (r"\bH100\b", "H100 SXM", (67.0, 494.7, 989.4)),
    (r"\bG?H200\b", "H200", (67.0, 494.7, 989.4)),
    (r"\bA100\b", "A100", (19.5, 156.0, 312.0)),
    (r"\bL4\b", "L4", (30.3, 60.0, 121.0)),
]
BENCH_PRECISIONS = ("bf16", "tf32", "fp32")  # bench fp32 = strict IEEE (train.precision fp32 leaves torch's defaults)
SECTION_WEIGHTS = {"jimnet": 0.35, "gmm": 0.30, "search": 0.35}
STRUCTURE = "6zu5_ribosome"
SNR, TILT = 0.1, 60.0
HELD_OUT_SEED = 10_000_000


@dataclass
class GpuBenchSettings:
    """What ``jimray bench gpu`` measures; :func:`smoke_settings` gives the tiny CPU variant."""

    device: str = "cuda"
    budget_seconds: float = 420.0
    sections: tuple[str, ...] = ("jimnet", "gmm", "search")
    model: ModelConfig = field(default_factory=ModelConfig)
    boxes: tuple[int, ...] = (32, 64)
    batches: tuple[int, ...] = (32, 128)  # pairs per speed step; every box at the first batch comes first
    min_seconds: float = 2.0  # per speed measurement, after one warm-up call
    max_reps: int = 200
    warmup: bool = True
    gmm_n: int = 1_000_000
    gmm_d: int = 32
    gmm_k: int = 20
    gmm_iters: int = 10
    sklearn_min_n: int = 100_000
    search_pairs: int = 128
    search_box: int = 32
    angular_steps: tuple[float, ...] = (30.0, 15.0)  # global grids of the classical search, in this order
    refine_steps: int = 4
    anchors: str = "octahedral"  # of Jim-Net's multi-start row
    search_chunk: int = 1024  # (pair, rotation) volumes in flight in align_pairs
    model_path: str | None = None
    train_share: float = 0.35  # of the search section, to train the network when no --model is given
    train_batch: int = 32
    max_train_steps: int = 100_000
    smoke: bool = False


def smoke_settings(device: str, budget_seconds: float) -> GpuBenchSettings:
    """Every code path at tiny sizes (a 2-level net, box 16, a few thousand GMM points, 2 search pairs)."""
    tiny = ModelConfig(channels=[4, 8], feature_size=4, feature_dim=8, regressor_channels=8, local_radius=1,
                       dilations=[1, 2])  # fmt: skip
    return GpuBenchSettings(device=device, budget_seconds=budget_seconds, model=tiny, boxes=(16,), batches=(2,),
                            min_seconds=0.0, max_reps=1, warmup=False, gmm_n=3000, gmm_d=4, gmm_k=3, gmm_iters=2,
                            sklearn_min_n=1000, search_pairs=2, search_box=16, angular_steps=(90.0, 60.0),
                            refine_steps=1, anchors="identity", search_chunk=64, train_batch=2, max_train_steps=1,
                            smoke=True)  # fmt: skip


# ---------------------------------------------------------------------------------------------- time and records


class Deadline:
    """An absolute ``time.perf_counter()`` deadline: ``left()`` seconds, ``allows(s)``."""

    def __init__(self, seconds: float):
        self.until = time.perf_counter() + seconds

    def left(self) -> float:
        return self.until - time.perf_counter()

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds


class Recorder:
    """The results so far and where they go: :meth:`save` rewrites ``NAME.json`` / ``NAME.md`` (atomically)."""

    def __init__(self, out: Path, name: str, command: str, settings: GpuBenchSettings):
        self.out, self.name, self.command = Path(out), name, command
        self.lock = threading.Lock()
        self.results: dict = {"settings": _settings_record(settings), "device_name": _device_name(settings.device),
                              "peaks_tflops": device_peaks(settings.device), "sections": {}}  # fmt: skip
        self.start = time.perf_counter()

    def save(self) -> None:
        with self.lock:
            self.results["elapsed_seconds"] = time.perf_counter() - self.start
            tmp = self.out / f".{self.name}.partial"
            write_results(tmp, self.name, self.results, gpu_markdown(self.results), self.command)
            for suffix in (".json", ".md"):
                os.replace(tmp / f"{self.name}{suffix}", self.out / f"{self.name}{suffix}")
            shutil.rmtree(tmp, ignore_errors=True)


def _settings_record(s: GpuBenchSettings) -> dict:
    return {k: v for k, v in vars(s).items() if k != "model"} | {"model": s.model.model_dump()}


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _free(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _timed(fn: Callable[[], object], device, min_seconds: float, max_reps: int, warmup: bool = True):
    """(seconds per call, calls timed) of ``fn()`` after one warm-up call (unless ``warmup`` is False),
    synchronised, repeated until ``min_seconds`` have passed or ``max_reps`` calls."""
    if warmup:
        fn()
        _sync(device)
    reps, start = 0, time.perf_counter()
    while True:
        fn()
        _sync(device)
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds or reps >= max_reps:
            return elapsed / reps, reps


def _skip(part: dict, what: str) -> None:
    part.setdefault("skipped", []).append(f"{what}: not enough time left in the budget")


# ---------------------------------------------------------------------------------------------- device peaks


def _device_name(device: str) -> str:
    if torch.device(device).type != "cuda":
        return "cpu"
    return torch.cuda.get_device_name(torch.device(device))


def device_peaks(device: str) -> dict:
    """``{"model", "fp32", "tf32", "bf16"}`` dense peak TFLOP/s of a CUDA device (:data:`GPU_PEAKS`), or
    ``{"model": "unknown"}`` (a GPU not in the table, or the CPU)."""
    name = _device_name(device)
    for pattern, model, (fp32, tf32, bf16) in GPU_PEAKS:
        if torch.device(device).type == "cuda" and re.search(pattern, name):
            return {"model": model, "fp32": fp32, "tf32": tf32, "bf16": bf16}
    return {"model": "unknown"}


# ---------------------------------------------------------------------------------------------- 1. Jim-Net speed


def _precision_scope(precision: str):
    """Bench fp32 is strict IEEE (no TF32 in cuBLAS or cuDNN); tf32 and bf16 set their own flags in the step."""
    return tf32_scope(False) if precision == "fp32" else tf32_scope(None)


def _random_pairs(box: int, batch: int, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    source, target = torch.randn(2, batch, box, box, box, generator=gen).to(device).unbind(0)
    tilts = torch.full((batch,), TILT, device=device)
    labels = torch.randint(0, 4, (batch,), generator=gen).to(device)
    return source, target, tilts, labels


def _train_fn(model, source, target, tilts, labels, precision: str) -> Callable[[], object]:
    from jimray.train.step import pair_step

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    gamma = [1.0] * model.config.stages
    lowpass = model.config.lowpass_cycles_per_voxel
    return lambda: pair_step(model, optimizer, source, target, tilts, tilts, labels, gamma, 0.0, lowpass, precision)


def flops_per_pair(config: ModelConfig, box: int, batch: int, device) -> dict[str, float]:
    """Counted GFLOP per pair (convolutions and matmuls) of a training step and of an inference forward."""
    from torch.utils.flop_counter import FlopCounterMode

    from jimray.model import JimNet

    model = JimNet(config, 4).to(device)
    source, target, tilts, labels = _random_pairs(box, batch, device)
    step = _train_fn(model, source, target, tilts, labels, "fp32")
    with FlopCounterMode(display=False) as counter:
        step()
    train = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(source, target)
    forward = counter.get_total_flops()
    return {"train_gflop_per_pair": train / batch / 1e9, "inference_gflop_per_pair": forward / batch / 1e9}


def jimnet_speed(s: GpuBenchSettings, box: int, batch: int, precision: str) -> dict:
    """Training and inference pairs/s of Jim-Net (``s.model``, 4 clusters) on random ``(batch, box^3)`` pairs."""
    from jimray.model import JimNet

    torch.manual_seed(0)
    model = JimNet(s.model, 4).to(s.device)
    source, target, tilts, labels = _random_pairs(box, batch, s.device)
    if torch.device(s.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    row = {"box": box, "batch": batch, "precision": precision}
    with _precision_scope(precision):
        train_s, row["train_reps"] = _timed(_train_fn(model, source, target, tilts, labels, precision), s.device,
                                            s.min_seconds, s.max_reps, s.warmup)  # fmt: skip
        model.eval()
        with torch.no_grad(), tf32_scope(True if precision == "tf32" else None), autocast(precision, s.device):
            infer_s, row["inference_reps"] = _timed(lambda: model(source, target), s.device, s.min_seconds,
                                                    s.max_reps, s.warmup)  # fmt: skip
    row |= {"train_pairs_per_s": batch / train_s, "inference_pairs_per_s": batch / infer_s}
    if torch.device(s.device).type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(s.device) / 2**30
    return row


def _add_tflops(row: dict, flops: dict, peaks: dict) -> None:
    for kind in ("train", "inference"):
        achieved = row[f"{kind}_pairs_per_s"] * flops[f"{kind}_gflop_per_pair"] / 1e3
        row[f"{kind}_tflops"] = achieved
        peak = peaks.get(row["precision"])
        row[f"{kind}_fraction_of_peak"] = achieved / peak if peak else float("nan")


def jimnet_section(s: GpuBenchSettings, deadline: Deadline, rec: Recorder, part: dict) -> None:
    """Section 1: rows ``part["rows"]`` (box x batch x precision; every box at the first batch first) and
    ``part["flops"]`` (per box). A measurement is expected to take 1.5 times the last one, scaled by the voxels
    per step (at most 60 s), and is skipped when that does not fit."""
    part |= {"rows": [], "flops": {}}
    plan = [(box, batch) for batch in s.batches for box in s.boxes]
    last = (10.0 if not s.smoke else 0.0, plan[0][0] ** 3 * plan[0][1])  # (seconds, voxels per step)
    for box, batch in plan:
        for precision in BENCH_PRECISIONS:
            voxels = box**3 * batch
            cost = 1.5 * last[0] if voxels == last[1] else min(1.5 * last[0] * voxels / last[1], 60.0)
            if not deadline.allows(cost):
                _skip(part, f"box {box} batch {batch} {precision}")
                continue
            start = time.perf_counter()
            part["rows"].append(_speed_row(s, box, batch, precision, part["flops"], rec.results["peaks_tflops"]))
            _free(s.device)
            rec.save()
            last = (time.perf_counter() - start, voxels)


def _speed_row(s: GpuBenchSettings, box: int, batch: int, precision: str, flops: dict, peaks: dict) -> dict:
    """One :func:`jimnet_speed` row with its TFLOP/s (FLOPs counted once per box into ``flops``); out of memory
    gives a row that says so."""
    try:
        if str(box) not in flops:
            flops[str(box)] = flops_per_pair(s.model, box, batch, s.device)
        row = jimnet_speed(s, box, batch, precision)
        _add_tflops(row, flops[str(box)], peaks)
        return row
    except torch.cuda.OutOfMemoryError as exc:
        return {"box": box, "batch": batch, "precision": precision, "error": f"out of memory: {exc}"[:300]}


# ---------------------------------------------------------------------------------------------- 2. GMM


def _gmm_start(x: torch.Tensor, k: int):
    """Our k-means++ seeding + one EM step on ``x`` ``(n, d)`` (its device), float64: the common start."""
    from jimray.cluster.gmm import GaussianMixture

    return GaussianMixture(k, max_iter=1, tol=0.0, random_state=0).fit(x)


def torch_em(x: torch.Tensor, start, iters: int, dtype: torch.dtype) -> dict:
    """``iters`` EM iterations of the torch mixture on ``x``'s device from ``start``'s parameters."""
    from jimray.cluster.gmm import GaussianMixture

    state = {**start.get_state(), "warm_start": True, "max_iter": iters, "tol": 0.0}
    gmm = GaussianMixture.from_state(state | {"dtype": str(dtype).replace("torch.", "")}, device=x.device)
    xd = x.to(dtype)
    _sync(x.device)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gmm.fit(xd)
    _sync(x.device)
    seconds = time.perf_counter() - t0
    return {"impl": "jimray torch EM", "device": str(x.device), "dtype": str(dtype).replace("torch.", ""),
            "n": x.shape[0], "n_iter": gmm.n_iter_, "fit_s": seconds, "s_per_iter": seconds / gmm.n_iter_,
            "s_per_iter_at_n": seconds / gmm.n_iter_, "mean_loglik": gmm.lower_bound_}  # fmt: skip


def sklearn_em(x: np.ndarray, start, iters: int, n_rows: int, n_total: int) -> dict:
    """scikit-learn's EM (CPU, float64) for ``iters`` iterations from ``start`` on ``n_rows`` random rows of ``x``;
    ``s_per_iter_at_n`` scales its per-iteration time to ``n_total`` rows."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    rows = x if n_rows >= len(x) else x[np.random.default_rng(0).choice(len(x), n_rows, replace=False)]
    chol = start.precisions_cholesky_.cpu().numpy()
    sk = SkGaussianMixture(start.n_components, covariance_type="full", max_iter=iters, tol=0.0,
                           reg_covar=start.reg_covar, init_params="random_from_data",
                           weights_init=start.weights_.cpu().numpy(), means_init=start.means_.cpu().numpy(),
                           precisions_init=chol @ chol.transpose(0, 2, 1))  # fmt: skip
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sk.fit(rows)
    seconds = time.perf_counter() - t0
    per_iter = seconds / sk.n_iter_
    return {"impl": "scikit-learn GaussianMixture", "device": "cpu", "dtype": "float64", "n": len(rows),
            "n_iter": sk.n_iter_, "fit_s": seconds, "s_per_iter": per_iter,
            "s_per_iter_at_n": per_iter * n_total / len(rows), "mean_loglik": float(sk.lower_bound_)}  # fmt: skip


def _sklearn_rows(x: np.ndarray, start, s: GpuBenchSettings, deadline: Deadline, part: dict) -> int:
    """How many rows scikit-learn gets: all of them when the estimate (from 1 iteration on a subsample) fits
    70% of the time left, else as many as fit (at least ``sklearn_min_n``); 0 when not even that fits."""
    n = len(x)
    probe = min(n, s.sklearn_min_n)
    calibration = sklearn_em(x, start, 1, probe, n)
    part["sklearn_calibration"] = calibration
    per_row_iter = calibration["fit_s"] / probe / 2  # 1 iteration + the initial M-step on the given start
    affordable = int(0.7 * deadline.left() / (per_row_iter * (s.gmm_iters + 1)))
    if affordable >= n:
        return n
    return affordable // 1000 * 1000 if affordable >= probe else 0


def gmm_section(s: GpuBenchSettings, deadline: Deadline, rec: Recorder, part: dict) -> None:
    """Section 2: ``part["rows"]``: torch EM on the device (float64, float32), scikit-learn on the CPU (the
    mixture's "did not converge" warnings are expected with ``tol = 0`` and silenced)."""
    gmm_log = logging.getLogger("jimray.cluster.gmm")
    level = gmm_log.level
    gmm_log.setLevel(logging.ERROR)
    try:
        _gmm_rows(s, deadline, rec, part)
    finally:
        gmm_log.setLevel(level)


def _blas_threads() -> int | None:
    from threadpoolctl import threadpool_info

    return max((info["num_threads"] for info in threadpool_info()), default=None)


def _gmm_rows(s: GpuBenchSettings, deadline: Deadline, rec: Recorder, part: dict) -> None:
    """The data (``make_mixture_data``), the common start on the device, torch EM rows, then scikit-learn."""
    from jimray.bench.gmm import make_mixture_data

    part |= {"cpu_count": os.cpu_count(), "blas_threads": _blas_threads(), "torch_threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    x = make_mixture_data(s.gmm_n, s.gmm_d, s.gmm_k)
    xd = torch.as_tensor(x, device=s.device)
    part |= {"data_s": time.perf_counter() - t0, "rows": [], "n": s.gmm_n, "d": s.gmm_d, "K": s.gmm_k,
             "iterations": s.gmm_iters}  # fmt: skip
    t0 = time.perf_counter()
    start = _gmm_start(xd, s.gmm_k)
    _sync(s.device)
    part["init_s"], part["init_backend"] = time.perf_counter() - t0, getattr(start, "init_backend_", None)
    cost = 5.0 if not s.smoke else 0.0
    for dtype in (torch.float64, torch.float32):
        if not deadline.allows(cost):
            _skip(part, f"torch EM {dtype}")
            continue
        part["rows"].append(torch_em(xd, start, s.gmm_iters, dtype))
        cost = 1.5 * part["rows"][-1]["fit_s"]
        rec.save()
    del xd
    _free(s.device)
    _sklearn_part(x, start, s, deadline, part)
    rec.save()


def _sklearn_part(x: np.ndarray, start, s: GpuBenchSettings, deadline: Deadline, part: dict) -> None:
    n_rows = _sklearn_rows(x, start, s, deadline, part) if deadline.allows(5.0 if not s.smoke else 0.0) else 0
    if n_rows == 0:
        _skip(part, "scikit-learn")
        return
    row = sklearn_em(x, start, s.gmm_iters, n_rows, len(x))
    part["rows"].append(row)
    if n_rows < len(x):
        part["note"] = (f"scikit-learn ran on a random subsample of {n_rows:,} of the {len(x):,} rows to stay in the "
                        "time budget; s_per_iter_at_n scales its per-iteration time to all rows (EM is linear in n), "
                        "and its log-likelihood is of the subsample")  # fmt: skip
    for r in part["rows"]:
        r["speedup_vs_sklearn"] = row["s_per_iter_at_n"] / r["s_per_iter_at_n"]


# ---------------------------------------------------------------------------------------------- 3. Jim-Net vs search


def _pairs(s: GpuBenchSettings, reference: torch.Tensor, seed: int, n: int, max_angle: float = 180.0):
    from jimray.simulate.pairs import simulate_pairs

    return simulate_pairs(reference, n, SNR, TILT, seed, max_relative_angle_degrees=max_angle)


def _load_network(path: str, device):
    from jimray.model import JimNet
    from jimray.train.pretrain import load_pretrained_weights
    from jimray.train.state import load_pretrained

    pretrained = load_pretrained(path)
    model = JimNet(ModelConfig.model_validate(pretrained.model_config), 1)
    load_pretrained_weights(model, pretrained)
    return model.to(device), {"network": f"loaded from {path}"}


def train_network(s: GpuBenchSettings, reference: torch.Tensor, seconds: float):
    """Jim-Net (``s.model``) trained here by the alignment loss on fresh pairs of ``reference`` for ``seconds``
    (at most ``max_train_steps``): relative rotations up to 30 degrees the first half, 60 the second; bf16."""
    from jimray.model import JimNet
    from jimray.train.pretrain import PairTraining, alignment_step

    torch.manual_seed(0)
    model = JimNet(s.model, 1).to(s.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    plan = PairTraining(snr=SNR, tilt_range_degrees=TILT, curriculum=[(60.0, 1)], batch_size=s.train_batch,
                        precision="bf16")  # fmt: skip
    start, steps, losses = time.perf_counter(), 0, []
    while steps < s.max_train_steps and (steps == 0 or time.perf_counter() - start < seconds):
        angle = 30.0 if time.perf_counter() - start < seconds / 2 else 60.0
        losses.append(alignment_step(model, optimizer, _pairs(s, reference, steps, s.train_batch, angle), plan))
        steps += 1
    info = {"network": "trained here", "train_steps": steps, "train_seconds": time.perf_counter() - start,
            "train_batch": s.train_batch, "train_loss_last": float(np.mean(losses[-20:]))}  # fmt: skip
    return model, info


def _errors(pairs, rotations: torch.Tensor, shifts: torch.Tensor, n: int) -> dict:
    from jimray.conventions import rotation_error, translation_error

    errors = rotation_error(pairs.rotations[:n].cpu(), rotations[:n].cpu())
    shift_errors = translation_error(pairs.shifts[:n].cpu(), shifts[:n].cpu())
    return {"n_scored": n, "rotation_error_mean": float(errors.mean()),
            "rotation_error_median": float(np.median(errors)), "fraction_within_0.5": float((errors < 0.5).mean()),
            "translation_error_voxels": float(shift_errors.mean())}  # fmt: skip


@torch.no_grad()
def jimnet_poses(model, pairs, precision: str, anchors: str | None, batch: int = 32):
    """Poses ``(R (n, 3, 3), t (n, 3))`` of every pair by one forward pass (``anchors`` None) or multi-start, and
    the wall seconds (synchronised, after one untimed forward pass)."""
    from jimray.model.multistart import anchor_rotations, multistart_align

    model.eval()
    device = pairs.source.device
    rotations, shifts = [], []
    with tf32_scope(True if precision == "tf32" else None), autocast(precision, device):
        model(pairs.source[:batch], pairs.target[:batch])
        _sync(device)
        t0 = time.perf_counter()
        for i in range(0, len(pairs.source), batch):
            src, tgt = pairs.source[i : i + batch], pairs.target[i : i + batch]
            if anchors is None:
                out = model(src, tgt)
                r, t = out.rotations[-1], out.shifts[-1]
            else:
                r, t, _ = multistart_align(model, src, tgt, TILT, TILT, anchor_rotations(anchors, device=device))
            rotations.append(r.float())
            shifts.append(t.float())
    _sync(device)
    return torch.cat(rotations), torch.cat(shifts), time.perf_counter() - t0


def classical_search(s: GpuBenchSettings, pairs, step: float, deadline: Deadline, part: dict):
    """The constrained-CC search (global grid ``step`` degrees) on the pairs in chunks (the first: 2 pairs) while
    the deadline allows; returns ``(R, t, seconds)`` of the pairs done (the first ones)."""
    from jimray.baselines.search import align_pairs

    n, done, seconds, rotations, shifts, chunk = len(pairs.source), 0, 0.0, [], [], min(2, len(pairs.source))
    while done < n and (done == 0 or deadline.allows(seconds / done * chunk * 1.2)):
        t0 = time.perf_counter()
        res = align_pairs(pairs.source[done : done + chunk], pairs.target[done : done + chunk], TILT, TILT,
                          angular_step_degrees=step, refine_steps=s.refine_steps,
                          chunk_size=s.search_chunk)  # fmt: skip
        _sync(pairs.source.device)
        seconds += time.perf_counter() - t0
        rotations.append(res.rotations)
        shifts.append(res.shifts)
        done += chunk
        chunk = max(1, min(n - done, 16, int(0.8 * deadline.left() / (seconds / done))))
    if done < n:
        _skip(part, f"classical search ({step:g} deg) on {n - done} of {n} pairs")
    return torch.cat(rotations), torch.cat(shifts), seconds


def _search_rows(s: GpuBenchSettings, pairs, deadline: Deadline, rec: Recorder, part: dict) -> int | None:
    """One row per grid of ``s.angular_steps`` (a finer grid only when 2 pairs of it are expected to fit, scaled
    by the number of rotations from the previous grid); returns the number of pairs the first grid finished."""
    from jimray.baselines.search import align_pairs, so3_grid

    first, per_pair = None, 0.0
    for i, step in enumerate(s.angular_steps):
        ratio = 1.0 if i == 0 else so3_grid(step).shape[0] / so3_grid(s.angular_steps[i - 1]).shape[0]
        if deadline.left() <= 0 or not deadline.allows(2 * per_pair * ratio):
            _skip(part, f"classical search ({step:g} deg)")
            continue
        if i == 0:  # warm-up (FFT plans, kernels), untimed
            align_pairs(pairs.source[:1], pairs.target[:1], TILT, TILT, angular_step_degrees=step, refine_steps=1,
                        chunk_size=s.search_chunk)  # fmt: skip
        rotations, shifts, seconds = classical_search(s, pairs, step, deadline, part)
        n = len(rotations)
        per_pair = seconds / n
        part["rows"].append({"method": f"constrained-CC search ({step:g} deg grid, {s.refine_steps} refinements)",
                             "precision": "fp32", "pairs_timed": n, "pairs_per_s": n / seconds}
                            | _errors(pairs, rotations, shifts, n))  # fmt: skip
        first = n if first is None else first
        rec.save()
    return first


def _jimnet_rows(model, runs, part: dict, rec: Recorder) -> list:
    """Time and score each ``(method, precision, anchors, pairs)`` run on all its pairs; returns the poses."""
    poses = []
    for method, precision, anchors, pairs in runs:
        rotations, shifts, seconds = jimnet_poses(model, pairs, precision, anchors)
        n = len(pairs.source)
        part["rows"].append({"method": method, "precision": precision, "pairs_timed": n, "pairs_per_s": n / seconds}
                            | _errors(pairs, rotations, shifts, n))  # fmt: skip
        poses.append((rotations, shifts))
        rec.save()
    return poses


def search_section(s: GpuBenchSettings, deadline: Deadline, rec: Recorder, part: dict) -> None:
    """Section 3: ``part["rows"]``: Jim-Net single pass (bf16, tf32), multi-start, then the classical search on
    as many pairs as the budget allows; the Jim-Net rows on the uniform pairs are rescored on those pairs."""
    from jimray.simulate.embedded import embedded_maps

    reference = embedded_maps(10.0, s.search_box, names=[STRUCTURE])[STRUCTURE].to(s.device)
    uniform = _pairs(s, reference, HELD_OUT_SEED, s.search_pairs)
    within = _pairs(s, reference, HELD_OUT_SEED + 1, s.search_pairs, max_angle=60.0)
    part |= {"pairs": s.search_pairs, "box": s.search_box, "structure": STRUCTURE, "snr": SNR, "tilt": TILT,
             "rows": []}  # fmt: skip
    if s.model_path:
        model, info = _load_network(s.model_path, s.device)
    else:
        model, info = train_network(s, reference, s.train_share * deadline.left())
    part["network_info"] = info
    runs = [("Jim-Net single pass", "bf16", None, uniform), ("Jim-Net single pass", "tf32", None, uniform),
            ("Jim-Net single pass, pairs within 60 deg", "bf16", None, within),
            (f"Jim-Net multi-start ({s.anchors} anchors)", "bf16", s.anchors, uniform)]  # fmt: skip
    poses = _jimnet_rows(model, runs, part, rec)
    n_search = _search_rows(s, uniform, deadline, rec, part)
    if n_search is not None:  # the Jim-Net rows on the uniform pairs, scored on the pairs the search finished
        for row, (r, t), run_ in zip(part["rows"], poses, runs, strict=False):
            if run_[3] is uniform:
                row.update(_errors(uniform, r, t, n_search))


SECTIONS: dict[str, Callable[[GpuBenchSettings, Deadline, Recorder, dict], None]] = {
    "jimnet": jimnet_section, "gmm": gmm_section, "search": search_section}  # fmt: skip


# ---------------------------------------------------------------------------------------------- runner


def _run_section(name: str, s: GpuBenchSettings, deadline: Deadline, rec: Recorder) -> None:
    part = rec.results["sections"].setdefault(name, {})
    part["status"] = "running"
    rec.save()
    t0 = time.perf_counter()
    try:
        SECTIONS[name](s, deadline, rec, part)
        part["status"] = "partial (budget)" if part.get("skipped") else "done"
    except Exception as exc:  # a failed section must not cost the others their time: record it, go on
        part["status"] = f"failed: {type(exc).__name__}: {exc}"[:500]
        part["traceback"] = traceback.format_exc(limit=8)
        _free(s.device)
    part["seconds"] = time.perf_counter() - t0
    rec.save()


def run(s: GpuBenchSettings, rec: Recorder, log: Callable[[str], None] = print) -> dict:
    """Every section of ``s.sections`` in turn, each with its share of the budget left; returns the results."""
    end = time.perf_counter() + s.budget_seconds
    for i, name in enumerate(s.sections):
        weight = SECTION_WEIGHTS[name] / sum(SECTION_WEIGHTS[n] for n in s.sections[i:])
        deadline = Deadline(weight * (end - time.perf_counter()))
        log(f"[bench gpu] {name}: up to {max(deadline.left(), 0):.0f} s")
        _run_section(name, s, deadline, rec)
        log(f"[bench gpu] {name}: {rec.results['sections'][name]['status']} "
            f"({rec.results['sections'][name]['seconds']:.1f} s)")  # fmt: skip
    return rec.results


def start_watchdog(rec: Recorder, seconds: float) -> threading.Timer:
    """End the process (exit code 3) after ``seconds``, once no result file is being written."""

    def stop() -> None:
        with rec.lock:
            sys.stderr.write(f"[bench gpu] hard time limit ({seconds:.0f} s) reached: stopping; the results so far "
                             f"are in {rec.out / rec.name}.json\n")  # fmt: skip
            sys.stderr.flush()
            os._exit(3)

    timer = threading.Timer(seconds, stop)
    timer.daemon = True
    timer.start()
    return timer


# ---------------------------------------------------------------------------------------------- markdown


def _fmt_section_header(name: str, part: dict) -> str:
    text = f"**{name}**: {part.get('status', 'not run')}, {part.get('seconds', float('nan')):.1f} s"
    if part.get("skipped"):
        text += "; skipped: " + "; ".join(part["skipped"])
    if part.get("status", "").startswith("failed"):
        text += f"\n\n```\n{part.get('traceback', '')}\n```"
    return text + "\n\n"


def _jimnet_md(part: dict) -> str:
    flops = "; ".join(f"box {b}: training step {f['train_gflop_per_pair']:.3f}, forward "
                      f"{f['inference_gflop_per_pair']:.3f} GFLOP" for b, f in part.get("flops", {}).items())
    cols = ["box", "batch", "precision", "train_pairs_per_s", "inference_pairs_per_s", "train_tflops",
            "train_fraction_of_peak", "inference_tflops", "inference_fraction_of_peak", "peak_memory_gib", "error"]
    return (f"Jim-Net speed (random pairs; fp32 = strict IEEE, tf32, bf16 autocast). Counted FLOPs per pair "
            f"(convolutions and matmuls only): {flops or 'none'}.\n\n" + markdown_table(part.get("rows", []), cols))


def _gmm_md(part: dict) -> str:
    text = (f"GMM EM, n = {part.get('n')}, d = {part.get('d')}, K = {part.get('K')}, full covariances, "
            f"{part.get('iterations')} iterations from one start (k-means++ + 1 EM step on the device, "
            f"{part.get('init_s', float('nan')):.1f} s, backend {part.get('init_backend')}). scikit-learn's fit_s "
            f"includes its initial M-step from the given start; CPU: {part.get('cpu_count')} cores, BLAS threads "
            f"{part.get('blas_threads')}.\n\n")  # fmt: skip
    if part.get("note"):
        text += f"Note: {part['note']}.\n\n"
    cols = ["impl", "device", "dtype", "n", "n_iter", "fit_s", "s_per_iter", "s_per_iter_at_n", "mean_loglik",
            "speedup_vs_sklearn"]
    return text + markdown_table(part.get("rows", []), cols)


def _search_md(part: dict) -> str:
    info = part.get("network_info", {})
    text = (f"Jim-Net vs classical search on the same pairs ({part.get('structure')}, SNR {part.get('snr')}, tilt "
            f"{part.get('tilt')}, box {part.get('box')}, {part.get('pairs')} pairs, relative rotations uniform on "
            f"SO(3) unless stated); errors are scored on the pairs the search finished (n_scored). Network: "
            f"{', '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in info.items())}.\n\n")
    cols = ["method", "precision", "pairs_timed", "pairs_per_s", "n_scored", "rotation_error_mean",
            "rotation_error_median", "fraction_within_0.5", "translation_error_voxels"]
    return text + markdown_table(part.get("rows", []), cols)


def gpu_markdown(results: dict) -> str:
    """The Markdown report of :func:`run`'s results (also of partial ones)."""
    peaks = results.get("peaks_tflops", {})
    peak_text = ", ".join(f"{k} {v:g}" for k, v in peaks.items() if k != "model") or "not in the table"
    text = (f"Device: {results.get('device_name')} (peak dense TFLOP/s, {peaks.get('model', 'unknown')}: "
            f"{peak_text}). Elapsed {results.get('elapsed_seconds', 0):.0f} s of a "
            f"{results['settings']['budget_seconds']:.0f} s budget.\n\n")  # fmt: skip
    writers = {"jimnet": _jimnet_md, "gmm": _gmm_md, "search": _search_md}
    for name, part in results.get("sections", {}).items():
        text += _fmt_section_header(name, part) + writers[name](part) + "\n"
    return text


# ---------------------------------------------------------------------------------------------- CLI


def _check_options(device: str, smoke: bool, budget_seconds: float, sections: tuple[str, ...],
                   batches: str) -> tuple[int, ...]:
    """Refuse impossible options with one clear message (exit code 2); returns the batch sizes."""
    from jimray.cli.errors import UserError

    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"--device must be cuda (or cuda:N) or cpu, got {device}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("jimray bench gpu needs a CUDA GPU and torch sees none (torch.cuda.is_available() is False). "
                        "To check the code paths on a CPU: jimray bench gpu --device cpu --smoke")
    if device == "cpu" and not smoke:
        raise UserError("--device cpu runs only with --smoke (tiny sizes); the full check needs a GPU")
    if budget_seconds <= 0:
        raise UserError(f"--budget-seconds must be > 0, got {budget_seconds}")
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        raise UserError(f"--sections: unknown {unknown}; choose among {list(SECTIONS)} (comma-separated)")
    try:
        sizes = tuple(int(b) for b in split_list(batches))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise UserError(f"--batches must be positive integers, comma-separated (e.g. 32,128), got {batches!r}")
    return sizes


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("gpu")
    def gpu(
        device: str = typer.Option("cuda", help="cuda (or cuda:N); cpu only with --smoke"),
        smoke: bool = typer.Option(False, "--smoke", help="tiny sizes: every code path in seconds (CPU tests)"),
        budget_seconds: float = typer.Option(420.0, help="time budget of all sections; a watchdog stops the "
                                             "process at the budget + 10% (at least 30 s)"),
        sections: str = typer.Option("jimnet,gmm,search", help="comma-separated sections to run, in this order"),
        batches: str = typer.Option("32,128", help="pairs per Jim-Net speed step, comma-separated"),
        model: str = typer.Option("", help="a `jimray pretrain` output for the search comparison (default: "
                                  "train one here within the budget)"),
        out: Path = typer.Option(Path("benchmarks"), help="folder for NAME.json and NAME.md"),
        name: str = typer.Option("", help="result file name (default gpu, or gpu_smoke with --smoke)"),
    ) -> None:
        """One budgeted GPU check: Jim-Net speed and TFLOP/s, GPU GMM vs scikit-learn, Jim-Net vs classical search."""
        chosen = split_list(sections)
        sizes = _check_options(device, smoke, budget_seconds, chosen, batches)
        s = smoke_settings(device, budget_seconds) if smoke else GpuBenchSettings(device=device,
                                                                                   budget_seconds=budget_seconds)
        s = replace(s, sections=chosen, model_path=model or None, batches=s.batches if smoke else sizes)
        name = name or ("gpu_smoke" if smoke else "gpu")
        rec = Recorder(out, name, "jimray " + " ".join(sys.argv[1:]), s)
        timer = start_watchdog(rec, s.budget_seconds + max(30.0, 0.1 * s.budget_seconds))
        try:
            results = run(s, rec, log=lambda line: typer.echo(line, err=True))
        finally:
            timer.cancel()
        typer.echo(gpu_markdown(results))
        failed = [n for n, p in results["sections"].items() if p["status"].startswith("failed")]
        if failed:
            typer.secho(f"error: section(s) {', '.join(failed)} failed; see {out / name}.md", err=True, fg="red")
            sys.exit(1)
