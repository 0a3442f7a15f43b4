"""``jimray pretrain JOB.yaml --out DIR``: pretrain the alignment branch on simulated pairs (curriculum)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from jimray.config import load_job


def pretrain(
    job: Annotated[Path, typer.Argument(help="job YAML: its model, data geometry and pretrain sections")],
    out: Annotated[Path | None, typer.Option(help="output folder (pretrained.pt, pretrain.json, pretrain_curve.png); "
                                                  "default: the job's output.dir")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a field: pretrain.snr=0.05")] = None,
) -> None:
    """Pretrain Jim-Net's alignment branch by the unsupervised alignment loss on simulated pairs of the embedded
    structures, small rotations first; use the result with `--set train.init_from=DIR/pretrained.pt`."""
    from rich.progress import Progress

    from jimray.train.pretrain_job import finished_record, plan_from_job, run_pretraining

    config = load_job(job, list(set_ or []))
    out = Path(config.output.dir) if out is None else out
    done = finished_record(out)
    if done is not None:
        typer.echo(f"{out} already holds a finished pretraining ({out / 'pretrained.pt'}); use another --out")
        return
    with Progress() as bar:
        task = bar.add_task("pretraining", total=plan_from_job(config).total_steps)
        record = run_pretraining(config, out, ["jimray", *sys.argv[1:]], lambda i: bar.update(task, completed=i),
                                 lambda row: bar.console.print(_summary(row)))  # fmt: skip
    last = record["curve"][-1]
    typer.echo(f"pretrained model: {out.resolve() / 'pretrained.pt'}  (held-out uniform-SO(3) rotation error "
               f"{record['curve'][0]['rotation_error']:.3f} -> {last['rotation_error']:.3f})")  # fmt: skip


def _summary(row: dict) -> str:
    at = ""
    if "rotation_error_at_angle" in row:
        at = f", at {row['max_relative_angle']:g} deg {row['rotation_error_at_angle']:.3f}"
    return (f"step {row['step']}: loss {row['loss']:.4f}, rotation error (uniform SO(3)) {row['rotation_error']:.3f}"
            f"{at}, translation {row['translation_error_voxels']:.2f} voxels")  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain)
