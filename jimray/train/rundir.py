"""Keeping a run directory whole: a rerun of ``jimray train`` into an existing run resumes it only when the job
and the data are the run's own (no Ray, files only).

A run records its resolved job (``config.yaml``) and its data (``data.json``: path, number of volumes and a
fingerprint of the image names, file sizes and skipped volumes). :func:`check_rerun` compares a new job and data
with them before anything is written; a difference raises :class:`~jimray.errors.RunDirError` naming each
differing field and how to start a new run (``--out NEW_DIR``, or ``--force`` for a fresh sibling folder).
Fields that do not change what a run computes may differ: :data:`RESUMABLE`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from jimray.config import ConfigError, JobConfig, load_job
from jimray.errors import RunDirError
from jimray.run_files import RUN_CONFIG, RUN_DATA

__all__ = ["RESUMABLE", "check_rerun", "config_differences", "data_record",
           "fresh_run_dir", "write_data_record"]

RESUMABLE = ("name", "train.rounds", "scaling.", "output.", "pipeline", "pretrain.")


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def _same_path(old, new) -> bool:
    if old is None or new is None:
        return old == new
    return Path(old).expanduser().resolve() == Path(new).expanduser().resolve()


def config_differences(old: JobConfig, new: JobConfig) -> list[str]:
    """``"key: old -> new"`` for each field that differs and changes what a run computes (not :data:`RESUMABLE`)."""
    a, b = _flatten(old.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    out = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(RESUMABLE) or key in RESUMABLE:
            continue
        if key == "data.path" and _same_path(a.get(key), b.get(key)):
            continue
        if a.get(key) != b.get(key):
            out.append(f"{key}: {json.dumps(a.get(key))} -> {json.dumps(b.get(key))}")
    return out


def data_record(path: Path | None, specs: list[str] | None = None, names: list[str] | None = None,
                skipped: set[str] | None = None) -> dict | None:
    """What :data:`RUN_DATA` stores for ``path``: STAR / MRC input (``specs``, ``names``) or Parquet shards."""
    if path is None:
        return None
    digest = hashlib.sha1()
    if specs is not None:
        from jimray.io.mrc import parse_spec

        sizes: dict[str, int] = {}
        for spec, name in zip(specs, names or specs, strict=True):
            file = parse_spec(spec)[0]
            if str(file) not in sizes:
                sizes[str(file)] = file.stat().st_size if file.is_file() else -1
            digest.update(f"{name}\t{sizes[str(file)]}\t{spec in (skipped or ())}\n".encode())
        count = len(specs) - len(skipped or ())
    else:
        files = [path] if path.is_file() else sorted(path.glob("*.parquet"))
        for f in files:
            digest.update(f"{f.name}\t{f.stat().st_size}\n".encode())
        count = None
    return {"path": str(path.resolve()), "n_volumes": count, "fingerprint": digest.hexdigest()}


def fresh_run_dir(run_dir: Path) -> Path:
    """The first of ``run_dir-2``, ``run_dir-3``, ... that does not exist (``--force``)."""
    k = 2
    while (candidate := run_dir.with_name(f"{run_dir.name}-{k}")).exists():
        k += 1
    return candidate


def _how_to(run_dir: Path) -> str:
    return (f"start a new run with --out NEW_DIR (or --force: a new run in {fresh_run_dir(run_dir)}), or resume this "
            f"one with its own job: `jimray train {run_dir / RUN_CONFIG}`")


def check_rerun(run_dir: Path, config: JobConfig, data: dict | None) -> None:
    """Refuse (``RunDirError``) when ``run_dir`` holds a run whose job or data differ from ``config`` / ``data``."""
    old_config = run_dir / RUN_CONFIG
    if not old_config.is_file():
        if run_dir.is_dir() and any(run_dir.iterdir()):
            raise RunDirError(f"{run_dir}: a non-empty folder that is not a jimray run (no {RUN_CONFIG}); pass "
                              "--out NEW_DIR (a new or empty folder)")
        return
    try:
        old = load_job(old_config)
    except ConfigError as exc:
        raise RunDirError(f"{old_config}: the run's job cannot be read ({exc}); {_how_to(run_dir)}") from None
    changed = config_differences(old, config)
    if changed:
        shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise RunDirError(f"{run_dir} holds a run with another job ({shown}): rerunning would damage it; "
                          f"{_how_to(run_dir)}")
    record = run_dir / RUN_DATA
    if data is not None and record.is_file():
        before = json.loads(record.read_text())
        if before.get("fingerprint") != data["fingerprint"]:
            raise RunDirError(f"{run_dir} was trained on other data ({before.get('path')}, {before.get('n_volumes')} "
                              f"volumes) than {data['path']} ({data['n_volumes']} volumes): rerunning would mix two "
                              f"data sets; {_how_to(run_dir)}")


def write_data_record(run_dir: Path, data: dict | None) -> None:
    if data is not None:
        (run_dir / RUN_DATA).write_text(json.dumps(data, indent=2) + "\n")


def check_training_data(config: JobConfig, skip_bad: bool = False, warn=None) -> tuple[set[str], dict | None]:
    """The validation pass over the job's data (:mod:`jimray.io.validate`), before any Ray work: returns the
    specs to skip (``--skip-bad``) and the data record. Parquet shards (checked by ``jimray ingest``) get the
    schema check; no path (the embedded demo) nothing."""
    if config.data.path is None:
        return set(), None
    from jimray.data.reader import _check_parquet_schema, _parquet_files, is_parquet_input
    from jimray.io.validate import TRAIN_HINTS, check_volume_set

    path = Path(config.data.path)
    if path.exists() and is_parquet_input(path):
        _check_parquet_schema(_parquet_files(path), config.data.box_size)
        return set(), data_record(path)
    found = check_volume_set(path, box_size=config.data.box_size, voxel_size_angstrom=config.data.voxel_size_angstrom,
                             hints=TRAIN_HINTS)
    skip = found.enforce(skip_bad, warn)
    return skip, data_record(path, found.specs, found.names, skip)


def prepare_run(config: JobConfig, *, skip_bad: bool = False, force: bool = False, notice=None):
    """Every check of ``jimray train`` that needs no Ray, before anything is written: the data (validation pass)
    and the run directory (a rerun must be the same job on the same data). With ``force`` a run that differs goes
    to a fresh sibling folder (:func:`fresh_run_dir`) instead of refusing. Returns ``(config, skip, data record)``
    (``config.output.dir`` changed by ``force``)."""
    say = notice or (lambda _message: None)
    skip, data = check_training_data(config, skip_bad, say)
    run_dir = Path(config.output.dir).resolve()
    try:
        check_rerun(run_dir, config, data)
    except RunDirError:
        if not force:
            raise
        new = fresh_run_dir(run_dir)
        config = config.model_copy(deep=True)
        config.output.dir = str(new)
        say(f"--force: {run_dir} holds another run; starting a new run in {new}")
    return config, skip, data
