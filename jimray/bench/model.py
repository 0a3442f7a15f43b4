"""``jimray bench model``: Jim-Net's learning check (unsupervised alignment of one simulated structure) and speed.

Learning check: pairs are one embedded map under two poses (the relative rotation uniform on SO(3), or, in a
curriculum stage, uniform among rotations up to that stage's angle; shifts of up to 2 voxels per axis) with
independent noise (SNR 0.1) and a 30-degree missing wedge (tilt range 60), box 32
(:func:`jimray.simulate.pairs.simulate_pairs`). The net is trained by the alignment loss alone (no labels, CE
weight 0) on fresh pairs every step; the true relative pose is known, so the rotation error
(``||R_true - R_pred||_F``) and translation error (voxels) of held-out pairs are measured before and along
training: on uniform-SO(3) pairs always (the issue's metric), and on pairs of the current curriculum angle.

Speed: training and inference pairs/s at box 32 for batch 8 and 32, parameter count and FLOPs per pair
(``torch.utils.flop_counter.FlopCounterMode``: convolutions and matmuls; FFTs and grid_sample are not counted).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import typer
from torch.utils.flop_counter import FlopCounterMode

from jimray.bench.common import markdown_table, write_results
from jimray.config import ModelConfig
from jimray.io.plots import plot_alignment_curve
from jimray.model import JimNet, parameter_count
from jimray.simulate.pairs import PairBatch
from jimray.simulate.pairs import simulate_pairs as _simulate_pairs
from jimray.train.pretrain import FULL_RANGE, PairTraining, alignment_step, evaluate_pairs, train_on_pairs

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
    curriculum: list[tuple[float, int]] | None = None  # (max relative angle in degrees, steps) stages
    final_anchors: str | None = "octahedral"  # multi-start evaluation of the trained model (None: skip)
    model: ModelConfig = field(default_factory=ModelConfig)

    def schedule(self) -> list[tuple[float, int]]:
        """The stages ``(max relative angle, steps)``: the curriculum, or ``steps`` on uniform SO(3)."""
        return list(self.curriculum) if self.curriculum else [(FULL_RANGE, self.steps)]

    def total_steps(self) -> int:
        return sum(n for _, n in self.schedule())


def parse_curriculum(text: str | None) -> list[tuple[float, int]] | None:
    """``"30:800,90:800,180:1000"`` -> ``[(30.0, 800), (90.0, 800), (180.0, 1000)]``; empty -> None."""
    if not text:
        return None
    stages = []
    for item in text.split(","):
        angle, _, steps = item.partition(":")
        try:
            stage = (float(angle), int(steps))
        except ValueError:
            raise ValueError(f"curriculum stage '{item}' is not ANGLE:STEPS (e.g. 30:800)") from None
        if not 0 < stage[0] <= 180 or stage[1] < 1:
            raise ValueError(f"curriculum stage '{item}': the angle must lie in (0, 180] and steps be >= 1")
        stages.append(stage)
    return stages


def simulate_pairs(
    reference: torch.Tensor, n_pairs: int, s: LearningSettings, seed: int, max_angle: float = FULL_RANGE
) -> PairBatch:
    """``n_pairs`` (source, target) pairs of one map ``(d, h, w)`` at the settings' SNR and wedge."""
    return _simulate_pairs(reference, n_pairs, s.snr, s.tilt_range_degrees, seed, max_relative_angle_degrees=max_angle)


def evaluate(model: JimNet, pairs: PairBatch, batch_size: int = 16) -> dict[str, float]:
    """Mean rotation error (final and first stage) and translation error over held-out pairs."""
    return evaluate_pairs(model, pairs, batch_size)


def plan_of(s: LearningSettings) -> PairTraining:
    return PairTraining(snr=s.snr, tilt_range_degrees=s.tilt_range_degrees, curriculum=s.schedule(),
                        batch_size=s.batch_size, lr=s.lr, eval_pairs=s.eval_pairs, eval_every=s.eval_every,
                        seed=s.seed)  # fmt: skip


def learning_check(s: LearningSettings, device, progress=None, on_eval=None, model_path: Path | None = None) -> dict:
    """Train by the unsupervised alignment loss on fresh simulated pairs; the held-out error curve
    (:func:`jimray.train.pretrain.train_on_pairs`) and the trained model's multi-start errors.

    ``progress(step)`` is called after every step, ``on_eval(row)`` after every held-out evaluation; the trained
    weights go to ``model_path`` (with the model section) when given."""
    from jimray.simulate.embedded import embedded_maps

    reference = embedded_maps(s.voxel_size_angstrom, s.box_size, names=[s.structure])[s.structure]
    torch.manual_seed(s.seed)
    model = JimNet(s.model, 1).to(device)
    report = None if on_eval is None else (lambda result: on_eval(result["curve"][-1]))
    result = train_on_pairs(model, [reference], plan_of(s), device, progress, report, final_anchors=s.final_anchors)
    result.pop("optimizer_state")
    if model_path is not None:
        model_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model_state": model.state_dict(), "model_config": s.model.model_dump(mode="json")}, model_path)
    return result | {"parameters": parameter_count(model)}


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
    plan = plan_of(LearningSettings(model=config))
    result = {"device": str(device), "batch": batch_size}
    alignment_step(model, optimizer, pairs, plan)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        alignment_step(model, optimizer, pairs, plan)
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
    plan = plan_of(LearningSettings(model=config))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    pairs = PairBatch(source, target, torch.eye(3)[None], torch.zeros(1, 3))
    with FlopCounterMode(display=False) as counter:
        alignment_step(model, optimizer, pairs, plan)
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


