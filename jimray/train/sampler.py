"""Pair sampler for the pair-matching rounds: which subtomograms share a cluster, and target volumes.

Each round the embedding workers report ``(id, label)`` for every subtomogram (:meth:`PairSampler.add_labels`)
and offer some volumes with their labels (:meth:`PairSampler.offer_targets`); the sampler keeps, per
cluster, a uniform reservoir (Algorithm R) of at most ``reservoir_per_cluster`` target volumes. Training
workers then ask, for a batch of source ids, for targets drawn uniformly from the source's cluster
(:meth:`PairSampler.sample_targets`).

Memory is linear in the number of ids N: one sorted int64 id array and one int32 label array (lookups by
``np.searchsorted``), plus, lazily for :meth:`sample_pairs`, one index array grouping ids by cluster. The
N^2 set of same-cluster pairs is never built. ``PairSamplerActor`` is the same class as a Ray actor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray


def _ids_array(ids, name: str = "ids") -> np.ndarray:
    a = np.asarray(ids)
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D integer array, got dtype {a.dtype} and shape {a.shape}")
    return a.astype(np.int64, copy=False)


def _labels_array(labels, n: int) -> np.ndarray:
    a = np.asarray(labels)
    if a.shape != (n,) or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array of length {n} (one per id), got {a.dtype} {a.shape}")
    if n and (a.min() < 0 or a.max() > np.iinfo(np.int32).max):
        raise ValueError("labels must be non-negative cluster indices (0..K-1)")
    return a.astype(np.int32, copy=False)


class PairSampler:
    """Same-cluster pair and target sampler for one training round at a time.

    Args:
        reservoir_per_cluster: most target volumes kept per cluster.
        seed: base seed; round r draws from ``np.random.default_rng([seed, r])``.
    """

    def __init__(self, reservoir_per_cluster: int, seed: int = 0):
        if int(reservoir_per_cluster) < 1:
            raise ValueError(f"reservoir_per_cluster must be >= 1, got {reservoir_per_cluster}")
        self.reservoir_per_cluster = int(reservoir_per_cluster)
        self.seed = int(seed)
        self.reset_round(0)

    # ------------------------------------------------------------------ round and labels
    def reset_round(self, round_index: int) -> None:
        """Forget labels and reservoirs; the random stream restarts from ``(seed, round_index)``."""
        self.round_index = int(round_index)
        self._rng = np.random.default_rng([self.seed, self.round_index])
        self._pending_ids: list[np.ndarray] = []
        self._pending_labels: list[np.ndarray] = []
        self._ids = np.zeros(0, dtype=np.int64)  # sorted
        self._labels = np.zeros(0, dtype=np.int32)  # aligned with _ids
        self._by_cluster: np.ndarray | None = None  # positions into _ids grouped by label (lazy)
        self._offsets: np.ndarray | None = None  # (K + 1,) start of each label's block in _by_cluster
        self._res_ids: dict[int, np.ndarray] = {}
        self._res_vols: dict[int, np.ndarray] = {}
        self._res_seen: dict[int, int] = {}
        self._res_tilts: dict[int, np.ndarray] = {}
        self._vol_shape: tuple[int, ...] | None = None

    def current_round(self) -> int:
        """The round being sampled (0 before the first); the driver polls it for its progress bar."""
        return self.round_index

    def add_labels(self, ids, labels) -> None:
        """Record the cluster label of each id (any number of calls, from any worker, per round)."""
        ids = _ids_array(ids)
        labels = _labels_array(labels, len(ids))
        self._pending_ids.append(ids.copy())
        self._pending_labels.append(labels.copy())
        self._by_cluster = None

    def _consolidate(self) -> None:
        if not self._pending_ids:
            return
        ids = np.concatenate([self._ids, *self._pending_ids])
        labels = np.concatenate([self._labels, *self._pending_labels])
        self._pending_ids, self._pending_labels = [], []
        order = np.argsort(ids)  # equal ids end up adjacent; conflicts are caught in any order
        ids, labels = ids[order], labels[order]
        dup = np.flatnonzero(ids[1:] == ids[:-1])
        if len(dup):
            clash = dup[labels[dup] != labels[dup + 1]]
            if len(clash):
                i = clash[0]
                raise ValueError(
                    f"id {ids[i]} was given labels {labels[i]} and {labels[i + 1]} in round {self.round_index}: "
                    "each id needs one label per round (call reset_round between rounds)"
                )
            keep = np.ones(len(ids), dtype=bool)
            keep[dup + 1] = False
            ids, labels = ids[keep], labels[keep]
        self._ids, self._labels = ids, labels

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        self._consolidate()
        if len(ids) > 1024:  # sorted needles make numpy's binary searches cache friendly
            order = np.argsort(ids)
            pos = np.empty(len(ids), dtype=np.int64)
            pos[order] = np.searchsorted(self._ids, ids[order])
        else:
            pos = np.searchsorted(self._ids, ids)
        pos_c = np.minimum(pos, max(len(self._ids) - 1, 0))
        found = (pos < len(self._ids)) & (self._ids[pos_c] == ids) if len(self._ids) else np.zeros(len(ids), bool)
        if not found.all():
            missing = ids[~found]
            raise KeyError(
                f"{len(missing)} id(s) have no label in round {self.round_index} (e.g. {missing[:10].tolist()}): "
                "call add_labels for every subtomogram before sampling"
            )
        return pos_c

    def labels_of(self, ids) -> np.ndarray:
        """Cluster label (int64) of each id; KeyError naming the ids without a label."""
        pos = self._positions(_ids_array(ids))
        return self._labels[pos].astype(np.int64)

    def cluster_sizes(self) -> dict[int, int]:
        """{label: number of labelled ids} for this round."""
        self._consolidate()
        values, counts = np.unique(self._labels, return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts, strict=True)}

    def __len__(self) -> int:
        self._consolidate()
        return len(self._ids)

    # ------------------------------------------------------------------ reservoirs of target volumes
    def offer_targets(self, ids, labels, volumes, tilts=None) -> None:
        """Offer target volumes (n, d, h, w) with their ids, labels and (optionally) tilt ranges in degrees;
        each cluster keeps a uniform sample (Algorithm R over everything offered to it this round) of at most
        ``reservoir_per_cluster``."""
        ids = _ids_array(ids)
        labels = _labels_array(labels, len(ids))
        volumes = np.asarray(volumes, dtype=np.float32)
        tilts = np.full(len(ids), np.nan, np.float32) if tilts is None else np.asarray(tilts, np.float32)
        if tilts.shape != (len(ids),):
            raise ValueError(f"tilts must be (n,) with n = {len(ids)} ids, got shape {tilts.shape}")
        if volumes.ndim != 4 or volumes.shape[0] != len(ids):
            raise ValueError(f"volumes must be (n, d, h, w) with n = {len(ids)} ids, got shape {volumes.shape}")
        if len(ids) == 0:  # a worker without rows this round (its placeholder has no box to check)
            return
        if self._vol_shape is None:
            self._vol_shape = volumes.shape[1:]
        elif volumes.shape[1:] != self._vol_shape:
            raise ValueError(f"volumes of shape {volumes.shape[1:]} offered after {self._vol_shape} this round")
        cap = self.reservoir_per_cluster
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            self._offer_cluster(int(label), ids[members], volumes[members], cap, tilts[members])

    def _offer_cluster(self, label: int, ids: np.ndarray, vols: np.ndarray, cap: int, tilts: np.ndarray) -> None:
        if label not in self._res_ids:
            self._res_ids[label] = np.full(cap, -1, dtype=np.int64)
            self._res_tilts[label] = np.full(cap, np.nan, dtype=np.float32)
            self._res_vols[label] = np.zeros((cap, *vols.shape[1:]), dtype=np.float32)
            self._res_seen[label] = 0
        seen = self._res_seen[label]
        t = seen + np.arange(1, len(ids) + 1)  # 1-based arrival number of each item
        slot = np.where(t <= cap, t - 1, np.floor(self._rng.random(len(ids)) * t).astype(np.int64))
        accept = slot < cap
        slot, src = slot[accept], np.flatnonzero(accept)
        # later arrivals overwrite earlier ones in the same slot (sequential Algorithm R)
        _, last = np.unique(slot[::-1], return_index=True)
        keep = len(slot) - 1 - last
        self._res_ids[label][slot[keep]] = ids[src[keep]]
        self._res_vols[label][slot[keep]] = vols[src[keep]]
        self._res_tilts[label][slot[keep]] = tilts[src[keep]]
        self._res_seen[label] = seen + len(ids)

    def reservoir_ids(self, label: int) -> np.ndarray:
        """Ids currently held in cluster ``label``'s reservoir."""
        n = min(self._res_seen.get(label, 0), self.reservoir_per_cluster)
        return self._res_ids[label][:n].copy() if n else np.zeros(0, dtype=np.int64)

    def sample_targets(self, source_ids, exclude_self: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each source id, a uniform random reservoir member of its cluster (not itself when the
        reservoir holds another). Returns (labels (b,) int64, target_ids (b,) int64, volumes (b, d, h, w))."""
        labels, target_ids, volumes, _ = self._sample(source_ids, exclude_self, allow_missing=False)
        return labels, target_ids, volumes

    def sample_target_batch(self, source_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """As :meth:`sample_targets`, plus the targets' tilt ranges (b,); a source whose cluster has no
        reservoir member gets target id -1 (a zero volume, NaN tilt) instead of an error, so a training step
        can pair it with itself."""
        return self._sample(source_ids, exclude_self=True, allow_missing=True)

    def _sample(self, source_ids, exclude_self: bool, allow_missing: bool):
        source = _ids_array(source_ids, "source_ids")
        labels = self.labels_of(source)
        target_ids = np.full(len(source), -1, dtype=np.int64)
        volumes = np.zeros((len(source), *(self._vol_shape or (0, 0, 0))), dtype=np.float32)
        tilts = np.full(len(source), np.nan, dtype=np.float32)
        for label in np.unique(labels):
            rows = np.flatnonzero(labels == label)
            m = min(self._res_seen.get(int(label), 0), self.reservoir_per_cluster)
            if m == 0 and allow_missing:
                continue
            if m == 0:
                raise RuntimeError(
                    f"no target volumes offered for cluster {label} in round {self.round_index}: "
                    "call offer_targets with members of every cluster before sample_targets"
                )
            res = self._res_ids[int(label)][:m]
            j = self._rng.integers(0, m, size=len(rows))
            if exclude_self and m > 1:
                # position of the source in the reservoir (m when absent); draw among the other m - 1
                order = np.argsort(res, kind="stable")
                where = np.searchsorted(res[order], source[rows])
                where_c = np.minimum(where, m - 1)
                inside = res[order][where_c] == source[rows]
                self_pos = np.where(inside, order[where_c], m)
                alt = self._rng.integers(0, m - 1, size=len(rows))
                alt = alt + (alt >= self_pos)
                j = np.where(inside, alt, j)
            target_ids[rows] = res[j]
            volumes[rows] = self._res_vols[int(label)][j]
            tilts[rows] = self._res_tilts[int(label)][j]
        return labels, target_ids, volumes, tilts

    # ------------------------------------------------------------------ pairs over all ids
    def _build_groups(self) -> None:
        self._consolidate()
        if self._by_cluster is not None:
            return
        if len(self._ids) == 0:
            raise RuntimeError("no labels this round: call add_labels before sample_pairs")
        index_dtype = np.int32 if len(self._ids) < 2**31 else np.int64
        self._by_cluster = np.argsort(self._labels, kind="stable").astype(index_dtype)
        counts = np.bincount(self._labels)
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def sample_pairs(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``n`` same-cluster pairs: the source uniform over all labelled ids, the target uniform over the
        other members of its cluster (itself only for a singleton cluster).
        Returns (source_ids, target_ids, labels), each (n,) int64."""
        if int(n) < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self._build_groups()
        total = len(self._ids)
        p = self._rng.integers(0, total, size=int(n))  # position in the grouped order
        label = np.searchsorted(self._offsets, p, side="right") - 1
        start = self._offsets[label]
        size = self._offsets[label + 1] - start
        rank = p - start
        j = np.floor(self._rng.random(int(n)) * np.maximum(size - 1, 1)).astype(np.int64)
        j = np.where(size > 1, j + (j >= rank), 0)
        source = self._ids[self._by_cluster[p]]
        target = self._ids[self._by_cluster[start + j]]
        return source, target, label.astype(np.int64)

    # ------------------------------------------------------------------ accounting and checkpoints
    def memory_bytes(self) -> int:
        """Bytes held in arrays (labels, grouping index, pending batches, reservoirs)."""
        arrays = [self._ids, self._labels, *self._pending_ids, *self._pending_labels,
                  *self._res_ids.values(), *self._res_vols.values()]
        if self._by_cluster is not None:
            arrays += [self._by_cluster, self._offsets]
        return int(sum(a.nbytes for a in arrays))

    def get_state(self) -> dict[str, Any]:
        """Everything needed to resume this round (numpy arrays and plain numbers)."""
        self._consolidate()
        return {
            "reservoir_per_cluster": self.reservoir_per_cluster, "seed": self.seed, "round_index": self.round_index,
            "rng": self._rng.bit_generator.state, "ids": self._ids.copy(), "labels": self._labels.copy(),
            "reservoirs": {int(k): (self._res_ids[k].copy(), self._res_vols[k].copy(), self._res_seen[k])
                           for k in self._res_ids},
            "reservoir_tilts": {int(k): v.copy() for k, v in self._res_tilts.items()},
            "volume_shape": self._vol_shape,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`get_state` output."""
        self.reservoir_per_cluster = int(state["reservoir_per_cluster"])
        self.seed = int(state["seed"])
        self.reset_round(int(state["round_index"]))
        self._rng.bit_generator.state = state["rng"]
        self._ids = np.asarray(state["ids"], dtype=np.int64).copy()
        self._labels = np.asarray(state["labels"], dtype=np.int32).copy()
        for k, (rid, rvol, seen) in state["reservoirs"].items():
            self._res_ids[int(k)], self._res_vols[int(k)] = rid.copy(), rvol.copy()
            self._res_seen[int(k)] = int(seen)
            default = np.full(len(rid), np.nan, dtype=np.float32)
            self._res_tilts[int(k)] = np.asarray(state.get("reservoir_tilts", {}).get(int(k), default)).copy()
        self._vol_shape = None if state["volume_shape"] is None else tuple(state["volume_shape"])


PairSamplerActor = ray.remote(PairSampler)
