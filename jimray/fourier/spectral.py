"""Spectral pooling: resample feature maps to a smaller grid by cropping their centred spectrum.

Cropping the ``fftshift``-ed spectrum to the output size is an ideal low-pass followed by resampling; unlike
strided or max pooling it keeps all the low frequencies and no aliasing (Rippel et al. 2015; Gum-Net uses it
in its feature extractors). The DC term stays at index ``N // 2`` (see :mod:`jimray.conventions`).
"""

from __future__ import annotations

import torch

from jimray.precision import float32_region


def _crop_slices(size_in: int, size_out: int) -> slice:
    start = size_in // 2 - size_out // 2
    return slice(start, start + size_out)


@float32_region
def spectral_pool(features: torch.Tensor, size: tuple[int, int, int] | int) -> torch.Tensor:
    """Resample ``features`` ``(b, c, d, h, w)`` to ``(b, c, *size)`` by cropping the centred spectrum.

    Each output size must be ``<=`` the input size (this is pooling, not up-sampling). The mean of every
    channel is preserved (``norm="forward"``); real input gives real output (the imaginary part that an
    unpaired Nyquist coefficient of an even crop leaves is dropped). Differentiable.
    """
    if features.ndim != 5:
        raise ValueError(f"features must be (b, c, d, h, w), got shape {tuple(features.shape)}")
    out = (size,) * 3 if isinstance(size, int) else tuple(int(s) for s in size)
    shape_in = tuple(features.shape[-3:])
    if len(out) != 3 or any(o < 1 or o > i for o, i in zip(out, shape_in, strict=True)):
        raise ValueError(f"spectral_pool size must be 3 ints in [1, input size {shape_in}], got {out}")
    if out == shape_in:
        return features
    dims = (-3, -2, -1)
    spectrum = torch.fft.fftshift(torch.fft.fftn(features, dim=dims, norm="forward"), dim=dims)
    crop = spectrum[(..., *(_crop_slices(i, o) for i, o in zip(shape_in, out, strict=True)))]
    crop = torch.fft.ifftshift(crop, dim=dims)
    return torch.fft.ifftn(crop, dim=dims, norm="forward").real
