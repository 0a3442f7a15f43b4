"""Differentiable weighted rigid fits (Procrustes / Kabsch) in pure torch, batch-first.

Used by Jim-Net's pose decoders (:mod:`jimray.model.decoders`): soft correspondences read from a correlation
layer become a rigid transform in closed form, so the network learns the correspondences, not the map from
correspondences to a pose.

:func:`fit_rigid_soft` fits weighted *pairs* (every source point against every target point, weight ``w_jn``);
:func:`fit_rigid` is the case of points in one-to-one correspondence. Both centre the points with the weights'
marginals, form the cross-covariance ``H = sum w_jn (y_n - y_bar)(x_j - x_bar)^T`` and take its orthogonal polar
factor (Kabsch) by scaled Newton iterations ``X <- (g X + X^-T / g) / 2``, which, unlike an SVD, have stable
gradients when singular values repeat (correspondences spread evenly in all directions). Where the polar factor
is a reflection (``det H < 0``: correspondences that fit no rotation), the Gram-Schmidt rotation of ``H``'s first
two columns is used instead. Exact for noise-free correspondences of a rigid motion; a symmetric weighting of
identical point sets gives the identity; swapping the point sets gives the inverse transform.
"""

from __future__ import annotations

import torch

from jimray.geometry.rotation_repr import six_d_to_matrix
from jimray.precision import float32_region

NEWTON_ITERATIONS = 14


@float32_region
def polar_rotation(matrices: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Nearest rotation to each ``(b, 3, 3)`` matrix: its orthogonal polar factor, or (where that is a
    reflection) the Gram-Schmidt rotation of its first two columns. ``eps`` (relative) keeps singular inputs
    invertible. Differentiable."""
    if matrices.ndim != 3 or matrices.shape[-2:] != (3, 3):
        raise ValueError(f"polar_rotation needs (b, 3, 3) matrices, got shape {tuple(matrices.shape)}")
    scale = matrices.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-30)
    eye = torch.eye(3, device=matrices.device, dtype=matrices.dtype)
    x = matrices / scale + eps * eye
    for _ in range(NEWTON_ITERATIONS):
        inv_t = torch.linalg.inv(x).transpose(-1, -2)
        gamma = (inv_t.norm(dim=(-2, -1), keepdim=True) / x.norm(dim=(-2, -1), keepdim=True)).sqrt()
        x = 0.5 * (gamma * x + inv_t / gamma)
    fallback = six_d_to_matrix(torch.cat([matrices[:, :, 0], matrices[:, :, 1]], dim=1))
    proper = (torch.linalg.det(x) > 0)[:, None, None]
    return torch.where(proper, x, fallback)


@float32_region
def fit_rigid_soft(
    source_points: torch.Tensor, target_points: torch.Tensor, pair_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rigid transform ``(R, t)`` with ``target_n ~ R source_j + t`` over all pairs weighted ``w_jn``.

    Shapes: ``source_points`` ``(J, 3)`` or ``(b, J, 3)``, ``target_points`` ``(N, 3)`` or ``(b, N, 3)`` in
    ``(x, y, z)`` (any length unit; ``t`` comes out in it), ``pair_weights`` ``(b, J, N)`` non-negative (need not
    sum to 1). Returns ``R`` ``(b, 3, 3)`` and ``t`` ``(b, 3)``.
    """
    if pair_weights.ndim != 3:
        raise ValueError(f"pair_weights must be (b, J, N), got shape {tuple(pair_weights.shape)}")
    b, n_source, n_target = pair_weights.shape
    x = source_points.expand(b, -1, -1) if source_points.ndim == 2 else source_points
    y = target_points.expand(b, -1, -1) if target_points.ndim == 2 else target_points
    if x.shape != (b, n_source, 3) or y.shape != (b, n_target, 3):
        raise ValueError(
            f"points must be (J, 3) / (b, J, 3) and (N, 3) / (b, N, 3) for pair_weights {tuple(pair_weights.shape)}, "
            f"got {tuple(source_points.shape)} and {tuple(target_points.shape)}"
        )
    w = pair_weights / pair_weights.sum(dim=(1, 2), keepdim=True).clamp_min(1e-30)
    x_mean = torch.einsum("bj,bjk->bk", w.sum(dim=2), x)
    y_mean = torch.einsum("bn,bnk->bk", w.sum(dim=1), y)
    xc, yc = x - x_mean[:, None], y - y_mean[:, None]
    cross = torch.einsum("bjn,bni,bjk->bik", w, yc, xc)
    rotation = polar_rotation(cross)
    shift = y_mean - (rotation @ x_mean.unsqueeze(-1)).squeeze(-1)
    return rotation, shift


@float32_region
def fit_rigid(
    source_points: torch.Tensor, target_points: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rigid transform ``(R, t)`` with ``target ~ R source + t`` for points in one-to-one correspondence.

    Shapes: points ``(b, n, 3)`` ``(x, y, z)``, weights ``(b, n)`` non-negative (None = uniform). Returns ``R``
    ``(b, 3, 3)`` (proper rotations) and ``t`` ``(b, 3)``. Differentiable in points and weights.
    """
    if source_points.ndim != 3 or source_points.shape[-1] != 3 or source_points.shape != target_points.shape:
        raise ValueError(
            "fit_rigid needs source and target points of one shape (b, n, 3), got "
            f"{tuple(source_points.shape)} and {tuple(target_points.shape)}"
        )
    b, n, _ = source_points.shape
    if weights is None:
        weights = source_points.new_ones(b, n)
    if weights.shape != (b, n):
        raise ValueError(f"weights must be (b, n) = {(b, n)}, got {tuple(weights.shape)}")
    w = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-30)
    x_mean = torch.einsum("bn,bnk->bk", w, source_points)
    y_mean = torch.einsum("bn,bnk->bk", w, target_points)
    cross = torch.einsum("bn,bni,bnk->bik", w, target_points - y_mean[:, None], source_points - x_mean[:, None])
    rotation = polar_rotation(cross)
    shift = y_mean - (rotation @ x_mean.unsqueeze(-1)).squeeze(-1)
    return rotation, shift
