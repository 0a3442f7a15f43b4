"""One validation pass over a set of MRC volumes, run by every command before any Ray work (edge layer: files and
numpy only, no Ray).

:func:`check_volume_set` (a STAR file or a folder of MRC files) and :func:`check_volumes` (a list of specs, e.g.
tomograms) find, for every volume:

* **missing** file, **unreadable** header (not an MRC file), **truncated** file: *every* file's 1024-byte header
  is read and its size on disk compared with what the header promises (cheap: no data is read);
* **wrong box** (not the expected box, or not the set's majority box) and **wrong voxel size** (the header's
  differs from the set's: ``--voxel-size``, else the STAR optics block, else the headers' majority);
* **non-finite** values (NaN / Inf) and a **constant** volume (e.g. all zeros): the data are streamed slab by slab;
  every volume when the set holds at most ``value_bytes`` of data, else an evenly spread sample of that size
  (:attr:`VolumeSet.values_checked` says how many; the readers check the rest as they stream).

Each problem is a :class:`Problem`: one line naming the file, the reason and the fix. :meth:`VolumeSet.enforce`
turns them into a :class:`BadInputError` (exit code 2 in the CLI) or, with ``--skip-bad``, into warnings and the
set of specs to leave out. Hints name the CLI spelling of the command at hand (:class:`Hints`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jimray.errors import DataError
from jimray.io.mrc import parse_spec

__all__ = [
    "AVERAGE_HINTS",
    "TRAIN_HINTS",
    "VALUE_CHECK_BYTES",
    "BadInputError",
    "Hints",
    "Problem",
    "VolumeSet",
    "check_volume_set",
    "check_volumes",
    "header_info",
    "value_problem",
]

VALUE_CHECK_BYTES = 1 << 30  # read every volume's values when the set holds at most this much data
MAX_LISTED = 10  # problems listed in one error message
_ITEMSIZE = {0: 1, 1: 2, 2: 4, 3: 4, 4: 8, 6: 2, 12: 2}
REPLACE = "re-extract or replace it"
COMPARED_VOXEL_SOURCES = ("the STAR optics block", "the MRC headers")  # other sources override the headers


class BadInputError(DataError):
    """Bad volumes in the input; ``problems`` lists them, the message names each file and the fix."""

    def __init__(self, problems: list[Problem], n_total: int, what: str = "volumes", skip_option: str | None = None):
        self.problems = problems
        skip = f", or pass {skip_option} to leave {'it' if len(problems) == 1 else 'them'} out" if skip_option else ""
        if len(problems) == 1:
            message = f"{problems[0].line()}{skip}"
        else:
            lines = [f"  {p.line()}" for p in problems[:MAX_LISTED]]
            if len(problems) > MAX_LISTED:
                lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
            message = "\n".join([f"{len(problems)} of {n_total} {what} are bad:", *lines, f"fix them{skip}"])
        super().__init__(message)


@dataclass(frozen=True)
class Problem:
    """One bad volume: its spec (file or ``n@stack``), what is wrong and how to fix it."""

    spec: str
    reason: str
    fix: str = REPLACE

    def line(self) -> str:
        return f"{self.spec}: {self.reason}; {self.fix}"


@dataclass(frozen=True)
class Hints:
    """How the command at hand spells the fixes (``jimray train`` sets fields, the other commands have options)."""

    box: str = "re-extract the set at one box size"  # {box}: the box the data have
    voxel: str = "pass --voxel-size {voxel}"  # {voxel}: the set's voxel size
    skip: str | None = "--skip-bad"

    def box_fix(self, box: int) -> str:
        return self.box.format(box=box)

    def voxel_fix(self, voxel: float | None) -> str:
        return self.voxel.format(voxel="VOXEL" if voxel is None else f"{voxel:g}")


TRAIN_HINTS = Hints(box="pass --set data.box_size={box}", voxel="pass --set data.voxel_size_angstrom={voxel}")
AVERAGE_HINTS = Hints(voxel="correct its header")  # `jimray average` has no --voxel-size: the STAR's counts


@dataclass
class VolumeSet:
    """What :func:`check_volume_set` found: every spec (input order), image names, the set's box and voxel size."""

    source: Path
    specs: list[str]
    names: list[str]
    box_size: int | None
    voxel_size_angstrom: float | None
    voxel_source: str
    problems: list[Problem] = field(default_factory=list)
    values_checked: int = 0
    hints: Hints = field(default_factory=Hints)

    @property
    def bad_specs(self) -> set[str]:
        return {p.spec for p in self.problems}

    def enforce(self, skip_bad: bool, warn: Callable[[str], None] | None = None) -> set[str]:
        """Raise :class:`BadInputError` when a volume is bad (or, with ``skip_bad``, when every one is); with
        ``skip_bad`` warn once per bad volume and return the specs to leave out."""
        if not self.problems:
            return set()
        skip = self.hints.skip
        if not skip_bad or len(self.bad_specs) >= len(self.specs):
            if skip_bad:
                raise BadInputError(self.problems, len(self.specs), f"volumes of {self.source} (all of them)")
            raise BadInputError(self.problems, len(self.specs), f"volumes of {self.source}", skip)
        for problem in self.problems:
            (warn or (lambda _line: None))(f"skipping {problem.line()}")
        (warn or (lambda _line: None))(f"skipped {len(self.bad_specs)} of {len(self.specs)} volumes of {self.source}")
        return self.bad_specs


