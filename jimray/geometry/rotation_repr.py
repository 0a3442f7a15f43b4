"""Continuous rotation parameterisations a network can regress, mapped to rotation matrices.

Matrices act on ``(x, y, z)`` column vectors (see :mod:`jimray.conventions`). Both maps are
differentiable, batch-first, and send their "identity" parameters to the identity matrix:
``six_d_to_matrix([1, 0, 0, 0, 1, 0]) = I`` and ``quaternion_to_matrix([1, 0, 0, 0]) = I``.
"""

from __future__ import annotations

import torch

from jimray.precision import float32_region

IDENTITY_6D = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
IDENTITY_QUATERNION = (1.0, 0.0, 0.0, 0.0)


@float32_region
def six_d_to_matrix(six_d: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """6D representation (Zhou et al. 2019) ``(b, 6)`` -> rotation matrices ``(b, 3, 3)``.

    The two 3-vectors ``a1 = six_d[:, :3]``, ``a2 = six_d[:, 3:]`` are Gram-Schmidt orthonormalised into
    ``b1``, ``b2``; ``b3 = b1 x b2``. They are the *columns* of the matrix (``R e_x = b1``).
    """
    if six_d.ndim != 2 or six_d.shape[-1] != 6:
        raise ValueError(f"six_d must be (b, 6), got shape {tuple(six_d.shape)}")
    a1, a2 = six_d[:, :3], six_d[:, 3:]
    b1 = a1 / a1.norm(dim=-1, keepdim=True).clamp_min(eps)
    a2 = a2 - (b1 * a2).sum(dim=-1, keepdim=True) * b1
    b2 = a2 / a2.norm(dim=-1, keepdim=True).clamp_min(eps)
    b3 = torch.linalg.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)


@float32_region
def quaternion_to_matrix(quaternions: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Quaternions ``(b, 4)`` = ``(w, x, y, z)`` (normalised here; need not be unit) -> ``(b, 3, 3)``.

    The matrix rotates a vector ``v`` as ``q v q*`` (Hamilton convention, scalar first).
    """
    if quaternions.ndim != 2 or quaternions.shape[-1] != 4:
        raise ValueError(f"quaternions must be (b, 4) as (w, x, y, z), got shape {tuple(quaternions.shape)}")
    q = quaternions / quaternions.norm(dim=-1, keepdim=True).clamp_min(eps)
    w, x, y, z = q.unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip
    return torch.stack(rows, dim=-1).reshape(-1, 3, 3)
