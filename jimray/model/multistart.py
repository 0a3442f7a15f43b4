"""Multi-start alignment: run Jim-Net from several starting rotations and keep the best-scoring pose.

A trained alignment branch converges from within a limited range of starting errors (its capture range; a few
tens of degrees, BENCHMARKS.md). The rotation groups of the octahedron (24 rotations, every rotation within
62.8 degrees of one of them) and the icosahedron (60, within 44.5 degrees) cover SO(3) with starting points:
the network is run once from each (``JimNet.forward(..., initial=(A, 0))``) and the pose whose warped source
has the highest missing-wedge-aware constrained correlation with the target
(:func:`jimray.fourier.ccc.constrained_ccc`, the alignment loss's own score) wins. The cost is one forward
pass per anchor. ``anchors="identity"`` is the single pass.
"""

from __future__ import annotations

import torch
from scipy.spatial.transform import Rotation

from jimray.fourier.ccc import alignment_mask, constrained_ccc

ANCHOR_GROUPS = {"identity": None, "octahedral": "O", "icosahedral": "I"}


def anchor_rotations(name: str, device=None, dtype=torch.float32) -> torch.Tensor:
    """Starting rotations ``(H, 3, 3)``: ``"identity"`` (1), ``"octahedral"`` (24) or ``"icosahedral"`` (60)."""
    if name not in ANCHOR_GROUPS:
        raise ValueError(f"unknown anchors '{name}': choose one of {sorted(ANCHOR_GROUPS)}")
    group = ANCHOR_GROUPS[name]
    if group is None:
        return torch.eye(3, device=device, dtype=dtype)[None]
    return torch.as_tensor(Rotation.create_group(group).as_matrix(), device=device, dtype=dtype)


@torch.no_grad()
def multistart_align(
    model,
    source: torch.Tensor,
    target: torch.Tensor,
    source_tilt_range_degrees: torch.Tensor | float,
    target_tilt_range_degrees: torch.Tensor | float,
    anchors: torch.Tensor,
    lowpass_cycles_per_voxel: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best pose over ``anchors`` ``(H, 3, 3)`` for each pair of ``(b, d, h, w)`` volumes.

    Returns ``(R (b, 3, 3), t (b, 3), scores (b, H))``: the pose carrying the source onto the target
    (:mod:`jimray.conventions`) and each anchor's final constrained correlation. Tilt ranges are scalars or
    ``(b,)``, degrees; the low-pass defaults to the model's loss low-pass.
    """
    if anchors.ndim != 3 or anchors.shape[-2:] != (3, 3):
        raise ValueError(f"anchors must be (H, 3, 3) rotations, got shape {tuple(anchors.shape)}")
    lowpass = model.config.lowpass_cycles_per_voxel if lowpass_cycles_per_voxel is None else lowpass_cycles_per_voxel
    b, shape = source.shape[0], tuple(source.shape[-3:])
    zeros = source.new_zeros(b, 3)
    best_r, best_t, scores = None, None, []
    for anchor in anchors.to(source.device, source.dtype):
        out = model(source, target, initial=(anchor.expand(b, 3, 3), zeros))
        rotation, shift = out.rotations[-1], out.shifts[-1]
        mask = alignment_mask(target_tilt_range_degrees, source_tilt_range_degrees, rotation, shape, lowpass)
        score = constrained_ccc(out.warped[-1], target, mask)
        if best_r is None:
            best_r, best_t, best_score = rotation, shift, score
        else:
            better = score > best_score
            best_r = torch.where(better[:, None, None], rotation, best_r)
            best_t = torch.where(better[:, None], shift, best_t)
            best_score = torch.maximum(score, best_score)
        scores.append(score)
    return best_r, best_t, torch.stack(scores, dim=1)
