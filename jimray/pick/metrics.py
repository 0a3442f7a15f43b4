"""Scoring picks against the true particle positions: one-to-one matching within a distance."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree


@dataclass
class PickScore:
    """Recall = matched / true, precision = matched / picked; ``matches`` (m, 2) index pairs (pick, true)."""

    recall: float
    precision: float
    n_true: int
    n_picked: int
    n_matched: int
    matches: np.ndarray
    mean_distance_voxels: float

    @property
    def f1(self) -> float:
        total = self.recall + self.precision
        return 0.0 if total == 0 else 2 * self.recall * self.precision / total


def match_picks(picked_xyz: np.ndarray, true_xyz: np.ndarray, max_distance_voxels: float) -> PickScore:
    """Match picks ``(n, 3)`` to true positions ``(m, 3)`` (voxels, x y z) one-to-one: a pair may match when
    closer than or at ``max_distance_voxels`` (e.g. the particle radius); the matching has maximum size
    and among those the summed distance is minimal (Hungarian on a sparse-filled cost matrix)."""
    picked = np.asarray(picked_xyz, dtype=np.float64).reshape(-1, 3)
    true = np.asarray(true_xyz, dtype=np.float64).reshape(-1, 3)
    if not max_distance_voxels > 0:
        raise ValueError(f"max_distance_voxels must be positive, got {max_distance_voxels}")
    n, m = len(picked), len(true)
    empty = np.zeros((0, 2), dtype=np.int64)
    if n == 0 or m == 0:
        return PickScore(0.0 if m else 1.0, 0.0 if n else 1.0, m, n, 0, empty, float("nan"))
    neighbours = cKDTree(picked).query_ball_tree(cKDTree(true), max_distance_voxels)
    rows = np.array([i for i, js in enumerate(neighbours) for _ in js], dtype=np.int64)
    cols = np.array([j for js in neighbours for j in js], dtype=np.int64)
    if len(rows) == 0:
        return PickScore(0.0, 0.0, m, n, 0, empty, float("nan"))
    values = np.linalg.norm(picked[rows] - true[cols], axis=1)  # exact zeros included (a sparse matrix drops them)
    # a missing match costs more than any sum of real distances, so the assignment has maximum size first
    big = max_distance_voxels * (n + m + 1) + 1.0
    cost = np.full((n, m), big)
    cost[rows, cols] = values
    r, c = linear_sum_assignment(cost)
    ok = cost[r, c] < big
    pairs = np.stack([r[ok], c[ok]], axis=1).astype(np.int64)
    mean = float(cost[pairs[:, 0], pairs[:, 1]].mean()) if len(pairs) else float("nan")
    return PickScore(len(pairs) / m, len(pairs) / n, m, n, len(pairs), pairs, mean)
