"""The steps of one pair-matching round, as run inside every Ray Train worker.

(a) :func:`embed_shard`: ``F(x, x)`` for every subtomogram of this worker's shard, keyed by id, plus a
    uniform reservoir of this worker's volumes (candidate targets);
(b) :func:`cluster_embeddings`: PCA + GMM fitted on all workers' embeddings through all-reduced sufficient
    statistics (nothing gathered but a bounded seeding sample), labels matched to last round's
    (:func:`jimray.cluster.labels.relabel_to_previous`);
(c) the sampler actor receives (id, label) for every subtomogram and per-cluster target reservoirs;
(d) :func:`train_pass`: same-cluster (source, target) batches, loss of eq. 7, DDP steps.

Everything is keyed by subtomogram id: Ray Data hands rows to workers dynamically.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from jimray.cluster.reduce import Reducer

NUMERIC_COLUMNS = ("id", "volume", "tilt_range_degrees")
TRUTH_COLUMN = "true_class"


@dataclass
class LocalEmbeddings:
    """One worker's share of a round: ids (n,), embeddings (n, f), tilts (n,), true classes (n,) or None,
    a reservoir of candidate target volumes (ids (r,), volumes (r, d, h, w), tilts (r,)) and, for the
    common-frame embedding, all of this worker's volumes (n, d, h, w) (else None)."""

    ids: np.ndarray
    embeddings: torch.Tensor
    tilts: np.ndarray
    truth: np.ndarray | None
    reservoir_ids: np.ndarray
    reservoir_volumes: np.ndarray
    reservoir_tilts: np.ndarray
    volumes: torch.Tensor | None = None


class _Reservoir:
    """Algorithm R: a uniform sample of at most ``capacity`` rows of everything offered."""

    def __init__(self, capacity: int, seed: int):
        self.capacity = capacity
        self.rng = np.random.default_rng(seed)
        self.seen = 0
        self.ids: list[int] = []
        self.volumes: list[np.ndarray] = []
        self.tilts: list[float] = []

    def offer(self, ids: np.ndarray, volumes: np.ndarray, tilts: np.ndarray) -> None:
        for i in range(len(ids)):
            self.seen += 1
            if len(self.ids) < self.capacity:
                self.ids.append(int(ids[i]))
                self.volumes.append(volumes[i].copy())
                self.tilts.append(float(tilts[i]))
                continue
            j = int(self.rng.integers(0, self.seen))
            if j < self.capacity:
                self.ids[j], self.volumes[j], self.tilts[j] = int(ids[i]), volumes[i].copy(), float(tilts[i])


def embed_shard(
    model: torch.nn.Module | None, batches, device: torch.device, reservoir_capacity: int, seed: int
) -> LocalEmbeddings:
    """(a) Embed every batch (dicts of numpy arrays with ``id``, ``volume`` (b, d, h, w), ``tilt_range_degrees``
    and optionally ``true_class``) with ``model.embed`` in eval mode; with ``model=None`` keep the volumes
    instead (the common-frame embedding, :mod:`jimray.train.frame_step`, is computed from them)."""
    if model is None:
        return _collect_shard(batches, reservoir_capacity, seed)
    ids, embs, tilts, truth = [], [], [], []
    reservoir = _Reservoir(reservoir_capacity, seed)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in batches:
            volumes = np.ascontiguousarray(batch["volume"], dtype=np.float32)
            embs.append(model.embed(torch.from_numpy(volumes).to(device)).double().cpu())
            ids.append(np.asarray(batch["id"], dtype=np.int64))
            tilts.append(np.asarray(batch["tilt_range_degrees"], dtype=np.float32))
            if TRUTH_COLUMN in batch:
                truth.append(np.asarray(batch[TRUTH_COLUMN], dtype=np.int64))
            reservoir.offer(ids[-1], volumes, tilts[-1])
    model.train(was_training)
    box = None
    if reservoir.volumes:
        box = reservoir.volumes[0].shape
    return LocalEmbeddings(
        ids=np.concatenate(ids) if ids else np.zeros(0, np.int64),
        embeddings=torch.cat(embs) if embs else torch.zeros((0, 0), dtype=torch.float64),
        tilts=np.concatenate(tilts) if tilts else np.zeros(0, np.float32),
        truth=np.concatenate(truth) if truth else None,
        reservoir_ids=np.asarray(reservoir.ids, dtype=np.int64),
        reservoir_volumes=np.stack(reservoir.volumes) if box else np.zeros((0, 1, 1, 1), np.float32),
        reservoir_tilts=np.asarray(reservoir.tilts, dtype=np.float32),
    )


def _collect_shard(batches, reservoir_capacity: int, seed: int) -> LocalEmbeddings:
    ids, volumes, tilts, truth = [], [], [], []
    reservoir = _Reservoir(reservoir_capacity, seed)
    for batch in batches:
        volumes.append(np.ascontiguousarray(batch["volume"], dtype=np.float32))
        ids.append(np.asarray(batch["id"], dtype=np.int64))
        tilts.append(np.asarray(batch["tilt_range_degrees"], dtype=np.float32))
        if TRUTH_COLUMN in batch:
            truth.append(np.asarray(batch[TRUTH_COLUMN], dtype=np.int64))
        reservoir.offer(ids[-1], volumes[-1], tilts[-1])
    stack = torch.from_numpy(np.concatenate(volumes)) if volumes else torch.zeros((0, 1, 1, 1))
    return LocalEmbeddings(
        ids=np.concatenate(ids) if ids else np.zeros(0, np.int64),
        embeddings=torch.zeros((len(stack), 0), dtype=torch.float64),
        tilts=np.concatenate(tilts) if tilts else np.zeros(0, np.float32),
        truth=np.concatenate(truth) if truth else None,
        reservoir_ids=np.asarray(reservoir.ids, dtype=np.int64),
        reservoir_volumes=np.stack(reservoir.volumes) if reservoir.volumes else np.zeros((0, 1, 1, 1), np.float32),
        reservoir_tilts=np.asarray(reservoir.tilts, dtype=np.float32),
        volumes=stack,
    )


def global_cluster_sizes(labels: np.ndarray, n_clusters: int, reducer: Reducer) -> list[int]:
    local = torch.from_numpy(np.bincount(labels, minlength=n_clusters).astype(np.float64))
    return [int(x) for x in reducer.all_reduce_sum(local).tolist()]