def _title(s: LearningSettings) -> str:
    stages = ", ".join(f"{a:g} deg x {n}" for a, n in s.schedule())
    return (f"Jim-Net 3D ({s.model.pose_decoder} decoder), unsupervised, SNR {s.snr:g}, "
            f"tilt +-{s.tilt_range_degrees:g}, box {s.box_size}\ntraining pairs: {stages} steps")  # fmt: skip


def learning_markdown(learning: dict, s: LearningSettings, curve_path: str) -> str:
    first, last = learning["curve"][0], learning["curve"][-1]
    stages = " then ".join(f"{n} steps with relative rotations up to {a:g} degrees" for a, n in s.schedule())
    text = (
        f"Learning check: structure `{s.structure}`, box {s.box_size}, SNR {s.snr}, tilt range "
        f"{s.tilt_range_degrees:g} (30-degree wedge), pose decoder `{s.model.pose_decoder}`; {stages}; batch "
        f"{s.batch_size} = {s.total_steps() * s.batch_size} fresh pairs, alignment loss only (no labels), Adam lr "
        f"{s.lr}; {s.eval_pairs} held-out pairs per set; trained in {learning['train_seconds']:.0f} s (1-min load "
        f"average {learning['load_average_1min'][0]:.1f} before, {learning['load_average_1min'][1]:.1f} after).\n\n"
        f"On held-out uniform-SO(3) pairs: rotation error before training {first['rotation_error']:.3f} (identity "
        f"guess {learning['identity_rotation_error']:.3f}), after {last['rotation_error']:.3f}; translation error "
        f"{first['translation_error_voxels']:.2f} -> {last['translation_error_voxels']:.2f} voxels. Paper's Gum-Net "
        f"at SNR 0.1: 0.62. Curve: `{curve_path}`.\n\n"
    )
    ms = learning.get("multistart")
    if ms:
        text += (
            f"Multi-start from the {ms['anchors']} anchors (`jimray.model.multistart`: one forward pass per anchor, "
            f"the best constrained correlation wins), same held-out uniform-SO(3) pairs: rotation error "
            f"{ms['rotation_error']:.3f} (median {ms['rotation_error_median']:.3f}, "
            f"{100 * ms['fraction_within_0.5']:.0f}% within 0.5), translation error "
            f"{ms['translation_error_voxels']:.2f} voxels, "
            f"{ms['seconds_per_pair']:.3f} s per pair.\n\n"
        )
    cols = ["step", "pairs_seen", "max_relative_angle", "seconds", "loss", "rotation_error", "rotation_error_stage1",
            "translation_error_voxels", "fraction_within_0.5"]  # fmt: skip
    if s.curriculum:
        cols += ["rotation_error_at_angle", "translation_error_at_angle", "fraction_within_0.5_at_angle"]
    return text + markdown_table(learning["curve"], cols)


def speed_markdown(rows: list[dict], flops: dict, parameters: int, box_size: int, load: float) -> str:
    text = (
        f"Speed (box {box_size}; {parameters:,} parameters; counted FLOPs per pair: forward "
        f"{flops['forward_gflop']:.3f} GFLOP, training step {flops['train_step_gflop']:.3f} GFLOP, convolutions "
        f"and matmuls only; 1-min load average {load:.1f} at the start):\n\n"
    )
    cols = ["device", "batch", "train_pairs_per_s", "inference_pairs_per_s", "train_tflops", "fraction_of_fp32_peak"]
    return text + markdown_table(rows, cols)


def run(
    s: LearningSettings, devices: list[str], curve_path: Path, progress=None, on_eval=None, learning: bool = True,
    speed_check: bool = True,
) -> tuple[dict, str]:
    """The whole benchmark: learning check on the first device (unless ``learning`` is False), speed on each
    (unless ``speed_check`` is False); returns (results, markdown)."""
    results: dict = {"settings": {k: v for k, v in vars(s).items() if k != "model"} | {"model": s.model.model_dump()}}
    md = ""
    if learning:
        load_before = os.getloadavg()[0]
        model_path = curve_path.with_name(curve_path.name.replace("_curve.png", "_model.pt"))
        results["learning"] = learning_check(s, devices[0], progress, on_eval, model_path)
        results["learning"]["load_average_1min"] = [load_before, os.getloadavg()[0]]
        plot_alignment_curve(results["learning"]["curve"], curve_path, _title(s))
        md = learning_markdown(results["learning"], s, str(curve_path)) + "\n"
    if not speed_check:
        return results, md
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


