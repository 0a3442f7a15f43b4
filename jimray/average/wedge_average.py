"""Missing-wedge-aware subtomogram averaging (pure torch, CPU or CUDA).

Each particle is brought into the reference frame with the inverse of its pose (``conventions.invert_pose``,
``geometry.transform_volumes``); its missing-wedge mask (``fourier.wedge_masks``, in the particle/tomogram
frame) is rotated the same way (``geometry.rotate_fourier_masks``). The average is::

    average = IFFT( sum_i F(aligned_i) * wedge_i  /  max(sum_i wedge_i, wiener_floor) )

Every Fourier voxel is divided by how many particles actually sampled it, so the average has no wedge of its
own once the particles' orientations cover the sphere. ``weight = sum_i wedge_i`` counts (fractionally, after
interpolation) the particles that sampled each voxel. The floor stops voxels seen by almost no particle from
being amplified (a Wiener-like regulariser): with the default ``1.0`` no voxel is boosted beyond what a single
particle would give. Spectra are kept in ``rfftn`` layout ``(d, h, w // 2 + 1)``; ``weight`` is returned
``fftshift``-ed ``(d, h, w)`` like every mask of :mod:`jimray.fourier.masks`.
"""

from __future__ import annotations

import torch

from jimray.conventions import invert_pose
from jimray.fourier.masks import wedge_masks
from jimray.geometry.rigid import rotate_fourier_masks, transform_volumes

__all__ = ["WedgeAccumulator", "wedge_weighted_average", "align_to_reference_frame"]

DEFAULT_CHUNK = 32


def _check_inputs(particles, rotations, shifts, tilt_range_degrees) -> torch.Tensor:
    if particles.ndim != 4:
        raise ValueError(f"particles must be (n, d, h, w), got shape {tuple(particles.shape)}")
    n = particles.shape[0]
    if rotations.shape != (n, 3, 3):
        raise ValueError(f"rotations must be (n, 3, 3) with n={n}, got {tuple(rotations.shape)}")
    if shifts.shape != (n, 3):
        raise ValueError(f"shifts must be (n, 3) with n={n} (voxels, x y z), got {tuple(shifts.shape)}")
    tilt = torch.as_tensor(tilt_range_degrees, dtype=torch.float64).reshape(-1)
    if tilt.numel() == 1:
        tilt = tilt.expand(n)
    if tilt.shape != (n,):
        raise ValueError(f"tilt_range_degrees must be a scalar or (n,) with n={n}, got {tuple(tilt.shape)}")
    return tilt