def _parse_header(raw: bytes) -> dict:
    if len(raw) < 1024:
        raise ValueError(f"only {len(raw)} bytes, shorter than an MRC header (1024)")
    if raw[208:212] not in (b"MAP ", b"MAP\x00"):
        raise ValueError("not an MRC file (no 'MAP' stamp at byte 208)")
    order = ">" if raw[212] == 0x11 else "<"
    words = np.frombuffer(raw[:96], dtype=f"{order}i4")
    floats = np.frombuffer(raw[:96], dtype=f"{order}f4")
    nx, ny, nz, mode = (int(x) for x in words[:4])
    mx, _, mz = (int(x) for x in words[7:10])
    if min(nx, ny, nz) < 1 or mode not in _ITEMSIZE:
        raise ValueError(f"corrupt header (size {nx} x {ny} x {nz}, data mode {mode})")
    xlen = float(floats[10])
    voxel = xlen / mx if mx > 0 and np.isfinite(xlen) and xlen > 0 else None
    return {"nx": nx, "ny": ny, "nz": nz, "mz": mz, "ispg": int(words[22]), "voxel": voxel,
            "bytes": 1024 + max(int(words[23]), 0) + nx * ny * nz * _ITEMSIZE[mode]}


def _file_header(path: Path, cache: dict | None) -> dict | str:
    """The parsed header of ``path`` or why it is unusable (missing, unreadable, truncated)."""
    key = str(path)
    if cache is not None and key in cache:
        head = cache[key]
    else:
        try:
            with open(path, "rb") as fh:
                raw = fh.read(1024)
            head = _parse_header(raw)
            size = path.stat().st_size
            if size < head["bytes"]:
                head = f"truncated: {size} bytes on disk, the header promises {head['bytes']}"
        except FileNotFoundError:
            head = "file not found"
        except IsADirectoryError:
            head = "a folder, not an MRC file"
        except (OSError, ValueError) as exc:
            head = f"unreadable MRC ({exc})"
        if cache is not None:
            cache[key] = head
    return head


def _layout(head: dict, index: int | None) -> tuple[int, tuple[int, int, int]]:
    """(number of volumes, volume shape (z, y, x)), as :func:`jimray.io.mrc.read_header` reads the file."""
    nx, ny, nz, mz = head["nx"], head["ny"], head["nz"], head["mz"]
    if head["ispg"] >= 401 and mz > 0 and nz % mz == 0 and nz // mz > 1:
        return nz // mz, (mz, ny, nx)
    if index is not None and index > 1 and nx == ny and nz % nx == 0:
        return nz // nx, (nx, ny, nx)
    return 1, (nz, ny, nx)


def stack_count(path: Path) -> int:
    """Volumes held by an MRC file (1 for a plain volume or an unreadable file; the checks report the latter)."""
    head = _file_header(path, None)
    return 1 if isinstance(head, str) else _layout(head, None)[0]


