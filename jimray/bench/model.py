"""``jimray bench model``: Jim-Net's learning check (unsupervised alignment of one simulated structure) and speed.

Learning check: pairs are one embedded map under two uniform random poses (plus shifts of up to 2 voxels)
with independent noise (SNR 0.1) and a 30-degree missing wedge (tilt range 60), box 32. The net is trained by
the alignment loss alone (no labels, CE weight 0) on fresh pairs every step; the true relative pose
``compose(invert(pose_source), pose_target)`` is known, so rotation error (``||R_true - R_pred||_F``) and
translation error (voxels) of held-out pairs are measured before and along training.

Speed: training and inference pairs/s at box 32 for batch 8 and 32, parameter count and FLOPs per pair
(``torch.utils.flop_counter.FlopCounterMode``: convolutions and matmuls; FFTs and grid_sample are not counted).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import typer
from torch.utils.flop_counter import FlopCounterMode

from jimray.bench.common import markdown_table, write_results
from jimray.config import ModelConfig
from jimray.conventions import compose_poses, invert_pose, rotation_error, translation_error
from jimray.model import JimNet, jimnet_loss, parameter_count

# Dense FP32 (non-tensor-core) and TF32 tensor-core peaks, TFLOP/s, for the ratio to peak.
GPU_PEAK_TFLOPS = {"H100": (67.0, 494.7), "H200": (67.0, 494.7), "A100": (19.5, 156.0), "L4": (30.3, 60.0)}


@dataclass
class LearningSettings:
    structure: str = "6zu5_ribosome"
    box_size: int = 32
    voxel_size_angstrom: float = 10.0
    snr: float = 0.1
    tilt_range_degrees: float = 60.0
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    eval_pairs: int = 64
    eval_every: int = 100
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)


@dataclass
class PairBatch:
    source: torch.Tensor
    target: torch.Tensor
    rotations: torch.Tensor  # (b, 3, 3) true pose carrying source onto target
    shifts: torch.Tensor  # (b, 3) voxels


def _normalise(volumes: torch.Tensor) -> torch.Tensor:
    mean = volumes.mean(dim=(-3, -2, -1), keepdim=True)
    std = volumes.std(dim=(-3, -2, -1), keepdim=True).clamp_min(1e-6)
    return (volumes - mean) / std


def simulate_pairs(reference: torch.Tensor, n_pairs: int, s: LearningSettings, seed: int) -> PairBatch:
    """``n_pairs`` (source, target) pairs of one map ``(d, h, w)``, each under its own random pose and noise."""
    from jimray.simulate.subtomogram import simulate_subtomograms

    sim = simulate_subtomograms([reference], 2 * n_pairs, s.snr, s.tilt_range_degrees, seed=seed)
    inv_r, inv_t = invert_pose(sim.rotations[0::2], sim.shifts[0::2])
    rot, shift = compose_poses(inv_r, inv_t, sim.rotations[1::2], sim.shifts[1::2])
    return PairBatch(_normalise(sim.volumes[0::2]), _normalise(sim.volumes[1::2]), rot, shift)


def _to(batch: PairBatch, device) -> PairBatch:
    return PairBatch(*(x.to(device) for x in (batch.source, batch.target, batch.rotations, batch.shifts)))


@torch.no_grad()
def evaluate(model: JimNet, pairs: PairBatch, batch_size: int = 16) -> dict[str, float]:
    """Mean rotation error (final and first stage) and translation error over held-out pairs."""
    model.eval()
    rot_final, rot_first, shifts = [], [], []
    for i in range(0, len(pairs.source), batch_size):
        out = model(pairs.source[i : i + batch_size], pairs.target[i : i + batch_size])
        rot_final.append(out.rotations[-1].cpu())
        rot_first.append(out.rotations[0].cpu())
        shifts.append(out.shifts[-1].cpu())
    model.train()
    true_r, true_t = pairs.rotations.cpu(), pairs.shifts.cpu()
    return {
        "rotation_error": float(rotation_error(true_r, torch.cat(rot_final)).mean()),
        "rotation_error_stage1": float(rotation_error(true_r, torch.cat(rot_first)).mean()),
        "translation_error_voxels": float(translation_error(true_t, torch.cat(shifts)).mean()),
    }


def _train_step(model: JimNet, optimizer, pairs: PairBatch, s: LearningSettings) -> dict[str, float]:
    out = model(pairs.source, pairs.target)
    tilts = torch.full((len(pairs.source),), s.tilt_range_degrees, device=pairs.source.device)
    terms = jimnet_loss(out, pairs.source, pairs.target, tilts, tilts, None, [1.0] * s.model.stages, 0.0,
                        s.model.lowpass_cycles_per_voxel)  # fmt: skip
    optimizer.zero_grad(set_to_none=True)
    terms["total"].backward()
    optimizer.step()
    return {k: float(v.detach()) for k, v in terms.items()}


def learning_check(s: LearningSettings, device, progress=None, on_eval=None) -> dict:
    """Train by the unsupervised alignment loss on fresh simulated pairs; the held-out error curve.

    ``progress(step)`` is called after every step, ``on_eval(row)`` after every held-out evaluation."""
    from jimray.simulate.embedded import embedded_maps

    reference = embedded_maps(s.voxel_size_angstrom, s.box_size, names=[s.structure])[s.structure]
    held_out = _to(simulate_pairs(reference, s.eval_pairs, s, seed=s.seed + 10_000_000), device)
    identity = held_out.rotations.new_tensor(np.eye(3)).expand_as(held_out.rotations).cpu()
    torch.manual_seed(s.seed)
    model = JimNet(s.model, 1).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=s.lr)
    curve = [{"step": 0, "pairs_seen": 0, "loss": float("nan"), "seconds": 0.0, **evaluate(model, held_out)}]
    start, losses = time.perf_counter(), []
    for step in range(1, s.steps + 1):
        pairs = _to(simulate_pairs(reference, s.batch_size, s, seed=s.seed + step), device)
        losses.append(_train_step(model, optimizer, pairs, s)["total"])
        if step % s.eval_every == 0 or step == s.steps:
            curve.append({"step": step, "pairs_seen": step * s.batch_size, "loss": float(np.mean(losses)),
                          "seconds": time.perf_counter() - start, **evaluate(model, held_out)})  # fmt: skip
            losses = []
            if on_eval is not None:
                on_eval(curve[-1])
        if progress is not None:
            progress(step)
    return {
        "curve": curve,
        "train_seconds": time.perf_counter() - start,
        "identity_rotation_error": float(rotation_error(held_out.rotations.cpu(), identity).mean()),
        "parameters": parameter_count(model),
    }


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def speed(config: ModelConfig, box_size: int, batch_size: int, device, reps: int = 3) -> dict:
    """Training and inference pairs/s of random pairs (alignment-only loss), after one warm-up step."""
    torch.manual_seed(0)
    model = JimNet(config, 4).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    source = torch.randn(batch_size, box_size, box_size, box_size, device=device)
    target = torch.randn_like(source)
    eye = torch.eye(3, device=device).expand(batch_size, 3, 3)
    pairs = PairBatch(source, target, eye, source.new_zeros(batch_size, 3))
    s = LearningSettings(model=config)
    result = {"device": str(device), "batch": batch_size}
    _train_step(model, optimizer, pairs, s)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        _train_step(model, optimizer, pairs, s)
    _sync(device)
    result["train_pairs_per_s"] = reps * batch_size / (time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():
        model(source, target)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            model(source, target)
        _sync(device)
    result["inference_pairs_per_s"] = reps * batch_size / (time.perf_counter() - t0)
    return result


def flops_per_pair(config: ModelConfig, box_size: int) -> dict[str, float]:
    """Counted FLOPs of one pair: inference forward, and one training step (forward + loss + backward)."""
    model = JimNet(config, 4)
    source, target = torch.randn(2, 1, box_size, box_size, box_size).unbind(0)
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            model(source, target)
    forward = counter.get_total_flops()
    s = LearningSettings(model=config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    pairs = PairBatch(source, target, torch.eye(3)[None], torch.zeros(1, 3))
    with FlopCounterMode(display=False) as counter:
        _train_step(model, optimizer, pairs, s)
    return {"forward_gflop": forward / 1e9, "train_step_gflop": counter.get_total_flops() / 1e9}


def peak_ratio(row: dict, flops: dict[str, float]) -> None:
    """Add achieved TFLOP/s and its fraction of the GPU's FP32 / TF32 peaks to a CUDA speed row."""
    if not row["device"].startswith("cuda"):
        return
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), None)
    achieved = row["train_pairs_per_s"] * flops["train_step_gflop"] / 1e3
    row["train_tflops"] = achieved
    if peak is not None:
        row["fraction_of_fp32_peak"] = achieved / peak[0]
        row["fraction_of_tf32_peak"] = achieved / peak[1]


