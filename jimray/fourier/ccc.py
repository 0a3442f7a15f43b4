"""Missing-wedge-aware constrained cross-correlation (Gum-Net / Jim-Net alignment loss).

Both volumes are compared only where *both* were measured: the target's wedge, the source's wedge carried by
the predicted rotation, and a low-pass. Masks are ``fftshift``-ed (DC at ``N // 2``) ``(b, d, h, w)``; the DC
voxel is always removed, so the correlation is of zero-mean signals and ignores intensity offsets.
"""

from __future__ import annotations

import torch

from jimray.fourier.masks import lowpass_mask, wedge_masks
from jimray.geometry.rigid import rotate_fourier_masks
from jimray.precision import float32_region


def _centered_spectrum(volumes: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.fftn(volumes, dim=(-3, -2, -1)), dim=(-3, -2, -1))


def hermitian_symmetric(masks: torch.Tensor) -> torch.Tensor:
    """``M(k) AND M(-k)`` of fftshift-ed masks ``(..., d, h, w)``: the part where the spectrum of a real volume
    is kept together with its mirror, so that masking keeps volumes real (for an even box the index-0
    Nyquist plane is its own mirror)."""
    dims = (-3, -2, -1)
    mirrored = torch.flip(masks, dims=dims)
    mirrored = torch.roll(mirrored, shifts=tuple(1 - n % 2 for n in masks.shape[-3:]), dims=dims)
    return masks * mirrored


@float32_region
def constrained_ccc(
    source_transformed: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """Per-sample normalised correlation ``(b,)`` of ``s*`` and ``t*``, the volumes restricted to ``mask``.

    ``s* = F^-1(M F(s))`` and ``t* = F^-1(M F(t))`` with the DC term of ``M`` zeroed; by Parseval
    ``<s*, t*> = sum_k M Re(S conj(T))``, which is what is computed (exact for Hermitian-symmetric masks such
    as those of :func:`alignment_mask`). Inputs ``(b, d, h, w)`` real, mask
    ``(b, d, h, w)`` or ``(d, h, w)`` in [0, 1], fftshift-ed. Result in [-1, 1]; 1 for identical inputs.
    Invariant to a positive scale and an offset of either volume. Differentiable in both volumes.
    """
    if source_transformed.ndim != 4 or source_transformed.shape != target.shape:
        raise ValueError(
            f"source_transformed and target must both be (b, d, h, w) of one shape, got "
            f"{tuple(source_transformed.shape)} and {tuple(target.shape)}"
        )
    if mask.shape[-3:] != target.shape[-3:] or mask.ndim not in (3, 4):
        raise ValueError(
            f"mask must be (b, d, h, w) or (d, h, w) matching {tuple(target.shape)}, got {tuple(mask.shape)}"
        )
    d, h, w = target.shape[-3:]
    m = mask.to(target.dtype).clone()
    m[..., d // 2, h // 2, w // 2] = 0.0  # exclude DC: zero-mean over the masked region
    s = _centered_spectrum(source_transformed)
    t = _centered_spectrum(target)
    dims = (-3, -2, -1)
    cross = (m * (s * t.conj()).real).sum(dim=dims)
    s_power = (m * s.abs().square()).sum(dim=dims)
    t_power = (m * t.abs().square()).sum(dim=dims)
    return cross / torch.sqrt(s_power * t_power + eps)


@float32_region
def alignment_mask(
    target_tilt_range_degrees: torch.Tensor,
    source_tilt_range_degrees: torch.Tensor,
    rotations: torch.Tensor,
    shape: tuple[int, int, int],
    lowpass_cycles_per_voxel: float,
) -> torch.Tensor:
    """Fourier region where a transformed source and its target can be compared, ``(b, d, h, w)`` in {0, 1}.

    ``wedge(target) AND rotate(wedge(source), R) AND low-pass``: the source was rotated by ``R``
    (``rotations`` ``(b, 3, 3)``, the pose carrying source onto target) so its wedge rotated with it
    (:func:`jimray.geometry.rotate_fourier_masks`; the interpolated mask is thresholded at 0.5). Tilt
    ranges ``(b,)`` in degrees (60 = 30-degree missing wedge); low-pass in cycles/voxel. The result is made
    Hermitian-symmetric (:func:`hermitian_symmetric`), so ``s*`` and ``t*`` are real. Not differentiated.
    """
    b = rotations.shape[0]
    if rotations.shape != (b, 3, 3):
        raise ValueError(f"rotations must be (b, 3, 3), got {tuple(rotations.shape)}")
    device, dtype = rotations.device, rotations.dtype
    tilts = []
    for name, tilt in (("target", target_tilt_range_degrees), ("source", source_tilt_range_degrees)):
        tilt = torch.as_tensor(tilt, dtype=torch.float64, device=device).reshape(-1)
        if tilt.numel() == 1:
            tilt = tilt.expand(b)
        if tilt.shape != (b,):
            raise ValueError(f"{name}_tilt_range_degrees must be a scalar or (b,) with b={b}, got {tuple(tilt.shape)}")
        tilts.append(tilt)
    with torch.no_grad():
        target_wedge = wedge_masks(shape, tilts[0], device=device, dtype=dtype)
        source_wedge = wedge_masks(shape, tilts[1], device=device, dtype=dtype)
        rotated = rotate_fourier_masks(source_wedge, rotations.detach()) > 0.5
        low = lowpass_mask(shape, lowpass_cycles_per_voxel, device=device, dtype=dtype)
        mask = (target_wedge > 0.5).logical_and(rotated).logical_and(low > 0.5).to(dtype)
        return hermitian_symmetric(mask)