def _show_eval(console, row: dict, out: Path, name: str) -> None:
    """Print an evaluation row and append it to ``out/NAME_partial.jsonl`` (kept if the run is stopped)."""
    console.print({k: round(v, 3) for k, v in row.items()})
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}_partial.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")


def _settings(steps: int, batch_size: int, eval_every: int, eval_pairs: int, lr: float, structure: str,
              curriculum: str | None, pose_decoder: str, snr: float, anchors: str) -> LearningSettings:  # fmt: skip
    from jimray.cli.errors import UserError
    from jimray.simulate.embedded import embedded_structure_names

    if min(steps, batch_size, eval_every, eval_pairs) < 1:
        raise UserError("--steps, --batch-size, --eval-every and --eval-pairs must all be >= 1")
    if structure not in embedded_structure_names():
        raise UserError(f"--structure {structure} is unknown: choose one of {embedded_structure_names()}")
    if pose_decoder not in ("procrustes", "regressor"):
        raise UserError(f"--pose-decoder must be procrustes or regressor, got {pose_decoder}")
    if not snr > 0:
        raise UserError(f"--snr must be > 0 (inf for no noise), got {snr}")
    from jimray.model.multistart import ANCHOR_GROUPS

    if anchors not in (*ANCHOR_GROUPS, "none"):
        raise UserError(f"--anchors must be one of {[*ANCHOR_GROUPS, 'none']}, got {anchors}")
    try:
        stages = parse_curriculum(curriculum)
    except ValueError as exc:
        raise UserError(f"--curriculum: {exc}") from None
    return LearningSettings(structure=structure, steps=steps, batch_size=batch_size, eval_every=eval_every,
                            eval_pairs=eval_pairs, lr=lr, curriculum=stages, snr=snr,
                            final_anchors=None if anchors == "none" else anchors,
                            model=ModelConfig(pose_decoder=pose_decoder))  # fmt: skip


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("model")
    def model_bench(
        steps: int = typer.Option(1000, help="training steps of the learning check (without --curriculum)"),
        curriculum: str = typer.Option(
            "", help="stages ANGLE:STEPS of the largest relative rotation of the training pairs, e.g. "
            "'30:800,90:800,180:800' (held-out pairs stay uniform on SO(3)); empty = uniform SO(3) throughout"
        ),
        pose_decoder: str = typer.Option("procrustes", help="procrustes (default) or regressor (the paper's)"),
        snr: float = typer.Option(0.1, help="SNR of the simulated pairs"),
        anchors: str = typer.Option("octahedral", help="multi-start evaluation of the trained model: identity, "
                                    "octahedral (24 starts), icosahedral (60) or none"),
        batch_size: int = typer.Option(8, help="pairs per training step"),
        eval_every: int = typer.Option(100, help="steps between held-out evaluations"),
        eval_pairs: int = typer.Option(64, help="held-out pairs"),
        lr: float = typer.Option(1e-3, help="Adam learning rate"),
        structure: str = typer.Option("6zu5_ribosome", help="embedded structure to align"),
        name: str = typer.Option("model", help="result files NAME.json / NAME.md / NAME_curve.png"),
        out: Path = typer.Option(Path("benchmarks"), help="folder for the result files"),
        learning: bool = typer.Option(True, help="--no-learning measures the speed only"),
        speed_check: bool = typer.Option(True, "--speed/--no-speed", help="--no-speed skips the speed part"),
    ) -> None:
        """Jim-Net learning check (rotation error along unsupervised training) and training/inference speed."""
        from rich.progress import Progress

        s = _settings(steps, batch_size, eval_every, eval_pairs, lr, structure, curriculum, pose_decoder, snr, anchors)
        devices = (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]
        command = (f"jimray bench model --steps {steps} --batch-size {batch_size} --eval-every {eval_every} "
                   f"--eval-pairs {eval_pairs} --lr {lr} --structure {structure} --pose-decoder {pose_decoder} "
                   f"--snr {snr} --anchors {anchors} --name {name}")  # fmt: skip
        command += (f" --curriculum {curriculum}" if curriculum else "") + ("" if learning else " --no-learning")
        command += "" if speed_check else " --no-speed"
        with Progress() as bar:
            task = bar.add_task("training", total=s.total_steps() if learning else 0)
            results, md = run(s, devices, out / f"{name}_curve.png", lambda i: bar.update(task, completed=i),
                              lambda row: _show_eval(bar.console, row, out, name), learning, speed_check)  # fmt: skip
        write_results(out, name, results, md, command)
        typer.echo(md)
