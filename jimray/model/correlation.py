"""Correlation layers of Jim-Net (eqs. 4 and 5 of the paper), on ``(b, c, d, h, w)`` feature maps.

Features are L2-normalised per position first, so each entry is a cosine similarity in [-1, 1].
The target's positions stay the spatial grid; what they are compared with becomes the channel axis.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_pair(target_features: torch.Tensor, source_features: torch.Tensor) -> None:
    if target_features.ndim != 5 or target_features.shape != source_features.shape:
        raise ValueError(
            "correlation needs two (b, c, d, h, w) feature maps of one shape, got "
            f"{tuple(target_features.shape)} and {tuple(source_features.shape)}"
        )


def cosine_correlation(target_features: torch.Tensor, source_features: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every source position with every target position, ``(b, j, n)``:
    ``out[b, j, n] = <f_s(j), f_t(n)>`` of the L2-normalised features, ``j`` and ``n`` the flattened
    ``(z, y, x)`` indices of the source and target grids."""
    _check_pair(target_features, source_features)
    b, c = target_features.shape[:2]
    ft = F.normalize(target_features.reshape(b, c, -1), dim=1)
    fs = F.normalize(source_features.reshape(b, c, -1), dim=1)
    return torch.einsum("bcj,bcn->bjn", fs, ft)


def global_correlation_map(cosine: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Eq. 4's map from a :func:`cosine_correlation` ``(b, j, n)``: ReLU and L2 normalisation over ``j``
    (Rocco et al.), which damps ambiguous matches, laid out on the target grid ``(b, d*h*w, d, h, w)``."""
    b = cosine.shape[0]
    return F.normalize(F.relu(cosine), dim=1).reshape(b, cosine.shape[1], *grid)


def global_correlation(target_features: torch.Tensor, source_features: torch.Tensor) -> torch.Tensor:
    """Every target position against every source position (eq. 4): ``(b, d*h*w, d, h, w)``.

    ``out[b, j, z, y, x] = <f_t(z, y, x), f_s(j)>`` with ``j`` the flattened ``(z, y, x)`` source index;
    then ReLU and L2 normalisation over ``j`` (:func:`global_correlation_map`).
    """
    cosine = cosine_correlation(target_features, source_features)
    return global_correlation_map(cosine, tuple(target_features.shape[-3:]))


def local_correlation(target_features: torch.Tensor, source_features: torch.Tensor, radius: int) -> torch.Tensor:
    """Each target position against the source positions within ``radius`` on every axis (eq. 5).

    Output ``(b, (2r+1)^3, d, h, w)``; channel ``k`` is the displacement ``(dz, dy, dx)`` in C order over
    ``[-r, r]^3``: ``out[b, k, p] = <f_t(p), f_s(p + delta_k)>``, 0 outside the grid.
    """
    _check_pair(target_features, source_features)
    if radius < 0:
        raise ValueError(f"local correlation radius must be >= 0, got {radius}")
    b, _, d, h, w = target_features.shape
    k = 2 * radius + 1
    ft = F.normalize(target_features, dim=1)
    fs = F.pad(F.normalize(source_features, dim=1), (radius,) * 6)
    windows = fs.unfold(2, k, 1).unfold(3, k, 1).unfold(4, k, 1)  # (b, c, d, h, w, k, k, k), a view
    out = torch.einsum("bczyx,bczyxijl->bijlzyx", ft, windows)
    return out.reshape(b, k**3, d, h, w)