def plot_curve(curve: list[dict], path: Path, reference: float | None = 0.62) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    pairs = [c["pairs_seen"] for c in curve]
    ax.plot(pairs, [c["rotation_error"] for c in curve], "o-", label="final stage")
    ax.plot(pairs, [c["rotation_error_stage1"] for c in curve], "s--", label="stage 1")
    if reference is not None:
        ax.axhline(reference, color="grey", ls=":", label="Gum-Net, paper (SNR 0.1)")
    ax.set_xlabel("training pairs seen")
    ax.set_ylabel("mean rotation error ||R_true - R_pred||_F")
    ax.set_ylim(0, 2.9)
    ax.legend()
    ax.set_title("Jim-Net 3D, unsupervised alignment, SNR 0.1, 30-degree wedge, box 32")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def learning_markdown(learning: dict, s: LearningSettings, curve_path: str) -> str:
    first, last = learning["curve"][0], learning["curve"][-1]
    text = (
        f"Learning check: structure `{s.structure}`, box {s.box_size}, SNR {s.snr}, tilt range "
        f"{s.tilt_range_degrees:g} (30-degree wedge), {s.steps} steps x batch {s.batch_size} = "
        f"{s.steps * s.batch_size} fresh pairs, alignment loss only (no labels), Adam lr {s.lr}; "
        f"{s.eval_pairs} held-out pairs; trained in {learning['train_seconds']:.0f} s (1-min load average "
        f"{learning['load_average_1min'][0]:.1f} before, {learning['load_average_1min'][1]:.1f} after: the CPU is "
        "shared, so wall times are upper bounds).\n\n"
        f"Rotation error before training {first['rotation_error']:.3f} (identity guess "
        f"{learning['identity_rotation_error']:.3f}), after {last['rotation_error']:.3f}; translation error "
        f"{first['translation_error_voxels']:.2f} -> {last['translation_error_voxels']:.2f} voxels. "
        f"Paper's Gum-Net at SNR 0.1: 0.62. Curve: `{curve_path}`.\n\n"
    )
    return text + markdown_table(learning["curve"], ["step", "pairs_seen", "seconds", "loss", "rotation_error",
                                                     "rotation_error_stage1", "translation_error_voxels"])  # fmt: skip


