"""Simulated subtomograms of known structures with known classes and poses.

Per subtomogram, in this order:

1. a class (each map ``per_class`` times, in a seeded random order);
2. a uniform random rotation ``R`` (:func:`jimray.conventions.random_rotations`) and a shift ``t`` drawn
   uniformly per axis in ``[-max_shift_voxels, max_shift_voxels]`` (default 2 voxels: small against a 32
   box, as in the paper's simulations); the particle is ``transform_volumes(map, R, t)``, i.e. the
   reference rotated by ``R`` about the box centre and then moved by ``t`` (:mod:`jimray.conventions`);
3. the single-axis-tilt missing wedge of :func:`jimray.fourier.wedge_masks` (``tilt_range_degrees = 90``:
   no wedge), fixed in the tomogram frame, so it does not turn with the particle;
4. optionally a CTF (:func:`ctf_volume`);
5. additive white Gaussian noise at the requested SNR, defined as in the paper as
   ``SNR = var(signal) / var(noise)``, the signal being this particle after steps 2-4 (variance over its
   whole box); ``snr = inf`` adds no noise.

Everything random comes from ``numpy.random.default_rng(seed)`` streams, so a seed gives the same set
on CPU and GPU and for any ``batch_size``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from jimray.conventions import matrix_to_euler, random_rotations
from jimray.fourier.masks import frequency_grid, wedge_masks
from jimray.geometry.rigid import transform_volumes

DEFAULT_MAX_SHIFT_VOXELS = 2.0


@dataclass(frozen=True)
class CTFParams:
    """Contrast transfer function parameters (defocus positive = underfocus)."""

    defocus_um: float = 3.0
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.07

    def __post_init__(self) -> None:
        if not self.defocus_um > 0:
            raise ValueError(f"defocus must be a positive number of micrometres (underfocus), got {self.defocus_um}")
        if not self.voltage_kv > 0:
            raise ValueError(f"voltage must be positive (kV, e.g. 300), got {self.voltage_kv}")
        if self.cs_mm < 0:
            raise ValueError(f"spherical aberration Cs must be >= 0 mm (e.g. 2.7), got {self.cs_mm}")
        if not 0 <= self.amplitude_contrast < 1:
            raise ValueError(f"amplitude contrast must lie in [0, 1) (e.g. 0.07), got {self.amplitude_contrast}")


def electron_wavelength_angstrom(voltage_kv: float) -> float:
    """Relativistic electron wavelength (Angstrom) at an accelerating voltage in kV."""
    volts = float(voltage_kv) * 1e3
    return 12.2643 / math.sqrt(volts * (1.0 + 0.978466e-6 * volts))


def ctf_volume(
    shape: tuple[int, int, int], params: CTFParams, voxel_size_angstrom: float, device=None, dtype=torch.float32
) -> torch.Tensor:
    """``fftshift``-ed 3D CTF ``(d, h, w)``.

    Approximation (as in common subtomogram simulators): the 2D CTF of the zero-tilt image is applied
    isotropically in 3D, with the 3D spatial frequency ``|k|`` (1/Angstrom) in place of the 2D one, i.e.
    the defocus change across the tilt series and the specimen thickness are ignored::

        chi(k) = pi * lambda * dz * k^2 - pi / 2 * Cs * lambda^3 * k^4
        CTF(k) = -(sqrt(1 - A^2) * sin(chi) + A * cos(chi))

    ``dz`` the defocus (underfocus positive), ``A`` the amplitude contrast. ``CTF(0) = -A``: the contrast
    of the density is inverted, as in real images.
    """
    if not voxel_size_angstrom > 0:
        raise ValueError(f"the CTF needs a positive voxel size in Angstrom, got {voxel_size_angstrom}")
    lam = electron_wavelength_angstrom(params.voltage_kv)
    k2 = (frequency_grid(shape, device=device, dtype=torch.float64) / voxel_size_angstrom).pow(2).sum(-1)
    dz = params.defocus_um * 1e4
    cs = params.cs_mm * 1e7
    chi = math.pi * lam * dz * k2 - 0.5 * math.pi * cs * lam**3 * k2**2
    a = params.amplitude_contrast
    return (-(math.sqrt(1.0 - a * a) * torch.sin(chi) + a * torch.cos(chi))).to(dtype)


@dataclass
class SimulatedSet:
    """A simulated data set. Poses are ground truth in the convention of :mod:`jimray.conventions`."""

    volumes: torch.Tensor  # (n, d, h, w) float32
    classes: torch.Tensor  # (n,) int64, 0-based index into the list of maps
    rotations: torch.Tensor  # (n, 3, 3) float32, reference -> particle
    shifts: torch.Tensor  # (n, 3) float32, voxels, x y z
    euler_degrees: torch.Tensor  # (n, 3) float32, RELION ZYZ (rot, tilt, psi) of ``rotations``

    def __len__(self) -> int:
        return int(self.volumes.shape[0])


def _check_maps(maps: list[torch.Tensor]) -> torch.Tensor:
    if len(maps) == 0:
        raise ValueError("simulate_subtomograms needs at least one map")
    shapes = {tuple(m.shape) for m in maps}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError(f"all maps must be (d, h, w) volumes of one shape; got shapes {sorted(shapes)}")
    return torch.stack([m.to(torch.float32) for m in maps])


def check_simulation_args(per_class: int, snr: float, tilt_range_degrees: float, max_shift_voxels: float) -> None:
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    if math.isnan(snr) or snr <= 0:
        raise ValueError(f"snr must be > 0 (var(signal)/var(noise); inf for no noise), got {snr}")
    if not 0 < tilt_range_degrees <= 90:
        raise ValueError(f"tilt_range_degrees must lie in (0, 90] (90 = no wedge), got {tilt_range_degrees}")
    if not 0 <= max_shift_voxels < math.inf:
        raise ValueError(f"max_shift_voxels must be a finite number >= 0, got {max_shift_voxels}")


def apply_fourier_filter(volumes: torch.Tensor, transfer_shifted: torch.Tensor) -> torch.Tensor:
    """Multiply the spectra of ``(b, d, h, w)`` volumes by an ``fftshift``-ed filter ``(d, h, w)`` or ``(b, ...)``."""
    transfer = torch.fft.ifftshift(transfer_shifted, dim=(-3, -2, -1))
    spectrum = torch.fft.fftn(volumes, dim=(-3, -2, -1)) * transfer
    return torch.fft.ifftn(spectrum, dim=(-3, -2, -1)).real.to(volumes.dtype)


def add_noise(signal: torch.Tensor, snr: float, rng: np.random.Generator) -> torch.Tensor:
    """``signal (b, d, h, w)`` + white Gaussian noise with ``var(noise) = var(signal) / snr`` per volume."""
    if math.isinf(snr):
        return signal.clone()
    noise = torch.from_numpy(rng.standard_normal(tuple(signal.shape), dtype=np.float32)).to(signal.device)
    std = (signal.var(dim=(-3, -2, -1), unbiased=False) / snr).sqrt().view(-1, 1, 1, 1)
    return signal + noise * std


def simulate_subtomograms(
    maps: list[torch.Tensor],
    per_class: int,
    snr: float,
    tilt_range_degrees: float,
    max_shift_voxels: float = DEFAULT_MAX_SHIFT_VOXELS,
    seed: int = 0,
    ctf: CTFParams | None = None,
    *,
    voxel_size_angstrom: float | None = None,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> SimulatedSet:
    """Simulate ``per_class`` subtomograms of each map ``(d, h, w)`` (steps in the module docstring).

    ``ctf`` needs ``voxel_size_angstrom``. ``progress(k)`` is called after each batch of ``k`` volumes.
    Runs on the maps' device; the result is deterministic for ``seed``.
    """
    stack = _check_maps(maps)
    check_simulation_args(per_class, float(snr), float(tilt_range_degrees), float(max_shift_voxels))
    if ctf is not None and voxel_size_angstrom is None:
        raise ValueError("a CTF needs voxel_size_angstrom (the spatial frequencies are in 1/Angstrom)")
    rng_pose, rng_noise = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    n = per_class * len(maps)
    classes = rng_pose.permutation(np.repeat(np.arange(len(maps)), per_class))
    rotations = random_rotations(n, rng_pose)
    shifts = rng_pose.uniform(-max_shift_voxels, max_shift_voxels, size=(n, 3))
    shape = tuple(stack.shape[-3:])
    transfer = wedge_masks(shape, float(tilt_range_degrees), device=stack.device)[0]
    if ctf is not None:
        transfer = transfer * ctf_volume(shape, ctf, voxel_size_angstrom, device=stack.device)
    apply_transfer = float(tilt_range_degrees) < 90 or ctf is not None
    rot_t = torch.as_tensor(rotations, dtype=torch.float32, device=stack.device)
    shift_t = torch.as_tensor(shifts, dtype=torch.float32, device=stack.device)
    cls_t = torch.as_tensor(classes, dtype=torch.int64, device=stack.device)
    out = torch.empty((n, *shape), dtype=torch.float32, device=stack.device)
    for start in range(0, n, max(1, int(batch_size))):
        sl = slice(start, min(start + max(1, int(batch_size)), n))
        signal = transform_volumes(stack[cls_t[sl]], rot_t[sl], shift_t[sl])
        if apply_transfer:
            signal = apply_fourier_filter(signal, transfer)
        out[sl] = add_noise(signal, float(snr), rng_noise)
        if progress is not None:
            progress(sl.stop - sl.start)
    euler = torch.as_tensor(matrix_to_euler(rotations), dtype=torch.float32, device=stack.device)
    return SimulatedSet(out, cls_t, rot_t, shift_t, euler)
