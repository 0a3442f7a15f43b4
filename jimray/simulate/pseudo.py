"""Random pseudo-molecules: unlimited structures the method was never tuned on (for generalisation checks).

A pseudo-molecule is a chain of globular domains: ``3..8`` spheres of random radius whose centres follow a
random walk (each touching the last), filled with carbon atoms at protein-like density, scaled so the whole
spans a random diameter between ``min_diameter_angstrom`` and ``max_fraction`` of the box; the atoms become a
density map with :func:`jimray.simulate.density.atoms_to_density`. Deterministic for ``seed``.
"""

from __future__ import annotations

import numpy as np
import torch

from jimray.simulate.density import atoms_to_density

__all__ = ["pseudo_molecule_atoms", "pseudo_molecules"]

_ATOMS_PER_CUBIC_ANGSTROM = 1.0 / 80.0  # a sparse protein-like fill (about one carbon per 80 A^3)


def pseudo_molecule_atoms(diameter_angstrom: float, rng: np.random.Generator) -> np.ndarray:
    """Atom coordinates ``(n, 3)`` (Angstrom, centred) of one random chain of domains spanning about
    ``diameter_angstrom``."""
    if diameter_angstrom <= 0:
        raise ValueError(f"diameter_angstrom must be > 0, got {diameter_angstrom}")
    n_domains = int(rng.integers(3, 9))
    radii = rng.uniform(0.5, 1.0, size=n_domains)
    centres = [np.zeros(3)]
    for i in range(1, n_domains):
        direction = rng.normal(size=3)
        centres.append(centres[-1] + direction / np.linalg.norm(direction) * (radii[i - 1] + radii[i]) * 0.8)
    centres = np.array(centres) - np.mean(centres, axis=0)
    extent = np.max(np.linalg.norm(centres, axis=1) + radii)
    scale = diameter_angstrom / 2.0 / extent
    atoms = []
    for centre, radius in zip(centres * scale, radii * scale, strict=True):
        count = max(8, int(_ATOMS_PER_CUBIC_ANGSTROM * 4.0 / 3.0 * np.pi * radius**3))
        points = rng.normal(size=(count, 3))
        points *= (rng.uniform(size=(count, 1)) ** (1.0 / 3.0)) / np.linalg.norm(points, axis=1, keepdims=True)
        atoms.append(centre + points * radius)
    return np.concatenate(atoms)


def pseudo_molecules(n: int, voxel_size_angstrom: float = 10.0, box_size: int = 32, seed: int = 0,
                     min_diameter_angstrom: float = 80.0, max_fraction: float = 0.8,
                     resolution_angstrom: float | None = None) -> dict[str, torch.Tensor]:
    """``n`` random pseudo-molecule maps ``(box_size,) * 3`` float32, named ``pseudo_SEED_I``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    largest = max_fraction * box_size * voxel_size_angstrom
    if largest <= min_diameter_angstrom:
        raise ValueError(f"a {box_size}-voxel box at {voxel_size_angstrom} A holds no pseudo-molecule of "
                         f"{min_diameter_angstrom} A or more; enlarge the box or the voxel size")
    rng = np.random.default_rng(seed)
    maps = {}
    for i in range(n):
        coords = pseudo_molecule_atoms(float(rng.uniform(min_diameter_angstrom, largest)), rng)
        maps[f"pseudo_{seed}_{i}"] = atoms_to_density(coords, np.full(len(coords), 6), voxel_size_angstrom,
                                                      resolution_angstrom or max(2 * voxel_size_angstrom, 12.0),
                                                      box_size=box_size)
    return maps
