"""Constrained cross-correlation for *all* cyclic shifts at once (FFT translational search).

The score is the one of :func:`jimray.fourier.ccc.constrained_ccc` with a mask built like
:func:`jimray.fourier.ccc.alignment_mask` (target wedge AND rotated source wedge AND low-pass, DC removed),
evaluated for every integer shift ``t`` of the source in one inverse FFT::

    cc(t) = sum_k M Re(S_t conj T) / sqrt(sum_k M |S|^2 * sum_k M |T|^2),   S_t = F(source(x - t))

Spectra here are ``rfftn`` half spectra (``(..., d, h, w // 2 + 1)``, not shifted); masks enter as the usual
``fftshift``-ed ``(..., d, h, w)`` masks and are converted by :func:`mask_to_rfft`, which symmetrises them
(``(M(k) + M(-k)) / 2``) so that the half-spectrum sums equal the full-spectrum sums of ``constrained_ccc``
exactly (``Re(S conj T)`` and ``|S|^2`` are even in ``k`` for real volumes).
"""

from __future__ import annotations

import torch

_DIMS = (-3, -2, -1)


def mask_to_rfft(masks: torch.Tensor) -> torch.Tensor:
    """``fftshift``-ed masks ``(..., d, h, w)`` -> symmetrised, unshifted half masks ``(..., d, h, w // 2 + 1)``
    with the DC term zeroed (zero-mean correlation, as in ``constrained_ccc``)."""
    if masks.ndim < 3:
        raise ValueError(f"masks need at least 3 dims (d, h, w), got shape {tuple(masks.shape)}")
    w = masks.shape[-1]
    m = torch.fft.ifftshift(masks, dim=_DIMS)
    mirrored = torch.roll(torch.flip(m, dims=_DIMS), shifts=(1, 1, 1), dims=_DIMS)  # M(-k), k mod N
    half = (0.5 * (m + mirrored))[..., : w // 2 + 1].clone()
    half[..., 0, 0, 0] = 0.0
    return half


def hermitian_weights(w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Weights ``(w // 2 + 1,)`` turning a sum over an ``rfftn`` half spectrum into the full-spectrum sum
    (1 for the ``x = 0`` column and, for even ``w``, the Nyquist column; 2 elsewhere)."""
    weights = torch.full((w // 2 + 1,), 2.0, device=device, dtype=dtype)
    weights[0] = 1.0
    if w % 2 == 0:
        weights[-1] = 1.0
    return weights


def constrained_xcorr_all_shifts(
    target_ft: torch.Tensor,
    source_ft: torch.Tensor,
    mask_rfft: torch.Tensor,
    shape: tuple[int, int, int],
    eps: float = 1e-8,
) -> torch.Tensor:
    """Normalised constrained correlation maps ``(..., d, h, w)``: entry ``[z, y, x]`` is the score of the
    source moved by the cyclic shift ``t = (x, y, z)`` (indices modulo the box) against the target.

    ``target_ft``, ``source_ft``: ``torch.fft.rfftn(volumes, dim=(-3, -2, -1))``; ``mask_rfft`` from
    :func:`mask_to_rfft`; all broadcast together over the leading dims. ``shape``: the real box ``(d, h, w)``.
    """
    if target_ft.shape[-3:] != source_ft.shape[-3:] or mask_rfft.shape[-3:] != target_ft.shape[-3:]:
        raise ValueError(
            "target_ft, source_ft and mask_rfft must share their last three (half-spectrum) dims, got "
            f"{tuple(target_ft.shape)}, {tuple(source_ft.shape)}, {tuple(mask_rfft.shape)}"
        )
    d, h, w = shape
    weights = hermitian_weights(w, device=mask_rfft.device, dtype=mask_rfft.dtype)
    wm = mask_rfft * weights
    t_power = (wm * target_ft.abs().square()).sum(dim=_DIMS)
    s_power = (wm * source_ft.abs().square()).sum(dim=_DIMS)
    cross = torch.fft.irfftn(mask_rfft * target_ft * source_ft.conj(), s=(d, h, w), dim=_DIMS) * (d * h * w)
    return cross / torch.sqrt(t_power * s_power + eps)[..., None, None, None]


def signed_shift_grid(shape: tuple[int, int, int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Shift ``(x, y, z)`` in voxels that each index of a correlation map stands for, ``(d, h, w, 3)``
    (index ``i`` on an axis of size ``N`` means ``((i + N // 2) mod N) - N // 2``)."""
    axes = []
    for n in shape:
        i = torch.arange(n, device=device)
        axes.append((((i + n // 2) % n) - n // 2).to(dtype))
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([xx, yy, zz], dim=-1)


def peak_shifts(
    cc_maps: torch.Tensor, max_shift_voxels: float | None = None, subvoxel: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best shift of each correlation map ``(..., d, h, w)`` -> ``(scores (...), shifts (..., 3))``.

    Shifts are ``(x, y, z)`` voxels, restricted to ``||t|| <= max_shift_voxels`` (``None``: any). With
    ``subvoxel`` each axis is refined by a parabola through the peak and its two (cyclic) neighbours
    (offset clamped to +-0.5 voxel) and the score becomes the integer-peak value plus the rise of each
    parabola's vertex (a smoother score across rotations, which helps the local rotation refinement).
    """
    shape = tuple(cc_maps.shape[-3:])
    lead = cc_maps.shape[:-3]
    grid = signed_shift_grid(shape, device=cc_maps.device, dtype=cc_maps.dtype)
    flat = cc_maps.reshape(*lead, -1)
    if max_shift_voxels is not None:
        if max_shift_voxels < 0:
            raise ValueError(f"max_shift_voxels must be >= 0, got {max_shift_voxels}")
        allowed = grid.norm(dim=-1).reshape(-1) <= max_shift_voxels + 1e-6
        flat = flat.masked_fill(~allowed, float("-inf"))
    scores, index = flat.max(dim=-1)
    shifts = grid.reshape(-1, 3)[index]
    if subvoxel:
        offsets, gains = _parabolic_peak(cc_maps, index, shape)
        shifts, scores = shifts + offsets, scores + gains
    return scores, shifts


def _parabolic_peak(
    cc_maps: torch.Tensor, index: torch.Tensor, shape: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-axis parabola vertex offsets ``(..., 3)`` (x y z) and the summed rise of the vertices above the
    integer peak ``(...)``."""
    d, h, w = shape
    lead = cc_maps.shape[:-3]
    flat = cc_maps.reshape(*lead, -1)
    z, y, x = index // (h * w), (index // w) % h, index % w
    centre = flat.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    offsets, gain = [], torch.zeros_like(centre)
    for axis, (coord, n) in enumerate(((x, w), (y, h), (z, d))):
        vals = []
        for step in (-1, 1):
            c = [z, y, x]
            c[2 - axis] = (coord + step) % n
            vals.append(flat.gather(-1, (c[0] * h * w + c[1] * w + c[2]).unsqueeze(-1)).squeeze(-1))
        minus, plus = vals
        denom = minus - 2.0 * centre + plus
        safe = torch.where(denom < 0, denom, torch.full_like(denom, -1.0))
        off = torch.where(denom < 0, 0.5 * (minus - plus) / safe, torch.zeros_like(denom)).clamp(-0.5, 0.5)
        offsets.append(off)
        gain = gain + (0.5 * (plus - minus) * off + 0.5 * denom * off.square()).clamp_min(0.0)
    return torch.stack(offsets, dim=-1), gain