def _full_to_rfft(shifted: torch.Tensor) -> torch.Tensor:
    """``fftshift``-ed full spectra ``(..., d, h, w)`` -> unshifted ``rfftn`` layout ``(..., d, h, w // 2 + 1)``."""
    w = shifted.shape[-1]
    return torch.fft.ifftshift(shifted, dim=(-3, -2, -1))[..., : w // 2 + 1]


def align_to_reference_frame(
    particles: torch.Tensor, rotations: torch.Tensor, shifts: torch.Tensor
) -> torch.Tensor:
    """Undo each particle's pose: ``(n, d, h, w)`` particles with poses ``(R, t)`` (particle ~ reference moved
    by ``(R, t)``) -> the particles in the reference frame, ``transform_volumes(p, R^T, -R^T t)``."""
    inv_r, inv_t = invert_pose(rotations.to(particles.dtype), shifts.to(particles.dtype))
    return transform_volumes(particles, inv_r, inv_t)


class WedgeAccumulator:
    """Streaming wedge-weighted average: ``add`` batches of posed particles, then ``result()``.

    Holds the running ``sum F(aligned) * wedge`` (complex, ``rfftn`` layout) and ``sum wedge``. Two
    accumulators of one shape can be merged with ``merge`` (e.g. the two gold-standard halves).
    """

    def __init__(self, shape: tuple[int, int, int], device=None, dtype=torch.float32, chunk_size: int = DEFAULT_CHUNK):
        if len(shape) != 3 or min(shape) < 2:
            raise ValueError(f"shape must be (d, h, w) with sizes >= 2, got {shape}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.shape = tuple(int(s) for s in shape)
        self.chunk_size = int(chunk_size)
        self.dtype = dtype
        d, h, w = self.shape
        complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        self.spectrum_sum = torch.zeros(d, h, w // 2 + 1, dtype=complex_dtype, device=device)
        self.weight_sum = torch.zeros(d, h, w // 2 + 1, dtype=dtype, device=device)
        self.count = 0

    @property
    def device(self) -> torch.device:
        return self.spectrum_sum.device

    def add(
        self,
        particles: torch.Tensor,
        rotations: torch.Tensor,
        shifts: torch.Tensor,
        tilt_range_degrees: torch.Tensor | float,
    ) -> WedgeAccumulator:
        """Add ``particles (n, d, h, w)`` with poses ``rotations (n, 3, 3)``, ``shifts (n, 3)`` (voxels, x y z;
        particle ~ reference moved by ``(R, t)``) and tilt ranges ``(n,)`` or a scalar (degrees, 90 = no
        wedge). Works in chunks of ``chunk_size`` particles on the accumulator's device. Returns ``self``."""
        tilt = _check_inputs(particles, rotations, shifts, tilt_range_degrees)
        if tuple(particles.shape[1:]) != self.shape:
            raise ValueError(f"particles have box {tuple(particles.shape[1:])}, the accumulator {self.shape}")
        for start in range(0, particles.shape[0], self.chunk_size):
            stop = start + self.chunk_size
            self._add_chunk(particles[start:stop], rotations[start:stop], shifts[start:stop], tilt[start:stop])
        return self

    def _add_chunk(self, particles, rotations, shifts, tilt) -> None:
        device, dtype = self.device, self.dtype
        particles = particles.to(device=device, dtype=dtype)
        rotations = rotations.to(device=device, dtype=dtype)
        shifts = shifts.to(device=device, dtype=dtype)
        aligned = align_to_reference_frame(particles, rotations, shifts)
        masks = wedge_masks(self.shape, tilt.to(device), device=device, dtype=dtype)
        masks = rotate_fourier_masks(masks, rotations.transpose(-1, -2)).clamp(0.0, 1.0)
        masks = _full_to_rfft(masks)
        spectra = torch.fft.rfftn(aligned, dim=(-3, -2, -1))
        self.spectrum_sum += (spectra * masks).sum(dim=0)
        self.weight_sum += masks.sum(dim=0)
        self.count += particles.shape[0]

    def merge(self, other: WedgeAccumulator) -> WedgeAccumulator:
        """A new accumulator holding the particles of ``self`` and ``other``."""
        if other.shape != self.shape:
            raise ValueError(f"cannot merge accumulators of boxes {self.shape} and {other.shape}")
        out = WedgeAccumulator(self.shape, device=self.device, dtype=self.dtype, chunk_size=self.chunk_size)
        out.spectrum_sum = self.spectrum_sum + other.spectrum_sum.to(self.device)
        out.weight_sum = self.weight_sum + other.weight_sum.to(self.device)
        out.count = self.count + other.count
        return out

    def result(self, wiener_floor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(average (d, h, w), weight (d, h, w) fftshift-ed)``; see the module docstring for the floor."""
        if self.count == 0:
            raise ValueError("no particles were added to the WedgeAccumulator; add(...) some before result()")
        if not wiener_floor > 0:
            raise ValueError(f"wiener_floor must be > 0 (it divides the spectrum), got {wiener_floor}")
        spectrum = self.spectrum_sum / self.weight_sum.clamp_min(wiener_floor)
        average = torch.fft.irfftn(spectrum, s=self.shape, dim=(-3, -2, -1))
        return average.to(self.dtype), _rfft_to_full_shifted(self.weight_sum, self.shape)


def _rfft_to_full_shifted(half: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Real, Hermitian-symmetric ``rfftn``-layout values ``(d, h, w // 2 + 1)`` -> ``fftshift``-ed ``(d, h, w)``."""
    d, h, w = shape
    full = torch.zeros(d, h, w, dtype=half.dtype, device=half.device)
    full[..., : w // 2 + 1] = half
    # Negative x frequencies: value at (-kz, -ky, -kx) equals the value at (kz, ky, kx).
    iz = (-torch.arange(d, device=half.device)) % d
    iy = (-torch.arange(h, device=half.device)) % h
    ix = (-torch.arange(w // 2 + 1, w, device=half.device)) % w
    full[..., w // 2 + 1 :] = half[iz][:, iy][..., ix]
    return torch.fft.fftshift(full, dim=(-3, -2, -1))


def wedge_weighted_average(
    particles: torch.Tensor,
    rotations: torch.Tensor,
    shifts: torch.Tensor,
    tilt_range_degrees: torch.Tensor | float,
    *,
    wiener_floor: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wedge-weighted average of posed particles -> ``(average (d, h, w), weight (d, h, w))``.

    ``particles (n, d, h, w)``; ``rotations (n, 3, 3)`` and ``shifts (n, 3)`` (voxels, x y z) are each
    particle's pose, particle ~ ``transform_volumes(reference, R, t)``; ``tilt_range_degrees`` scalar or
    ``(n,)``. Runs on the particles' device in chunks of ``chunk_size``. ``weight`` is ``fftshift``-ed
    (DC at ``N // 2``) and counts the particles that sampled each Fourier voxel.
    """
    _check_inputs(particles, rotations, shifts, tilt_range_degrees)
    if particles.shape[0] == 0:
        raise ValueError("wedge_weighted_average needs at least one particle")
    dtype = particles.dtype if particles.dtype in (torch.float32, torch.float64) else torch.float32
    acc = WedgeAccumulator(tuple(particles.shape[1:]), device=particles.device, dtype=dtype, chunk_size=chunk_size)
    acc.add(particles, rotations, shifts, tilt_range_degrees)
    return acc.result(wiener_floor)
