"""``jimray bench ...``: the project's benchmark commands. Each lives in ``jimray.bench.<name>`` and
defines ``register(bench_app)``; results are printed and written as JSON/Markdown under ``--out``."""

from __future__ import annotations

import importlib

import typer

BENCH_MODULES = [
    "jimray.bench.io",
    "jimray.bench.model",
    "jimray.bench.gmm",
    "jimray.bench.sampler",
    "jimray.bench.train",
    "jimray.bench.average",
    "jimray.bench.predict",
    "jimray.bench.compare",
    "jimray.bench.pick",
    "jimray.bench.capacity",
    "jimray.bench.gpu",
    "jimray.bench.scaling",
]

bench_app = typer.Typer(help="Benchmarks: measured numbers for BENCHMARKS.md.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    for name in BENCH_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(bench_app)
    app.add_typer(bench_app, name="bench", help="Run a benchmark (throughput, accuracy, speed).")
