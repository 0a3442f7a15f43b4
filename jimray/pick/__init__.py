"""Particle picking in tomograms: difference-of-Gaussian filtering, peak finding, scoring against the truth."""

from jimray.pick.dog import (
    DEFAULT_SIGMA_FACTOR,
    DEFAULT_SIGMA_RATIO,
    PickResult,
    dog_filter,
    dog_sigmas,
    find_peaks,
    halo_voxels,
    normalise_scores,
    pick_particles,
    pick_slab,
    slab_bounds,
    suppress_close,
)
from jimray.pick.metrics import PickScore, match_picks

__all__ = [
    "DEFAULT_SIGMA_FACTOR",
    "DEFAULT_SIGMA_RATIO",
    "PickResult",
    "PickScore",
    "dog_filter",
    "dog_sigmas",
    "find_peaks",
    "halo_voxels",
    "match_picks",
    "normalise_scores",
    "pick_particles",
    "pick_slab",
    "slab_bounds",
    "suppress_close",
]
