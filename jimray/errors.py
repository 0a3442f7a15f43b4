"""The one base class of user-facing errors.

Every mistake a user can fix (a bad file, option, job or run directory) raises a :class:`JimrayError` (or a
subclass: ``ConfigError``, ``StarError``, ``MRCError``, ``RunError``, ``AveragingError``, ``DataError``,
``BadInputError``, the CLI's ``UserError``) whose message names the file or option and the fix, spelled as on the
command line (``--set data.box_size=24``, ``--voxel-size``). The CLI (:func:`jimray.cli.errors.run_app`) prints
it as one red line with exit code 2; any other exception is a bug and shows its traceback.

``JimrayError`` is a ``ValueError`` so that library callers that catch ``ValueError`` keep working.
"""

from __future__ import annotations

__all__ = ["JimrayError", "DataError", "RunDirError"]


class JimrayError(ValueError):
    """A mistake the user can fix; ``str(err)`` names the file or option and the fix."""


class DataError(JimrayError):
    """Input data (STAR, MRC, shards) that cannot be used; the message names the file and the fix."""


class RunDirError(JimrayError):
    """An output or run directory that would be damaged by the command; the message says how to proceed."""
