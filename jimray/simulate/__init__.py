"""Simulation kernels: atomic models -> density maps (:mod:`.density`), the embedded maps (:mod:`.embedded`),
and subtomograms with known classes and poses (:mod:`.subtomogram`). No file I/O here except reading the
package's own embedded data file; writing data sets is :mod:`jimray.io.simulated`."""

from jimray.simulate.density import atoms_to_density, gaussian_lowpass, resample_map
from jimray.simulate.embedded import embedded_maps, embedded_structure_names
from jimray.simulate.subtomogram import CTFParams, SimulatedSet, simulate_subtomograms

__all__ = [
    "CTFParams",
    "SimulatedSet",
    "atoms_to_density",
    "embedded_maps",
    "embedded_structure_names",
    "gaussian_lowpass",
    "resample_map",
    "simulate_subtomograms",
]
