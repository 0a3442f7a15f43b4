"""Fourier-space pieces (pure torch): frequency grids, missing-wedge and low-pass masks."""

from jimray.fourier.masks import frequency_grid, lowpass_mask, wedge_masks

__all__ = ["frequency_grid", "lowpass_mask", "wedge_masks"]
