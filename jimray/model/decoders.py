"""Pose decoders of Jim-Net's alignment stages: correlation layer -> soft correspondences -> rigid transform.

The paper regresses each stage's pose from its correlation map with a learned regressor. A learned regressor
must discover on its own how positions in a correlation map relate to a rotation, and trained by the
unsupervised alignment loss alone it stays at the identity (BENCHMARKS.md, learning check). The
``procrustes`` decoder builds that relation in:

* every (source position ``j``, target position ``n``) pair of a correlation layer gets the weight
  ``w_jn = P_jn c_s(j) c_t(n)``: ``P`` the *dual softmax* of the cosine similarity (softmax over the source
  positions times softmax over the target positions, temperature ``beta``), which is high only for mutual best
  matches, and ``c`` a learned per-position confidence of each side's features;
* global stage (eq. 4): all pairs of the two grids; local stage (eq. 5): the pairs within the radius-``r``
  neighbourhood, the warped source at ``pos_n + delta``;
* the weighted pairs are fitted by a rigid transform in closed form (:func:`jimray.geometry.procrustes`).

Because ``P`` and ``w`` are symmetric in the two volumes, a volume against itself decodes to the identity and
swapping source and target (global stage) decodes to the inverse transform. ``beta`` is learned. The learned
regressor of the paper still runs on every stage: its features form ``F(s, t)`` and its small pose output is
composed after the decoded pose. Positions are voxels ``(x, y, z)`` about the box centre
(:mod:`jimray.conventions`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from jimray.geometry.procrustes import fit_rigid, fit_rigid_soft


def feature_grid_positions(feature_size: int, box_size: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel position ``(x, y, z)`` about the box centre of every cell of a ``f^3`` feature grid, ``(f^3, 3)``,
    in the C order of the flattened ``(z, y, x)`` grid. Spectral pooling keeps the centre cell ``f // 2`` on the
    box centre ``box // 2`` and spaces cells ``box / f`` voxels apart."""
    if feature_size < 1 or box_size < feature_size:
        raise ValueError(f"need 1 <= feature_size <= box_size, got {feature_size} and {box_size}")
    coords = (torch.arange(feature_size, device=device, dtype=dtype) - feature_size // 2) * (box_size / feature_size)
    zz, yy, xx = torch.meshgrid(coords, coords, coords, indexing="ij")
    return torch.stack([xx, yy, zz], dim=-1).reshape(-1, 3)


def local_offsets(radius: int, cell_voxels: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """Displacements ``(x, y, z)`` in voxels of the ``(2r+1)^3`` channels of
    :func:`jimray.model.correlation.local_correlation` (C order over ``(dz, dy, dx)``), ``((2r+1)^3, 3)``."""
    steps = torch.arange(-radius, radius + 1, device=device, dtype=dtype) * cell_voxels
    dz, dy, dx = torch.meshgrid(steps, steps, steps, indexing="ij")
    return torch.stack([dx, dy, dz], dim=-1).reshape(-1, 3)


def bound_shift(shift: torch.Tensor, bound_voxels: torch.Tensor) -> torch.Tensor:
    """Smoothly bound each component of ``shift`` ``(b, 3)`` to ``(-bound, bound)``: ``bound tanh(t / bound)``."""
    return bound_voxels * torch.tanh(shift / bound_voxels)


def _windows(maps: torch.Tensor, radius: int, fill: float) -> torch.Tensor:
    """``out[b, k, p] = maps[b, p + delta_k]`` for ``(b, f, f, f)`` maps, ``fill`` outside the grid:
    ``(b, (2r+1)^3, f, f, f)`` in the channel order of :func:`jimray.model.correlation.local_correlation`."""
    k = 2 * radius + 1
    padded = F.pad(maps, (radius,) * 6, value=fill)
    windows = padded.unfold(1, k, 1).unfold(2, k, 1).unfold(3, k, 1)  # (b, f, f, f, k, k, k)
    b, f = maps.shape[0], maps.shape[1]
    return windows.reshape(b, f, f, f, k**3).permute(0, 4, 1, 2, 3)


class ProcrustesDecoder(nn.Module):
    """One stage's decoder (see the module docstring). ``beta`` starts at ``initial_temperature`` and is learned
    (as its log); the confidence ``sigmoid(conv1x1(features))`` starts uniform (zero weights)."""

    def __init__(self, channels: int, initial_temperature: float = 10.0):
        super().__init__()
        if initial_temperature <= 0:
            raise ValueError(f"initial_temperature must be > 0, got {initial_temperature}")
        self.log_temperature = nn.Parameter(torch.tensor(math.log(initial_temperature)))
        self.confidence = nn.Conv3d(channels, 1, kernel_size=1)
        nn.init.zeros_(self.confidence.weight)
        nn.init.zeros_(self.confidence.bias)

    def _confidence(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.confidence(features))[:, 0]  # (b, f, f, f)

    def global_pose(
        self,
        cosine: torch.Tensor,
        source_features: torch.Tensor,
        target_features: torch.Tensor,
        positions: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pose carrying the source onto the target from the global cosine correlation ``(b, j, n)`` (source
        position ``j``, target position ``n``; :func:`jimray.model.correlation.cosine_correlation`), the two
        ``(b, c, f, f, f)`` feature maps and the grid ``positions`` ``(f^3, 3)`` in voxels."""
        logits = self.log_temperature.exp() * cosine
        mutual = torch.softmax(logits, dim=1) * torch.softmax(logits, dim=2)
        c_s = self._confidence(source_features).flatten(1)
        c_t = self._confidence(target_features).flatten(1)
        return fit_rigid_soft(positions, positions, mutual * c_s[:, :, None] * c_t[:, None, :])

    def local_update(
        self,
        local: torch.Tensor,
        reverse: torch.Tensor,
        source_features: torch.Tensor,
        target_features: torch.Tensor,
        positions: torch.Tensor,
        offsets: torch.Tensor,
        radius: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Update carrying the warped source onto the target.

        ``local`` ``(b, K, f, f, f)`` = ``local_correlation(target, warped)`` (``<f_t(p), f_s(p + delta_k)>``),
        ``reverse`` = ``local_correlation(warped, target)``, ``K = (2r+1)^3``; feature maps ``(b, c, f, f, f)``
        (source = the warped source); grid ``positions`` ``(f^3, 3)`` and channel ``offsets`` ``(K, 3)`` in
        voxels."""
        b, k = local.shape[:2]
        beta = self.log_temperature.exp()
        inside = _windows(torch.ones_like(local[:, 0]), radius, 0.0) > 0  # p + delta_k lies on the grid
        logits = (beta * local).masked_fill(~inside, float("-inf"))
        per_target = torch.softmax(logits, dim=1)
        log_z_source = torch.logsumexp((beta * reverse).masked_fill(~inside, float("-inf")), dim=1)
        per_source = torch.exp(logits - _windows(log_z_source, radius, 0.0))
        c_s = _windows(self._confidence(source_features), radius, 0.0)
        weights = per_target * per_source * c_s * self._confidence(target_features)[:, None]
        targets = positions.expand(k, -1, -1)  # (K, f^3, 3)
        sources = targets + offsets[:, None, :]
        return fit_rigid(
            sources.reshape(1, -1, 3).expand(b, -1, -1), targets.reshape(1, -1, 3).expand(b, -1, -1),
            weights.reshape(b, -1),
        )
