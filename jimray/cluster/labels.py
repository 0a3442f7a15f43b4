"""Label matching, in one place: the Hungarian matching of one labelling onto another.

Everything that renames clusters to agree with other labels, or scores labels against the truth, goes
through :func:`match_counts` on a contingency table:

* :func:`hungarian_mapping` / :func:`clustering_accuracy` -- two label arrays on one process (the paper's
  accuracy; re-exported by :mod:`jimray.conventions`);
* :func:`relabel` / :func:`match_components` -- rename a new clustering after the previous one (fresh labels for
  clusters without a partner), optionally reordering a mixture's components to follow;
* :func:`relabel_to_previous` / :func:`global_accuracy` -- the same on counts all-reduced over training workers
  (a shrinking K is compacted into ``0..K-1``), and :func:`reorder_to` to make a mixture follow the new names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from jimray.cluster.reduce import Reducer

if TYPE_CHECKING:
    from jimray.cluster.gmm import GaussianMixture


def match_counts(counts: np.ndarray) -> dict[int, int]:
    """Hungarian matching of the rows of a contingency table to its columns, maximising the agreement
    (the summed counts of the matched cells); rows beyond the number of columns stay unmatched."""
    rows, cols = linear_sum_assignment(-np.asarray(counts))
    return {int(r): int(c) for r, c in zip(rows, cols, strict=True)}


def matched_fraction(counts: np.ndarray) -> float:
    """Fraction of all counts on the Hungarian-matched cells (the paper's accuracy from a contingency table)."""
    counts = np.asarray(counts)
    pairs = match_counts(counts)
    rows, cols = np.array(list(pairs), dtype=np.int64), np.array(list(pairs.values()), dtype=np.int64)
    return float(counts[rows, cols].sum() / max(counts.sum(), 1.0))


def contingency(a: np.ndarray, b: np.ndarray, size_a: int, size_b: int) -> np.ndarray:
    """Counts ``(size_a, size_b)`` (float64) of the label pairs ``(a[i], b[i])``."""
    counts = np.zeros((size_a, size_b), dtype=np.float64)
    np.add.at(counts, (np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)), 1.0)
    return counts


def hungarian_mapping(labels_from: np.ndarray, labels_to: np.ndarray) -> dict[int, int]:
    """Map each label of ``labels_from`` to a label of ``labels_to`` maximising agreement (Hungarian).

    Labels of ``labels_from`` left without a partner (more clusters than targets) keep a fresh label.
    """
    a = np.asarray(labels_from, dtype=np.int64)
    b = np.asarray(labels_to, dtype=np.int64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"label arrays must be 1-D and of equal length, got {a.shape} and {b.shape}")
    ua, ia = np.unique(a, return_inverse=True)
    ub, ib = np.unique(b, return_inverse=True)
    pairs = match_counts(contingency(ia, ib, len(ua), len(ub)))
    mapping = {int(ua[r]): int(ub[c]) for r, c in pairs.items()}
    fresh = int(max(ub.max(initial=-1), ua.max(initial=-1))) + 1
    for label in ua:
        if int(label) not in mapping:
            mapping[int(label)] = fresh
            fresh += 1
    return mapping


def clustering_accuracy(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """Paper's clustering accuracy in [0, 1]: agreement after Hungarian matching of predicted to true labels."""
    t = np.asarray(labels_true, dtype=np.int64)
    p = np.asarray(labels_pred, dtype=np.int64)
    if len(t) == 0:
        raise ValueError("clustering_accuracy needs at least one label")
    mapping = hungarian_mapping(p, t)
    return float(np.mean(np.array([mapping[int(x)] for x in p]) == t))


def relabel(new_labels, previous_labels) -> np.ndarray:
    """``new_labels`` renamed to agree best (Hungarian) with ``previous_labels`` of the same items;
    clusters without a partner get fresh labels."""
    new = np.asarray(new_labels, dtype=np.int64)
    mapping = hungarian_mapping(new, np.asarray(previous_labels, dtype=np.int64))
    lut_keys = np.array(sorted(mapping), dtype=np.int64)
    lut_vals = np.array([mapping[k] for k in lut_keys], dtype=np.int64)
    return lut_vals[np.searchsorted(lut_keys, new)]


def reorder_to(gmm: GaussianMixture, lut: np.ndarray) -> None:
    """Reorder components so that component ``lut[j]`` is the old component ``j`` (labels follow ``lut``)."""
    order = np.empty(len(lut), dtype=np.int64)
    order[lut] = np.arange(len(lut))
    gmm.reorder_components(order)


def match_components(gmm: GaussianMixture, new_labels, previous_labels) -> np.ndarray:
    """Reorder ``gmm``'s components in place so that its labels agree best with ``previous_labels``
    (Hungarian on the items' labels); returns ``new_labels`` under the new component order."""
    new = np.asarray(new_labels, dtype=np.int64)
    mapping = hungarian_mapping(new, np.asarray(previous_labels, dtype=np.int64))
    k = gmm.n_components
    slot = {old: t for old, t in mapping.items() if 0 <= old < k and 0 <= t < k}
    free = iter(sorted(set(range(k)) - set(slot.values())))
    for old in range(k):  # components matched to nothing (or to a label >= K) take the free slots
        if old not in slot:
            slot[old] = next(free)
    lut = np.array([slot[old] for old in range(k)], dtype=np.int64)
    reorder_to(gmm, lut)
    return lut[new]


# ---------------------------------------------------------------------- over training workers
def global_contingency(a: np.ndarray, b: np.ndarray, size_a: int, size_b: int, reducer: Reducer) -> np.ndarray:
    """Counts ``(size_a, size_b)`` of label pairs over all workers (local counts, then all-reduce)."""
    return reducer.all_reduce_sum(torch.from_numpy(contingency(a, b, size_a, size_b))).numpy()


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
    if counts.shape[1] < counts.shape[0]:
        raise ValueError(f"need columns >= rows to match every new label, got counts of shape {counts.shape}")
    mapping = match_counts(counts)
    targets = sorted(set(mapping.values()))
    if max(targets) >= n_clusters:  # K shrank: compact the matched labels into 0..K-1, keeping order
        rank = {t: i for i, t in enumerate(targets)}
        mapping = {k: rank[v] for k, v in mapping.items()}
    lut = np.array([mapping[k] for k in range(n_clusters)], dtype=np.int64)
    new = lut[labels]
    changed = reducer.all_reduce_sum(torch.tensor([float((new != previous).sum()), float(len(new))]))
    return new, float(changed[0] / max(changed[1], 1.0)), lut


def global_accuracy(truth: np.ndarray, labels: np.ndarray, n_clusters: int, reducer: Reducer) -> float:
    """The paper's clustering accuracy (Hungarian), from contingency counts summed over workers."""
    n_true = int(global_max(truth.max(initial=-1) + 1, reducer))
    return matched_fraction(global_contingency(labels, truth, n_clusters, max(n_true, 1), reducer))
