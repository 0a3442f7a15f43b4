"""The steps of one pair-matching round, as run inside every Ray Train worker.

(a) :func:`embed_shard`: ``F(x, x)`` for every subtomogram of this worker's shard, keyed by id, plus a
    uniform reservoir of this worker's volumes (candidate targets);
(b) :func:`cluster_embeddings`: PCA + GMM fitted on all workers' embeddings through all-reduced sufficient
    statistics (nothing gathered but a bounded seeding sample), labels matched to last round's;
(c) the sampler actor receives (id, label) for every subtomogram and per-cluster target reservoirs;
(d) :func:`train_pass`: same-cluster (source, target) batches, loss of eq. 7, DDP steps.

Everything is keyed by subtomogram id: Ray Data hands rows to workers dynamically.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

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


def global_contingency(a: np.ndarray, b: np.ndarray, size_a: int, size_b: int, reducer: Reducer) -> np.ndarray:
    """Counts ``(size_a, size_b)`` of label pairs over all workers (local bincount, then all-reduce)."""
    local = np.zeros((size_a, size_b), dtype=np.float64)
    np.add.at(local, (a, b), 1.0)
    return reducer.all_reduce_sum(torch.from_numpy(local)).numpy()


def matching_from_counts(counts: np.ndarray) -> dict[int, int]:
    """Hungarian matching of rows (new labels) to columns (old labels) maximising agreement; needs at least as
    many columns as rows, so every new label gets a partner."""
    if counts.shape[1] < counts.shape[0]:
        raise ValueError(f"need columns >= rows to match every new label, got counts of shape {counts.shape}")
    rows, cols = linear_sum_assignment(-counts)
    return {int(r): int(c) for r, c in zip(rows, cols, strict=True)}


def global_max(value: float, reducer: Reducer) -> float:
    """Maximum of a scalar over all workers (each rank fills its own slot, then a sum)."""
    slots = torch.zeros(reducer.world_size, dtype=torch.float64)
    slots[reducer.rank] = float(value)
    return float(reducer.all_reduce_sum(slots).max().item())


def relabel_to_previous(
    labels: np.ndarray, previous: np.ndarray | None, n_clusters: int, reducer: Reducer
) -> tuple[np.ndarray, float, np.ndarray]:
    """Match this round's labels to last round's (global Hungarian on all-reduced counts) so cluster ``k``
    keeps its meaning; returns new labels in ``0..K-1``, the global fraction of labels that changed, and
    the lookup table ``lut`` (new = lut[old]). ``previous``: last round's label of each local id."""
    identity = np.arange(n_clusters, dtype=np.int64)
    if previous is None:
        return labels, 1.0, identity
    size = max(n_clusters, int(global_max(previous.max(initial=-1) + 1, reducer)))
    counts = global_contingency(labels, previous, n_clusters, size, reducer)
    mapping = matching_from_counts(counts)
    targets = sorted(set(mapping.values()))
    if max(targets) >= n_clusters:  # K shrank: compact the matched labels into 0..K-1, keeping order
        rank = {t: i for i, t in enumerate(targets)}
        mapping = {k: rank[v] for k, v in mapping.items()}
    lut = np.array([mapping[k] for k in range(n_clusters)], dtype=np.int64)
    new = lut[labels]
    changed = reducer.all_reduce_sum(torch.tensor([float((new != previous).sum()), float(len(new))]))
    return new, float(changed[0] / max(changed[1], 1.0)), lut


def global_cluster_sizes(labels: np.ndarray, n_clusters: int, reducer: Reducer) -> list[int]:
    local = torch.from_numpy(np.bincount(labels, minlength=n_clusters).astype(np.float64))
    return [int(x) for x in reducer.all_reduce_sum(local).tolist()]


def global_accuracy(truth: np.ndarray, labels: np.ndarray, n_clusters: int, reducer: Reducer) -> float:
    """The paper's clustering accuracy (Hungarian), from contingency counts summed over workers."""
    n_true = int(global_max(truth.max(initial=-1) + 1, reducer))
    counts = global_contingency(labels, truth, n_clusters, max(n_true, 1), reducer)
    rows, cols = linear_sum_assignment(-counts)
    return float(counts[rows, cols].sum() / max(counts.sum(), 1.0))