def speed_markdown(rows: list[dict], flops: dict, parameters: int, box_size: int, load: float) -> str:
    text = (
        f"Speed (box {box_size}; {parameters:,} parameters; counted FLOPs per pair: forward "
        f"{flops['forward_gflop']:.3f} GFLOP, training step {flops['train_step_gflop']:.3f} GFLOP, convolutions "
        f"and matmuls only; 1-min load average {load:.1f} at the start):\n\n"
    )
    cols = ["device", "batch", "train_pairs_per_s", "inference_pairs_per_s", "train_tflops", "fraction_of_fp32_peak"]
    return text + markdown_table(rows, cols)


def run(
    s: LearningSettings, devices: list[str], curve_path: Path, progress=None, on_eval=None, learning: bool = True
) -> tuple[dict, str]:
    """The whole benchmark: learning check on the first device (unless ``learning`` is False), speed on each;
    returns (results, markdown)."""
    results: dict = {"settings": {k: v for k, v in vars(s).items() if k != "model"} | {"model": s.model.model_dump()}}
    md = ""
    if learning:
        load_before = os.getloadavg()[0]
        results["learning"] = learning_check(s, devices[0], progress, on_eval)
        results["learning"]["load_average_1min"] = [load_before, os.getloadavg()[0]]
        plot_curve(results["learning"]["curve"], curve_path)
        md = learning_markdown(results["learning"], s, str(curve_path)) + "\n"
    load = os.getloadavg()[0]
    flops = flops_per_pair(s.model, s.box_size)
    rows = []
    for device in devices:
        for batch in (8, 32):
            row = speed(s.model, s.box_size, batch, device)
            peak_ratio(row, flops)
            rows.append(row)
    results |= {"speed": rows, "flops": flops, "parameters": parameter_count(JimNet(s.model, 1))}
    return results, md + speed_markdown(rows, flops, results["parameters"], s.box_size, load)


