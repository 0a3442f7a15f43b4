"""(a) of a round with the common-frame embedding (:mod:`jimray.cluster.frame`), inside a Ray Train worker.

Round 1 seeds ``R`` references from particles spread over the rotation-invariant features; every round
embeds the worker's particles by their aligned scores against the current references and then moves each
reference one mode-seeking step (the average of its best-scoring particles over all workers) for the next
round. :class:`FrameRound` is what a checkpoint keeps: the references and statistics of the round's embedding
(so ``jimray predict`` reproduces its clustering exactly) and the references the next round starts from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from jimray.align.multiref import ReferenceScores
from jimray.cluster.distinct import distinct_k, pose_half_scores, search_half_scores
from jimray.cluster.frame import (
    FrameOptions,
    FrameStats,
    apply_frame_stats,
    choose_seeds,
    frame_embedding,
    frame_scores,
    gather_volumes,
    update_references,
)
from jimray.cluster.invariant import invariant_features
from jimray.cluster.reduce import Reducer
from jimray.train.clustering import KChooser


@dataclass
class FrameRound:
    """References ``(R, d, h, w)`` and their tilt range (90 = wedge-free averages, less for seed particles)
    used by a round's embedding, the embedding's :class:`FrameStats`, and the next round's references."""

    options: FrameOptions
    references: torch.Tensor
    reference_tilt_range_degrees: float
    stats: FrameStats
    next_references: torch.Tensor
    scores: ReferenceScores | None = None  # this worker's scores of the round (not checkpointed)

    def get_state(self) -> dict:
        return {"options": vars(self.options).copy(), "references": self.references.cpu().clone(),
                "reference_tilt_range_degrees": float(self.reference_tilt_range_degrees),
                "stats": self.stats.get_state(), "next_references": self.next_references.cpu().clone()}

    @classmethod
    def from_state(cls, state: dict) -> FrameRound:
        return cls(FrameOptions(**state["options"]), torch.as_tensor(state["references"]).float(),
                   float(state["reference_tilt_range_degrees"]), FrameStats.from_state(state["stats"]),
                   torch.as_tensor(state["next_references"]).float())

    def embed(self, volumes: torch.Tensor, tilts) -> torch.Tensor:
        """The embedding of new ``volumes (n, d, h, w)`` exactly as this round embedded its training data."""
        scores = frame_scores(volumes, tilts, self.references, self.options, self.reference_tilt_range_degrees)
        return apply_frame_stats(scores.scores, self.stats)


def _scores(volumes: torch.Tensor, tilts: torch.Tensor, refs: torch.Tensor, options: FrameOptions,
            reference_tilt: float) -> ReferenceScores:
    if volumes.shape[0] == 0:  # a worker without rows still takes part in every reduction
        r = refs.shape[0]
        return ReferenceScores(torch.zeros((0, r)), torch.zeros((0, r, 3, 3)), torch.zeros((0, r, 3)))
    return frame_scores(volumes, tilts, refs, options, reference_tilt)


def _global_mean(value: float, count: int, reducer: Reducer) -> float:
    sums = reducer.all_reduce_sum(torch.tensor([value * count, float(count)], dtype=torch.float64))
    return float(sums[0] / sums[1].clamp_min(1.0))


def frame_step(volumes: torch.Tensor, tilts: np.ndarray, ids: np.ndarray, box_size: int, options: FrameOptions,
               reducer: Reducer, previous: FrameRound | None) -> tuple[torch.Tensor, FrameRound]:
    """This worker's embedding ``(n, R)`` float64 and the round's :class:`FrameRound` (identical on all ranks).
    ``R`` is ``options.n_references`` and ``m`` ``options.members_per_reference``, or half and an eighth of the
    data set when those are smaller (a reference must not average most of a small set)."""
    if volumes.shape[0] == 0:
        volumes = torch.zeros((0, box_size, box_size, box_size))
    tilt_t = torch.as_tensor(np.asarray(tilts, dtype=np.float32))
    if previous is None:
        n_total = int(reducer.all_reduce_sum(torch.tensor([float(len(ids))])).item())
        options = replace(options, n_references=min(options.n_references, max(2, n_total // 2)),
                          members_per_reference=min(options.members_per_reference, max(2, n_total // 8)))
        features = invariant_features(volumes, tilt_t) if len(ids) else torch.zeros((0, box_size))
        seeds = choose_seeds(features, ids, options.n_references, seed=options.seed, reducer=reducer)
        refs = gather_volumes(volumes, ids, seeds, reducer)
        reference_tilt = _global_mean(float(tilt_t.mean()) if len(ids) else 0.0, len(ids), reducer)
    else:
        refs, reference_tilt, options = previous.next_references, 90.0, previous.options
    scores = _scores(volumes, tilt_t, refs, options, reference_tilt)
    embedding, stats = frame_embedding(scores, reducer)
    next_refs = update_references(volumes, tilt_t, scores, options, refs, reducer)
    return embedding, FrameRound(options, refs, reference_tilt, stats, next_refs, scores)


def frame_k_chooser(volumes: torch.Tensor, tilts: np.ndarray, ids: np.ndarray, frame: FrameRound,
                    candidates: list[int], reducer: Reducer, seed: int = 0,
                    lowpass_cycles_per_voxel: float | None = None, scoring: str = "pose") -> KChooser:
    """``choose(labels_for) -> (K, table)``: K by held-out class averages (:func:`jimray.cluster.distinct.
    distinct_k`) over this worker's ``volumes (n, d, h, w)`` and the round's frame scores, for partitions
    ``labels_for(K)`` (local labels) of the round's clustering rule. ``scoring``: ``"pose"`` scores each
    particle against the half-set averages from the pose the frame found, refined locally within a third of
    the frame's grid step, ``"search"`` with the frame's global search; both up to
    ``lowpass_cycles_per_voxel`` (None = the frame's own low-pass)."""
    if frame.scores is None:
        raise ValueError("the frame round carries no scores: K by held-out class averages needs the round's "
                         "frame_step output")
    if scoring not in ("pose", "search"):
        raise ValueError(f"scoring must be 'pose' or 'search', got {scoring!r}")
    tilt_t = torch.as_tensor(np.asarray(tilts, dtype=np.float32))
    options = frame.options if lowpass_cycles_per_voxel is None else replace(
        frame.options, lowpass_cycles_per_voxel=float(lowpass_cycles_per_voxel))
    if scoring == "pose":
        score = pose_half_scores(options.lowpass_cycles_per_voxel, options.max_shift_voxels,
                                 refine_degrees=options.angular_step_degrees / 3.0)  # a third of the grid's step
    else:
        score = search_half_scores(lambda vols, tilt, refs: _scores(vols, tilt, refs, options, 90.0).scores)

    def choose(labels_for: Callable[[int], np.ndarray]) -> tuple[int, list[dict]]:
        return distinct_k(candidates, labels_for, volumes, tilt_t, ids, frame.scores, score, reducer, seed=seed)

    return choose
