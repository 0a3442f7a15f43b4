"""Turning user mistakes into one clear message (exit code 2) instead of a traceback."""

from __future__ import annotations

import sys

import typer

from jimray.errors import JimrayError

__all__ = ["JimrayError", "UserError", "run_app"]


class UserError(JimrayError):
    """A mistake the user can fix: the message names the file or option and the fix."""


def run_app(app: typer.Typer) -> None:
    """Run the typer app: a :class:`JimrayError` (ConfigError, StarError, MRCError, ... included) is one red line
    and exit code 2; any other exception is a bug and shows its traceback."""
    try:
        app(standalone_mode=False)
    except JimrayError as exc:
        typer.secho(f"error: {exc}", err=True, fg="red")
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True, fg="yellow")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise
