"""Reading atomic models (PDB / mmCIF, optionally gzipped) with gemmi: the edge layer for structures.

Only what the density kernels need comes out: atom positions in Angstrom ``(n, 3)`` in ``(x, y, z)``
order and atomic numbers ``(n,)``. The first model is used; waters, hydrogens and alternative
conformations (all but the first) are dropped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

STRUCTURE_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif", ".pdb.gz", ".ent.gz", ".cif.gz", ".mmcif.gz")


def structure_name(path: str | Path) -> str:
    """A short name for a structure file: its file name without ``.gz`` and the format suffix."""
    name = Path(path).name
    for suffix in (".gz", ".cif", ".mmcif", ".pdb", ".ent"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name or Path(path).name


def parse_structure_spec(spec: str | Path) -> tuple[Path, str | None]:
    """``"file.pdb.gz:A"`` -> ``(Path("file.pdb.gz"), "A")`` (keep chains whose id starts with ``A``);
    a plain path (or one that exists as given) -> ``(path, None)``."""
    text = str(spec)
    head, sep, tail = text.rpartition(":")
    if sep and head and tail and "/" not in tail and not Path(text).exists():
        return Path(head), tail
    return Path(text), None


def read_atoms(path: str | Path, chain_prefix: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Atoms of the first model of a PDB/mmCIF file (``.gz`` allowed).

    Returns ``(coords_angstrom (n, 3) float64 in (x, y, z), atomic_numbers (n,) int64)``. With
    ``chain_prefix`` only chains whose id starts with it are kept (e.g. ``"A"`` for one complex of 4V8R).
    Raises ``FileNotFoundError`` / ``ValueError`` whose message names the file and the fix.
    """
    import gemmi

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"structure file '{p}' does not exist: pass a PDB or mmCIF file (.pdb, .cif, .gz)")
    try:
        structure = gemmi.read_structure(str(p))
    except (RuntimeError, ValueError, OSError) as exc:
        reason = " ".join(str(exc).split())
        raise ValueError(f"{p}: not a readable PDB/mmCIF file ({reason}); pass a valid .pdb/.cif") from None
    if len(structure) == 0:
        raise ValueError(f"{p}: the file holds no model; pass a PDB/mmCIF file with atom records")
    structure.remove_waters()
    structure.remove_hydrogens()
    structure.remove_alternative_conformations()
    coords: list[list[float]] = []
    numbers: list[int] = []
    chains_seen: list[str] = []
    for chain in structure[0]:
        chains_seen.append(chain.name)
        if chain_prefix is not None and not chain.name.startswith(chain_prefix):
            continue
        for residue in chain:
            for atom in residue:
                coords.append([atom.pos.x, atom.pos.y, atom.pos.z])
                numbers.append(atom.element.atomic_number)
    if not coords:
        which = ""
        if chain_prefix:
            which = f" in chains starting with '{chain_prefix}' (chains: {', '.join(chains_seen[:20])})"
        raise ValueError(f"{p}: no atoms found{which}; check the file or the chain prefix")
    z = np.asarray(numbers, dtype=np.int64)
    if np.any(z <= 0):
        bad = int(np.sum(z <= 0))
        raise ValueError(f"{p}: {bad} atoms have an unknown element; fix the element column of the file")
    return np.asarray(coords, dtype=np.float64), z
