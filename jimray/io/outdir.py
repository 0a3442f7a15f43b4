"""Output folders that are never mixed or damaged (``jimray predict`` / ``jimray average --out``).

:func:`check_out_dir` runs before any work: a non-empty ``--out`` is refused unless ``--overwrite``, and even then
a folder that holds (or is) one of the command's inputs, the working directory or the home folder is refused.
:func:`clear_out_dir` empties it right before the first output is written, so a failed run leaves the old
outputs as they were.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from jimray.errors import RunDirError

__all__ = ["check_out_dir", "clear_out_dir"]


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_out_dir(out: Path, overwrite: bool, inputs: Iterable[str | Path] = (), option: str = "--out") -> None:
    """Refuse (:class:`RunDirError`) a non-empty ``out`` without ``overwrite``, or one whose clearing would delete
    an input (``inputs``), the working directory or the home folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{option} {out}: a file, not a folder; pass a new or empty folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise RunDirError(f"{option} {out}: the folder is not empty (old outputs would be mixed with new ones); pass a "
                          "new or empty folder, or --overwrite to clear it first")
    folder = out.resolve()
    protected = [Path.cwd().resolve(), Path.home().resolve(), *(Path(p).resolve() for p in inputs)]
    for path in protected:
        if _inside(path, folder):
            raise RunDirError(f"{option} {out}: --overwrite would delete {path}, which is inside it; pass another "
                              "folder for the outputs")


def clear_out_dir(out: Path) -> None:
    """Remove everything in ``out`` (after :func:`check_out_dir` allowed it)."""
    out = Path(out)
    if not out.is_dir():
        return
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
