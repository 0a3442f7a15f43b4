"""Jim-Net's training loss (eq. 7): ``CE(M_CP(F(s, t)), l_s) + sum_i gamma_i L_AL(G_i(s, t), t) + lambda L_R``.

``L_AL = 1 - CCC`` with the missing-wedge-aware constrained correlation of
:func:`jimray.fourier.ccc.constrained_ccc`; ``L_R`` is :func:`rigid_regularizer` of the final pose.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from jimray.fourier.ccc import alignment_mask, constrained_ccc
from jimray.model.jimnet import JimNetOutput


def rigid_regularizer(rotations: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """``4 pi / 3 (2/5 (3 - tr R) + ||t||^2)`` per sample ``(b,)``: the mean squared displacement
    ``int_B ||R x + t - x||^2`` of the points of the unit ball, times its volume.

    Units: ``shifts`` ``(b, 3)`` are in **box half-widths** (``t_voxels / (box / 2)``), the radius of the ball
    the formula integrates over, so a shift across half the box weighs like a 90-ish degree turn.
    ``rotations`` ``(b, 3, 3)``. Zero exactly at the identity.
    """
    if rotations.ndim != 3 or rotations.shape[-2:] != (3, 3) or shifts.shape != (rotations.shape[0], 3):
        raise ValueError(
            f"rigid_regularizer needs rotations (b, 3, 3) and shifts (b, 3), got {tuple(rotations.shape)} "
            f"and {tuple(shifts.shape)}"
        )
    trace = rotations.diagonal(dim1=-2, dim2=-1).sum(-1)
    return 4.0 * math.pi / 3.0 * (0.4 * (3.0 - trace) + shifts.square().sum(-1))


def jimnet_loss(
    output: JimNetOutput,
    source: torch.Tensor,
    target: torch.Tensor,
    source_tilt_range_degrees: torch.Tensor,
    target_tilt_range_degrees: torch.Tensor,
    labels: torch.Tensor | None,
    gamma: Sequence[float],
    lambda_reg: float,
    lowpass_cycles_per_voxel: float,
) -> dict[str, torch.Tensor]:
    """Eq. 7 of Jim-Net, each term a scalar averaged over the batch.

    Keys: ``"total"``, ``"ce"`` (0 when ``labels`` is None: unsupervised), ``"align_1" .. "align_m"``
    (``1 - CCC`` of each stage's warped source against the target), ``"reg"`` (unweighted
    :func:`rigid_regularizer` of the final pose). ``total = ce + sum_i gamma_i align_i + lambda_reg * reg``.
    Volumes ``(b, d, h, w)``; tilt ranges ``(b,)`` degrees; labels ``(b,)`` int64 in ``[0, K)`` or None.
    """
    stages = len(output.warped)
    if len(gamma) != stages:
        raise ValueError(f"gamma needs one weight per stage: got {len(gamma)} weights for {stages} stages")
    if source.shape != target.shape or source.ndim != 4:
        raise ValueError(f"source and target must be (b, d, h, w) of one shape, got {source.shape}, {target.shape}")
    shape = tuple(target.shape[-3:])
    terms: dict[str, torch.Tensor] = {}
    if labels is None:
        terms["ce"] = output.logits.new_zeros(())
    else:
        terms["ce"] = F.cross_entropy(output.logits, labels.to(output.logits.device).long())
    total = terms["ce"]
    for i, (warped, rotation) in enumerate(zip(output.warped, output.rotations, strict=True), start=1):
        mask = alignment_mask(
            target_tilt_range_degrees, source_tilt_range_degrees, rotation, shape, lowpass_cycles_per_voxel
        )
        terms[f"align_{i}"] = (1.0 - constrained_ccc(warped, target, mask)).mean()
        total = total + float(gamma[i - 1]) * terms[f"align_{i}"]
    half_box = 0.5 * target.new_tensor([shape[2], shape[1], shape[0]])
    terms["reg"] = rigid_regularizer(output.rotations[-1], output.shifts[-1] / half_box).mean()
    terms["total"] = total + float(lambda_reg) * terms["reg"]
    return terms
