"""Turning user mistakes into one clear message (exit code 2) instead of a traceback."""

from __future__ import annotations

import sys

import typer


class UserError(Exception):
    """A mistake the user can fix: the message names the file or option and the fix."""


def run_app(app: typer.Typer) -> None:
    from jimray.config import ConfigError

    try:
        app(standalone_mode=False)
    except (UserError, ConfigError) as exc:
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
