"""The six density maps that ship with jimray (``jimray/simulate/data/embedded_maps.npz``).

They were derived from public PDB models by ``scripts/build_embedded_maps.py`` (provenance in
``jimray/simulate/data/PROVENANCE.md``) at 6 Angstrom voxels and 12 Angstrom resolution, and are
resampled here to any voxel size and box. The default simulation geometry is a 32-voxel box at 10
Angstrom (:data:`DEFAULT_VOXEL_SIZE_ANGSTROM`): the largest structure, the ~300 Angstrom ribosome, then
just fits; the small complexes are only a few voxels across, as they would be in a real tomogram.
"""

from __future__ import annotations

import io
from functools import lru_cache
from importlib import resources

import numpy as np
import torch

from jimray.simulate.density import gaussian_lowpass, resample_map

DEFAULT_BOX_SIZE = 32
# Point group of each embedded structure, for scoring poses fairly (a symmetric particle has as many right poses
# as its group has elements). TRiC/CCT is two rings of eight different subunits: pseudo-D8, which at the 20 A
# of the simulated maps cannot be told from D8. The others are asymmetric (PDB entries, README of the data).
POINT_GROUPS = {"6zu5_ribosome": "C1", "4v8r_tric": "D8", "7cth_dengue_patch": "C1", "6msm_cftr": "C1",
                "3pwp_tcr_pmhc": "C1", "7ddo_ace2_rbd": "C1"}
DEFAULT_VOXEL_SIZE_ANGSTROM = 10.0
_DATA_FILE = "embedded_maps.npz"
_META_KEYS = ("voxel_size_angstrom", "resolution_angstrom")


@lru_cache(maxsize=1)
def _load() -> dict[str, np.ndarray]:
    """Read the package's own data file once (package data, not a user path)."""
    blob = resources.files("jimray.simulate").joinpath("data", _DATA_FILE).read_bytes()
    with np.load(io.BytesIO(blob)) as npz:
        return {key: npz[key] for key in npz.files}


def embedded_structure_names() -> list[str]:
    """Names of the embedded structures, in a fixed order (largest first), e.g. ``'6zu5_ribosome'``."""
    return [key for key in _load() if key not in _META_KEYS]


def embedded_source_geometry() -> tuple[float, float]:
    """``(voxel_size_angstrom, resolution_angstrom)`` of the stored maps."""
    data = _load()
    return float(data["voxel_size_angstrom"]), float(data["resolution_angstrom"])


def embedded_maps(
    voxel_size_angstrom: float = DEFAULT_VOXEL_SIZE_ANGSTROM,
    box_size: int = DEFAULT_BOX_SIZE,
    resolution_angstrom: float | None = None,
    names: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Embedded maps resampled to ``(box_size,) * 3`` float32 at ``voxel_size_angstrom``.

    ``resolution_angstrom`` (default ``max(2 * voxel size, stored resolution)``) blurs further with the
    Gaussian of :mod:`jimray.simulate.density`; it cannot be finer than the stored 12 Angstrom.
    ``names`` picks a subset (default all, in :func:`embedded_structure_names` order).
    """
    stored_voxel, stored_resolution = embedded_source_geometry()
    if resolution_angstrom is None:
        resolution_angstrom = max(2.0 * voxel_size_angstrom, stored_resolution)
    if resolution_angstrom < stored_resolution - 1e-9:
        raise ValueError(
            f"the embedded maps are at {stored_resolution:g} A resolution; ask for {stored_resolution:g} A or "
            "coarser, or simulate from atomic models (--structure FILE) for finer detail"
        )
    available = embedded_structure_names()
    chosen = available if names is None else list(names)
    unknown = [n for n in chosen if n not in available]
    if unknown:
        raise ValueError(f"unknown embedded structure(s) {unknown}; choose from {available}")
    data = _load()
    out = {}
    for name in chosen:
        volume = torch.from_numpy(data[name].astype(np.float32))
        volume = gaussian_lowpass(volume, stored_voxel, resolution_angstrom, stored_resolution)
        out[name] = resample_map(volume, stored_voxel, voxel_size_angstrom, box_size)
    return out
