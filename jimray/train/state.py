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

from jimray.run_files import CHECKPOINT_CONFIG, LABELS_FILE, PRETRAINED_FILE, STATE_FILE


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
    frame_state: dict | None = None  # jimray.train.frame_step.FrameRound.get_state(), common-frame runs only


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
        "frame_state": state.frame_state,
    }
    torch.save(payload, out / STATE_FILE)
    if state.ids is not None:
        np.savez_compressed(out / LABELS_FILE, ids=state.ids, labels=state.labels)
    if state.config is not None:
        (out / CHECKPOINT_CONFIG).write_text(json.dumps(state.config, indent=2))
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
    config = json.loads((path / CHECKPOINT_CONFIG).read_text()) if (path / CHECKPOINT_CONFIG).is_file() else None
    return RoundState(ids=ids, labels=labels, config=config, **payload)


@dataclass
class Pretrained:
    """A pretrained alignment branch (``jimray pretrain``): weights, the model section they fit, provenance."""

    model_state: dict
    model_config: dict
    provenance: dict


def save_pretrained(directory: str | Path, pretrained: Pretrained) -> Path:
    """Write ``directory/pretrained.pt`` (atomically: a killed run never leaves half a file); returns its path."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (PRETRAINED_FILE + ".tmp")
    torch.save({"model_state": pretrained.model_state, "model_config": pretrained.model_config,
                "provenance": pretrained.provenance}, tmp)  # fmt: skip
    tmp.replace(out / PRETRAINED_FILE)
    return out / PRETRAINED_FILE


def load_pretrained(path: str | Path) -> Pretrained:
    """Read a ``pretrained.pt`` (or the folder holding one); a clear error if it is not one."""
    p = Path(path)
    if p.is_dir():
        p = p / PRETRAINED_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist: give train.init_from a `jimray pretrain` output "
                                f"({PRETRAINED_FILE} or its folder)")  # fmt: skip
    try:
        payload = torch.load(p, map_location="cpu", weights_only=False)
        return Pretrained(payload["model_state"], payload["model_config"], payload.get("provenance", {}))
    except Exception as exc:  # a truncated or foreign file: name it and say what it should be
        raise ValueError(f"{p} is not a jimray pretrained model ({type(exc).__name__}: {exc}); rerun "
                         "`jimray pretrain` to make one") from None
