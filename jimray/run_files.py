"""The file names of jimray's output folders, defined once (plain strings: importing this costs nothing).

A training run directory (``jimray train``, :mod:`jimray.train.driver`)::

    config.yaml     RUN_CONFIG        the resolved job (jimray.train.records.write_run_info)
    data.json       RUN_DATA          what the run was trained on (jimray.train.rundir)
    run.json        RUN_INFO          one entry per invocation: version, command, date
    metrics.csv     METRICS_CSV       one row per round
    metrics.png     METRICS_PNG
    summary.json    SUMMARY_JSON      the last round's summary
    model/          MODEL_DIR         the last round's checkpoint, which ``jimray predict`` loads
    checkpoints/    CHECKPOINTS_DIR   Ray Train's checkpoints, one per round

A round checkpoint (``model/`` and each of Ray's, :mod:`jimray.train.state`)::

    state.pt        STATE_FILE        model, optimiser, GMM, PCA, round index, K, history
    labels.npz      LABELS_FILE       ids and labels after that round
    config.json     CHECKPOINT_CONFIG the job as a dict (not the run's config.yaml)

A pretraining folder (``jimray pretrain``): ``pretrained.pt`` (PRETRAINED_FILE), ``pretrain.json``
(PRETRAIN_JSON), the resumable ``pretrain_checkpoint.pt`` (PRETRAIN_CHECKPOINT_FILE), plus ``config.yaml`` and
``run.json`` as above. A ``jimray predict`` output folder has ``predict.json`` (PREDICT_JSON).
"""

from __future__ import annotations

RUN_CONFIG = "config.yaml"
RUN_DATA = "data.json"
RUN_INFO = "run.json"
METRICS_CSV = "metrics.csv"
METRICS_PNG = "metrics.png"
SUMMARY_JSON = "summary.json"
MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"

STATE_FILE = "state.pt"
LABELS_FILE = "labels.npz"
CHECKPOINT_CONFIG = "config.json"

PRETRAINED_FILE = "pretrained.pt"
PRETRAIN_CHECKPOINT_FILE = "pretrain_checkpoint.pt"
PRETRAIN_JSON = "pretrain.json"

PREDICT_JSON = "predict.json"
