"""Pretraining of Jim-Net's alignment branch on simulated pairs, with a curriculum of rotation angles.

Trained by the unsupervised alignment loss alone (eq. 7 without the CE term: no labels, no poses in the loss)
on fresh simulated pairs every step (:func:`jimray.simulate.pairs.simulate_pairs`) of the embedded structures.
The alignment loss only pulls a predicted pose towards the truth from within a narrow basin (tens of degrees at
the default low-pass), so a network that starts at the identity learns little from pairs turned uniformly on
SO(3); the curriculum first shows pairs turned by small angles, then larger ones (``curriculum`` stages of
``(largest angle, steps)``). The same loop is the learning check of ``jimray bench model``.

Pure torch (no Ray): it runs on one device; ``jimray pretrain`` writes its result for ``train.init_from``.
Held-out pairs (seeded apart from the training pairs) measure the rotation error on uniform-SO(3) pairs, the
paper's setting, and on pairs of the current stage's angle.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from jimray.conventions import rotation_error, translation_error
from jimray.model import JimNet
from jimray.model.multistart import anchor_rotations, multistart_align
from jimray.precision import PRECISIONS
from jimray.simulate.pairs import PairBatch, simulate_pairs
from jimray.train.step import pair_step

FULL_RANGE = 180.0
HELD_OUT_SEED = 10_000_000


@dataclass(frozen=True)
class PairTraining:
    """What :func:`train_on_pairs` needs: the simulated geometry and the optimisation schedule."""

    snr: float
    tilt_range_degrees: float
    curriculum: Sequence[tuple[float, int]]  # (largest relative rotation angle in degrees, steps)
    batch_size: int = 8
    lr: float = 1e-3
    eval_pairs: int = 32
    eval_every: int = 200
    seed: int = 0
    precision: str = "fp32"  # of every training step: fp32, tf32 or bf16 (jimray.precision, train.precision)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not self.curriculum:
            raise ValueError("the curriculum needs at least one (angle, steps) stage")
        for angle, steps in self.curriculum:
            if not 0 < angle <= 180 or steps < 1:
                raise ValueError(f"curriculum stage ({angle}, {steps}): angle in (0, 180] degrees, steps >= 1")

    @property
    def total_steps(self) -> int:
        return int(sum(n for _, n in self.curriculum))

    def angle_at(self, step: int) -> float:
        """Largest relative rotation angle of the training pairs at ``step`` (1-based)."""
        done = 0
        for angle, n in self.curriculum:
            done += n
            if step <= done:
                return float(angle)
        return float(self.curriculum[-1][0])


@torch.no_grad()
def evaluate_pairs(model: JimNet, pairs: PairBatch, batch_size: int = 16) -> dict[str, float]:
    """Mean rotation error (final and first stage), translation error (voxels) and the fraction of pairs within
    rotation error 0.5 (about 20 degrees) over ``pairs``; the model is left in training mode."""
    model.eval()
    rot_final, rot_first, shifts = [], [], []
    for i in range(0, len(pairs.source), batch_size):
        out = model(pairs.source[i : i + batch_size], pairs.target[i : i + batch_size])
        rot_final.append(out.rotations[-1].cpu())
        rot_first.append(out.rotations[0].cpu())
        shifts.append(out.shifts[-1].cpu())
    model.train()
    row = pose_errors(pairs, torch.cat(rot_final), torch.cat(shifts))
    return row | {"rotation_error_stage1": float(rotation_error(pairs.rotations.cpu(), torch.cat(rot_first)).mean())}


def pose_errors(pairs: PairBatch, rotations: torch.Tensor, shifts: torch.Tensor) -> dict[str, float]:
    """The paper's metrics of predicted ``rotations (n, 3, 3)`` / ``shifts (n, 3)`` against ``pairs``' truth:
    mean rotation error, the fraction within 0.5 (about 20 degrees), mean translation error (voxels)."""
    errors = rotation_error(pairs.rotations.cpu(), rotations)
    return {"rotation_error": float(errors.mean()),
            "translation_error_voxels": float(translation_error(pairs.shifts.cpu(), shifts).mean()),
            "fraction_within_0.5": float((errors < 0.5).mean())}  # fmt: skip


def _mixed_pairs(references: list[torch.Tensor], n: int, plan: PairTraining, seed: int, angle: float) -> PairBatch:
    """``n`` pairs, each of a structure drawn at random (seeded) from ``references``."""
    rng = np.random.default_rng(seed)
    which = rng.integers(len(references), size=n)
    parts = [
        simulate_pairs(references[k], int((which == k).sum()), plan.snr, plan.tilt_range_degrees, seed + 7919 * k,
                       max_relative_angle_degrees=angle)  # fmt: skip
        for k in range(len(references))
        if (which == k).any()
    ]
    return PairBatch(*(torch.cat([getattr(p, f) for p in parts]) for f in ("source", "target", "rotations", "shifts")))


class HeldOutPairs:
    """Held-out pairs: uniform SO(3) (the paper's metric) and, made on demand, pairs of a curriculum angle."""

    def __init__(self, references: list[torch.Tensor], plan: PairTraining, device):
        self.references, self.plan, self.device = references, plan, device
        self.sets: dict[float, PairBatch] = {}

    def pairs(self, angle: float) -> PairBatch:
        if angle not in self.sets:
            seed = self.plan.seed + HELD_OUT_SEED + int(round(angle * 10))
            self.sets[angle] = _mixed_pairs(self.references, self.plan.eval_pairs, self.plan, seed, angle).to(
                self.device
            )
        return self.sets[angle]

    def multistart_row(self, model: JimNet, anchors: str) -> dict[str, float]:
        """Errors on the uniform-SO(3) pairs of :func:`jimray.model.multistart.multistart_align` from ``anchors``,
        and its wall seconds per pair."""
        pairs = self.pairs(FULL_RANGE)
        start = time.perf_counter()
        model.eval()
        rotations, shifts = [], []
        for i in range(0, len(pairs.source), 16):
            r, t, _ = multistart_align(model, pairs.source[i : i + 16], pairs.target[i : i + 16],
                                       self.plan.tilt_range_degrees, self.plan.tilt_range_degrees,
                                       anchor_rotations(anchors, device=pairs.source.device))  # fmt: skip
            rotations.append(r.cpu())
            shifts.append(t.cpu())
        model.train()
        seconds = (time.perf_counter() - start) / len(pairs.source)
        rotations = torch.cat(rotations)
        median = float(np.median(rotation_error(pairs.rotations.cpu(), rotations)))
        errors = pose_errors(pairs, rotations, torch.cat(shifts))
        return {"anchors": anchors, "rotation_error_median": median, **errors, "seconds_per_pair": seconds}

    def row(self, model: JimNet, angle: float) -> dict[str, float]:
        row = evaluate_pairs(model, self.pairs(FULL_RANGE))
        if len(self.plan.curriculum) > 1 or angle < FULL_RANGE:
            at = evaluate_pairs(model, self.pairs(angle))
            row |= {"rotation_error_at_angle": at["rotation_error"],
                    "translation_error_at_angle": at["translation_error_voxels"],
                    "fraction_within_0.5_at_angle": at["fraction_within_0.5"]}  # fmt: skip
        return row


def alignment_step(model: JimNet, optimizer, pairs: PairBatch, plan: PairTraining) -> float:
    """One optimiser step of the alignment loss alone on ``pairs`` at ``plan.precision``; returns the loss."""
    tilts = torch.full((len(pairs.source),), plan.tilt_range_degrees, device=pairs.source.device)
    terms = pair_step(model, optimizer, pairs.source, pairs.target, tilts, tilts, None, [1.0] * model.config.stages,
                      0.0, model.config.lowpass_cycles_per_voxel, plan.precision)  # fmt: skip
    return float(terms["total"])


def train_on_pairs(
    model: JimNet,
    references: list[torch.Tensor],
    plan: PairTraining,
    device,
    progress: Callable[[int], None] | None = None,
    on_eval: Callable[[dict], None] | None = None,
    resume: dict | None = None,
    final_anchors: str | None = None,
) -> dict:
    """Train ``model`` (in place, on ``device``) on simulated pairs of ``references`` (maps ``(d, h, w)``) by
    the alignment loss alone, following ``plan``; returns ``{"curve", "train_seconds",
    "identity_rotation_error", "step", "optimizer_state"}``.

    ``progress(step)`` is called after every step; ``on_eval(result)`` after every held-out evaluation with the
    result so far (the curve's last row is the new one; ``model``'s weights are the current ones), which is
    what a caller checkpoints. ``resume`` (such a result, with the model already holding its weights) continues
    after its ``step``: training pairs are seeded by step, so a resumed run sees the same pairs.
    ``final_anchors`` (e.g. ``"octahedral"``) adds ``"multistart"``: the trained model's multi-start errors on the
    uniform-SO(3) held-out pairs (:meth:`HeldOutPairs.multistart_row`)."""
    if not references:
        raise ValueError("train_on_pairs needs at least one reference map")
    references = [r.to(device) for r in references]
    held_out = HeldOutPairs(references, plan, device)
    full = held_out.pairs(FULL_RANGE)
    identity = torch.eye(3).expand(len(full.source), 3, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=plan.lr)
    model.train()
    if resume is None:
        first = {"step": 0, "pairs_seen": 0, "max_relative_angle": plan.angle_at(1), "loss": float("nan"),
                 "seconds": 0.0}  # fmt: skip
        curve, done, spent = [first | held_out.row(model, plan.angle_at(1))], 0, 0.0
    else:
        optimizer.load_state_dict(resume["optimizer_state"])
        curve, done, spent = list(resume["curve"]), int(resume["step"]), float(resume["train_seconds"])
    result = {"identity_rotation_error": float(rotation_error(full.rotations.cpu(), identity).mean())}
    start, losses = time.perf_counter() - spent, []

    def snapshot(step: int) -> dict:  # what a checkpoint (and the caller) needs after ``step``
        return {"curve": curve, "train_seconds": time.perf_counter() - start, "step": step,
                "optimizer_state": optimizer.state_dict()}  # fmt: skip

    if progress is not None and done:
        progress(done)
    for step in range(done + 1, plan.total_steps + 1):
        angle = plan.angle_at(step)
        pairs = _mixed_pairs(references, plan.batch_size, plan, plan.seed + step, angle)
        losses.append(alignment_step(model, optimizer, pairs.to(device), plan))
        if step % plan.eval_every == 0 or step == plan.total_steps:
            row = {"step": step, "pairs_seen": step * plan.batch_size, "max_relative_angle": angle,
                   "loss": float(np.mean(losses)), "seconds": time.perf_counter() - start}  # fmt: skip
            curve.append(row | held_out.row(model, angle))
            losses = []
            result |= snapshot(step)
            if on_eval is not None:
                on_eval(result)
        if progress is not None:
            progress(step)
    result |= snapshot(plan.total_steps)
    if final_anchors:
        result["multistart"] = held_out.multistart_row(model, final_anchors)
    return result


def check_pretrained_fits(model_config: dict, pretrained_config: dict, source: str) -> None:
    """Raise ``ValueError`` naming every model field where a pretrained model differs from the job's."""
    diffs = [f"model.{k}: job {model_config.get(k)!r}, pretrained {pretrained_config.get(k)!r}"
             for k in sorted(set(model_config) | set(pretrained_config))
             if model_config.get(k) != pretrained_config.get(k)]  # fmt: skip
    if diffs:
        raise ValueError(f"{source} was pretrained with another model section; make the job's model section "
                         "equal to it (or pretrain again with this job):\n  " + "\n  ".join(diffs))


def load_pretrained_weights(model: JimNet, pretrained) -> None:
    """Load a :class:`jimray.train.state.Pretrained` into ``model``: everything but the cluster head, whose
    size (K) is the job's (the pretraining had no clusters)."""
    check_pretrained_fits(model.config.model_dump(mode="json"), pretrained.model_config, "the pretrained model")
    weights = {k: v for k, v in pretrained.model_state.items() if not k.startswith("cluster_head.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(not k.startswith("cluster_head.") for k in missing):
        raise ValueError(f"the pretrained weights do not fit this Jim-Net (missing {missing}, unexpected {unexpected})")
