"""The driver of ``jimray pretrain JOB.yaml --out DIR``: files in and out around :func:`train_on_pairs`.

``DIR`` gets ``config.yaml`` and ``run.json`` (the resolved job, version, command), ``pretrained.pt`` (weights,
the model section, provenance; what ``train.init_from`` loads), ``pretrain.json`` (the held-out curve and the
settings), ``pretrain_curve.png``, and, while it runs, ``pretrain_checkpoint.pt`` written at every evaluation:
running the same command again continues from it (the training pairs are seeded by step, so nothing changes).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from jimray import __version__
from jimray.config import ConfigError, JobConfig
from jimray.model import JimNet, parameter_count
from jimray.run_files import PRETRAIN_CHECKPOINT_FILE, PRETRAIN_JSON, PRETRAINED_FILE
from jimray.train.pretrain import PairTraining, train_on_pairs
from jimray.train.records import write_run_info
from jimray.train.state import Pretrained, save_pretrained

PRETRAIN_PNG = "pretrain_curve.png"


def plan_from_job(config: JobConfig) -> PairTraining:
    p, d = config.pretrain, config.data
    return PairTraining(snr=p.snr, tilt_range_degrees=d.tilt_range_degrees, curriculum=[tuple(s) for s in p.curriculum],
                        batch_size=p.batch_size, lr=p.lr, eval_pairs=p.eval_pairs, eval_every=p.eval_every,
                        seed=p.seed, precision=config.train.precision)  # fmt: skip


def reference_maps(config: JobConfig) -> dict[str, torch.Tensor]:
    """The embedded maps named by ``pretrain.structures`` at the data section's box and voxel size."""
    from jimray.simulate.embedded import embedded_maps, embedded_structure_names

    names = config.pretrain.structures or embedded_structure_names()
    unknown = sorted(set(names) - set(embedded_structure_names()))
    if unknown:
        raise ConfigError(f"pretrain.structures: unknown {unknown}; choose among {embedded_structure_names()}")
    return embedded_maps(config.data.voxel_size_angstrom or 10.0, config.data.box_size, names=list(names))


def _save_checkpoint(out: Path, model: JimNet, result: dict) -> None:
    tmp = out / (PRETRAIN_CHECKPOINT_FILE + ".tmp")
    torch.save({"model_state": model.state_dict(), **result}, tmp)
    tmp.replace(out / PRETRAIN_CHECKPOINT_FILE)


def _load_checkpoint(out: Path, model: JimNet) -> dict | None:
    path = out / PRETRAIN_CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(state.pop("model_state"))
    except Exception as exc:  # a checkpoint of another model or a broken file: say so, keep it for inspection
        raise ConfigError(f"{path} cannot be resumed with this job ({type(exc).__name__}); move it away to "
                          "start the pretraining again") from None  # fmt: skip
    return state


def run_pretraining(config: JobConfig, out_dir: str | Path, command: list[str] | None = None,
                    progress=None, on_eval=None) -> dict:  # fmt: skip
    """Pretrain (or continue pretraining) into ``out_dir``; returns the ``pretrain.json`` record."""
    from jimray.io.plots import plot_alignment_curve

    out = Path(out_dir).resolve()
    write_run_info(out, config, command)
    maps = reference_maps(config)
    plan = plan_from_job(config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(config.pretrain.seed)
    model = JimNet(config.model, 1)
    resume = _load_checkpoint(out, model)
    model.to(device)

    def checkpoint(result: dict) -> None:
        _save_checkpoint(out, model, result)
        if on_eval is not None:
            on_eval(result["curve"][-1])

    result = train_on_pairs(model, list(maps.values()), plan, device, progress, checkpoint, resume)
    provenance = {"jimray_version": __version__, "command": " ".join(command or []), "structures": list(maps),
                  "pretrain": config.pretrain.model_dump(mode="json"), "box_size": config.data.box_size,
                  "tilt_range_degrees": config.data.tilt_range_degrees,
                  "voxel_size_angstrom": config.data.voxel_size_angstrom or 10.0}  # fmt: skip
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_pretrained(out, Pretrained(state, config.model.model_dump(mode="json"), provenance))
    record = {"provenance": provenance, "parameters": parameter_count(model), "curve": result["curve"],
              "train_seconds": result["train_seconds"],
              "identity_rotation_error": result["identity_rotation_error"]}  # fmt: skip
    (out / PRETRAIN_JSON).write_text(json.dumps(_finite(record), indent=2, allow_nan=False))
    title = (f"jimray pretrain: {len(maps)} structures, SNR {plan.snr:g}, tilt +-{plan.tilt_range_degrees:g}, "
             f"box {config.data.box_size}")  # fmt: skip
    plot_alignment_curve(result["curve"], out / PRETRAIN_PNG, title)
    (out / PRETRAIN_CHECKPOINT_FILE).unlink(missing_ok=True)
    return record


def _finite(value):
    """JSON-safe copy: NaN and inf floats become None."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def finished_record(out_dir: str | Path) -> dict | None:
    """The ``pretrain.json`` of a finished pretraining in ``out_dir`` (None if there is none or it is unfinished)."""
    out = Path(out_dir)
    if (out / PRETRAINED_FILE).is_file() and (out / PRETRAIN_JSON).is_file() and not (
        out / PRETRAIN_CHECKPOINT_FILE
    ).is_file():
        return json.loads((out / PRETRAIN_JSON).read_text())
    return None
