"""What a round checkpoint holds, and how it is written and read (a directory of plain files).

A checkpoint directory has ``state.pt`` (model, optimiser, GMM, PCA, round index, K, history) and
``labels.npz`` (``ids``, ``labels``: the assignment of every subtomogram after that round). It is what
``ray.train.report`` persists each round and what ``jimray predict`` loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

MODEL_DIR = "model"  # run_dir/model: the last round's checkpoint, which `jimray predict` loads
STATE_FILE = "state.pt"
LABELS_FILE = "labels.npz"
CONFIG_FILE = "config.json"


@dataclass
class RoundState:
    """Everything needed to resume after a finished round (``round_index`` rounds are done)."""

    round_index: int
    n_clusters: int
    model_state: dict
    optimizer_state: dict | None
    gmm_state: dict | None
    pca_state: dict | None
    history: list[dict] = field(default_factory=list)
    ids: np.ndarray | None = None
    labels: np.ndarray | None = None
    config: dict | None = None


def save_round_state(directory: str | Path, state: RoundState) -> Path:
    """Write ``state`` into ``directory`` (created)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "round_index": state.round_index,
        "n_clusters": state.n_clusters,
        "model_state": state.model_state,
        "optimizer_state": state.optimizer_state,
        "gmm_state": state.gmm_state,
        "pca_state": state.pca_state,
        "history": state.history,
    }
    torch.save(payload, out / STATE_FILE)
    if state.ids is not None:
        np.savez_compressed(out / LABELS_FILE, ids=state.ids, labels=state.labels)
    if state.config is not None:
        (out / CONFIG_FILE).write_text(json.dumps(state.config, indent=2))
    return out


def load_round_state(directory: str | Path) -> RoundState:
    """Read a checkpoint directory written by :func:`save_round_state`."""
    path = Path(directory)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} holds no {STATE_FILE}: not a jimray round checkpoint")
    payload = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    ids = labels = None
    if (path / LABELS_FILE).is_file():
        with np.load(path / LABELS_FILE) as data:
            ids, labels = data["ids"], data["labels"]
    config = json.loads((path / CONFIG_FILE).read_text()) if (path / CONFIG_FILE).is_file() else None
    return RoundState(ids=ids, labels=labels, config=config, **payload)