def header_info(spec: str, cache: dict | None = None) -> tuple[tuple[int, int, int] | None, float | None, str | None]:
    """``(volume shape (z, y, x), voxel size or None, problem or None)`` of one spec from its file's raw header,
    with the truncation check (file size vs header). ``cache`` (per file) avoids rereading stacks."""
    path, index = parse_spec(spec)
    head = _file_header(path, cache)
    if isinstance(head, str):
        return None, None, head
    count, shape = _layout(head, index)
    if index is None and count > 1:
        return None, None, f"holds a stack of {count} volumes; address one as 'n@{path}'"
    if index is not None and index > count:
        return None, None, f"stack index {index} out of range (the stack holds {count} volumes)"
    return shape, head["voxel"], None


def value_problem(volume: np.ndarray) -> str | None:
    """Why a volume's values are unusable (non-finite, constant), or ``None``."""
    finite = np.isfinite(volume)
    if not finite.all():
        return f"{int((~finite).sum())} non-finite values (NaN/Inf)"
    low, high = float(volume.min()), float(volume.max())
    if low == high:
        return f"constant volume (every voxel is {low:g}): no particle in it"
    return None


def _stream_value_problem(spec: str, slab_bytes: int = 64 << 20) -> str | None:
    """:func:`value_problem` of one volume read slab by slab through a memory map (tomograms stay on disk)."""
    import mrcfile

    from jimray.io.mrc import MRCError, _volume_view

    path, index = parse_spec(spec)
    try:
        with mrcfile.mmap(path, mode="r") as mrc:
            data = _volume_view(path, mrc.data, index)
            step = max(1, slab_bytes // max(1, data[0].nbytes))
            bad, low, high = 0, np.inf, -np.inf
            for z in range(0, data.shape[0], step):
                slab = np.asarray(data[z: z + step], dtype=np.float32)
                finite = np.isfinite(slab)
                bad += int((~finite).sum())
                if finite.any():
                    low, high = min(low, float(slab[finite].min())), max(high, float(slab[finite].max()))
    except MRCError as exc:
        return exc.reason
    except Exception as exc:  # mrcfile: ValueError / OSError / warnings for a corrupt file
        return f"unreadable MRC ({exc})"
    if bad:
        return f"{bad} non-finite values (NaN/Inf)"
    if low == high:
        return f"constant volume (every voxel is {low:g}): no particle in it"
    return None


def _value_sample(n: int, volume_bytes: int, value_bytes: int | None) -> list[int]:
    if value_bytes is None or n * volume_bytes <= value_bytes:
        return list(range(n))
    count = max(1, value_bytes // max(1, volume_bytes))
    return sorted(set(np.linspace(0, n - 1, count).round().astype(int).tolist()))


def check_volumes(
    specs: list[str],
    *,
    source: str | Path,
    names: list[str] | None = None,
    box_size: int | None = None,
    voxel_size_angstrom: float | None = None,
    voxel_source: str = "--voxel-size",
    cubic: bool = True,
    check_voxel: bool = True,
    value_bytes: int | None = VALUE_CHECK_BYTES,
    hints: Hints | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> VolumeSet:
    """Check ``specs`` (module docstring). ``box_size``: the expected edge (``None``: the majority box);
    ``voxel_size_angstrom``: the set's voxel size from ``voxel_source`` (``None``: the headers' majority); each
    header is compared with it when it comes from the headers or the STAR optics block (any other source, e.g.
    ``--voxel-size``, overrides the headers). ``cubic``: volumes must be cubes (subtomograms, not tomograms).
    ``progress(done, total)`` after each header."""
    hints = hints or Hints()
    cache: dict = {}
    problems: dict[int, Problem] = {}
    shapes: dict[int, tuple[tuple[int, int, int], float | None]] = {}
    for i, spec in enumerate(specs):
        shape, voxel, reason = header_info(spec, cache)
        if reason is not None:
            fix = "check the path (relative image names start at the STAR file's folder)" \
                if reason == "file not found" else REPLACE
            problems[i] = Problem(spec, reason, fix)
        elif cubic and len(set(shape)) != 1:
            problems[i] = Problem(spec, f"volume shape {shape} is not a cubic box", REPLACE)
        else:
            shapes[i] = (shape, voxel)
        if progress:
            progress(i + 1, len(specs))
    majority = Counter(shape[0] for shape, _ in shapes.values()).most_common(1)
    box = box_size if box_size is not None else (majority[0][0] if majority else None)
    if cubic and box_size is not None and majority and majority[0][0] != box_size:
        raise DataError(f"{source}: the volumes are {majority[0][0]}^3 voxels, not the expected {box_size}^3; "
                        f"{hints.box_fix(majority[0][0])}")
    voxel_set, origin = voxel_size_angstrom, voxel_source
    if voxel_set is None:
        sizes = Counter(round(v, 4) for _, v in shapes.values() if v is not None).most_common(1)
        voxel_set, origin = (sizes[0][0], "the MRC headers") if sizes else (None, "")
    for i, (shape, voxel) in shapes.items():
        if cubic and shape[0] != box:
            problems[i] = Problem(specs[i], f"box {shape[0]} differs from the set's {box}", REPLACE)
        elif (check_voxel and origin in COMPARED_VOXEL_SOURCES and voxel is not None and voxel_set is not None
              and not np.isclose(voxel, voxel_set, rtol=1e-3)):
            problems[i] = Problem(specs[i], f"voxel size {voxel:g} A in its header differs from the set's "
                                  f"{voxel_set:g} A ({origin})",
                                  f"rescale or re-extract it at {voxel_set:g} A, or {hints.voxel_fix(voxel_set)} "
                                  "if only its header is wrong")
    good = [i for i in range(len(specs)) if i not in problems]
    volume_bytes = 4 * int(np.prod(shapes[good[0]][0])) if good else 0
    sample = [good[k] for k in _value_sample(len(good), volume_bytes, value_bytes)]
    for i in sample:
        reason = _stream_value_problem(specs[i])
        if reason is not None:
            problems[i] = Problem(specs[i], reason, REPLACE)
    listed = [problems[i] for i in sorted(problems)]
    return VolumeSet(Path(source), list(specs), list(names or specs), box, voxel_set, origin, listed, len(sample),
                     hints)


def list_volume_files(path: Path) -> tuple[list[str], list[str], float | None]:
    """``(specs, image names, STAR voxel size or None)`` of a STAR file or a folder of ``.mrc`` / ``.mrcs``."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".mrc", ".mrcs") and p.is_file())
        if not files:
            raise DataError(f"{path}: holds no .parquet shards and no .mrc/.mrcs files; pass the folder `jimray "
                            "ingest` wrote, a STAR file or a folder of MRC subtomograms")
        specs: list[str] = []
        for f in files:
            count = stack_count(f)
            specs += [f"{k}@{f}" for k in range(1, count + 1)] if count > 1 else [str(f)]
        return specs, list(specs), None
    from jimray.io.star import image_specs, read_particles

    table = read_particles(path)
    specs = image_specs(table.particles, path)
    if not specs:
        raise DataError(f"{path}: the particles block is empty; nothing to read")
    return specs, [str(x) for x in table.particles["rlnImageName"]], table.voxel_size_angstrom


def check_volume_set(
    path: str | Path,
    *,
    box_size: int | None = None,
    voxel_size_angstrom: float | None = None,
    voxel_source: str = "--voxel-size",
    value_bytes: int | None = VALUE_CHECK_BYTES,
    hints: Hints | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> VolumeSet:
    """:func:`check_volumes` over a STAR file or an MRC folder. ``voxel_size_angstrom``: an explicit override
    (named by ``voxel_source``; the headers are not compared with it); else the STAR optics block's, else the
    headers' majority. Raises :class:`DataError` when
    the set has no voxel size at all or its box is not ``box_size``."""
    path = Path(path)
    hints = hints or Hints()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; pass Parquet shards, a STAR file or a folder of MRC files")
    specs, names, star_voxel = list_volume_files(path)
    voxel, origin = voxel_size_angstrom, voxel_source
    if voxel is None and star_voxel is not None:
        voxel, origin = star_voxel, "the STAR optics block"
    found = check_volumes(specs, source=path, names=names, box_size=box_size, voxel_size_angstrom=voxel,
                          voxel_source=origin, value_bytes=value_bytes, hints=hints, progress=progress)
    if found.voxel_size_angstrom is None and len(found.problems) < len(specs):
        raise DataError(f"{path}: no voxel size in the STAR file or any MRC header; {hints.voxel_fix(None)} "
                        "(Angstrom)")
    return found


def keep_mask(specs: Iterable[str], skip: set[str]) -> np.ndarray:
    """Boolean mask of the specs not in ``skip``."""
    return np.array([s not in skip for s in specs], dtype=bool)