def _show_eval(console, row: dict, out: Path) -> None:
    """Print an evaluation row and append it to ``out/model_partial.jsonl`` (kept if the run is stopped)."""
    console.print({k: round(v, 3) for k, v in row.items()})
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "model_partial.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")


def _settings(steps: int, batch_size: int, eval_every: int, eval_pairs: int, lr: float, structure: str):
    from jimray.cli.errors import UserError
    from jimray.simulate.embedded import embedded_structure_names

    if min(steps, batch_size, eval_every, eval_pairs) < 1:
        raise UserError("--steps, --batch-size, --eval-every and --eval-pairs must all be >= 1")
    if structure not in embedded_structure_names():
        raise UserError(f"--structure {structure} is unknown: choose one of {embedded_structure_names()}")
    return LearningSettings(structure=structure, steps=steps, batch_size=batch_size, eval_every=eval_every,
                            eval_pairs=eval_pairs, lr=lr)  # fmt: skip


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("model")
    def model_bench(
        steps: int = typer.Option(1000, help="training steps of the learning check"),
        batch_size: int = typer.Option(8, help="pairs per training step"),
        eval_every: int = typer.Option(100, help="steps between held-out evaluations"),
        eval_pairs: int = typer.Option(64, help="held-out pairs"),
        lr: float = typer.Option(1e-3, help="Adam learning rate"),
        structure: str = typer.Option("6zu5_ribosome", help="embedded structure to align"),
        out: Path = typer.Option(Path("benchmarks"), help="folder for model.json / model.md / model_curve.png"),
        learning: bool = typer.Option(True, help="--no-learning measures the speed only"),
    ) -> None:
        """Jim-Net learning check (rotation error along unsupervised training) and training/inference speed."""
        from rich.progress import Progress

        s = _settings(steps, batch_size, eval_every, eval_pairs, lr, structure)
        devices = (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]
        command = (f"jimray bench model --steps {steps} --batch-size {batch_size} --eval-every {eval_every} "
                   f"--eval-pairs {eval_pairs} --lr {lr} --structure {structure}")  # fmt: skip
        command += "" if learning else " --no-learning"
        with Progress() as bar:
            task = bar.add_task("training", total=steps if learning else 0)
            results, md = run(s, devices, out / "model_curve.png", lambda i: bar.update(task, completed=i),
                              lambda row: _show_eval(bar.console, row, out), learning)  # fmt: skip
        write_results(out, "model", results, md, command)
        typer.echo(md)
