"""Fourier-space pieces (pure torch): frequency grids, missing-wedge and low-pass masks."""

from jimray.fourier.ccc import alignment_mask, constrained_ccc
from jimray.fourier.masks import frequency_grid, lowpass_mask, wedge_masks
from jimray.fourier.spectral import spectral_pool

__all__ = ["alignment_mask", "constrained_ccc", "frequency_grid", "lowpass_mask", "spectral_pool", "wedge_masks"]
