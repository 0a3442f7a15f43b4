"""The ``jimray`` command: one typer app; each command lives in its own module of this package.

A command module defines ``register(app)``; the commands are listed in ``COMMAND_MODULES``.
User mistakes raise :class:`jimray.cli.errors.UserError` (or ConfigError) and are printed as one
clear message with exit code 2, never a traceback.
"""

from __future__ import annotations

import importlib

import typer

from jimray.cli.errors import run_app

COMMAND_MODULES = [
    "jimray.cli.simulate",
    "jimray.cli.ingest",
    "jimray.cli.train",
    "jimray.cli.pretrain",
    "jimray.cli.predict",
    "jimray.cli.average",
    "jimray.cli.pick",
    "jimray.cli.extract",
    "jimray.cli.bench",
    "jimray.cli.pipeline",
]

app = typer.Typer(
    name="jimray",
    help="Joint unsupervised alignment and clustering of cryo-ET subtomograms with Jim-Net, on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Joint unsupervised alignment and clustering of cryo-ET subtomograms with Jim-Net, on Ray."""


@app.command("version")
def version() -> None:
    """Print the jimray version."""
    from jimray import __version__

    typer.echo(__version__)


def _register_all() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # command not built yet in this checkout
                continue
            raise
        module.register(app)


_register_all()


def main() -> None:
    run_app(app)
