"""Per-cluster template (reference) estimation on Ray Data, as the paper does it.

Start from each cluster's member with the highest posterior (``initial="best"``) or the wedge-aware mean of its
unaligned members (``initial="mean"``); then, ``iterations`` times: align every member to its cluster's
reference with Jim-Net and replace the reference by the wedge-weighted average of the members under those
poses. Only the ``K`` references travel (``ray.put`` once per iteration); the particles stream through the
actors, which send back per-batch partial sums (:class:`~jimray.predict.predictors.TemplateSums`); the driver
adds them into one :class:`~jimray.average.WedgeAccumulator` per cluster and takes its ``result``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from jimray.average.wedge_average import WedgeAccumulator
from jimray.predict.predictors import LabelTable, TemplateSums, map_with_actors

__all__ = ["INITIAL_TEMPLATES", "TemplateEstimate", "estimate_references", "fetch_volumes", "reduce_sums"]

INITIAL_TEMPLATES = ("best", "mean")


@dataclass
class TemplateEstimate:
    """``references`` (K, d, h, w) float32 (zeros for an empty cluster), ``counts`` (K,) members per cluster,
    ``history``: per iteration the correlation of each new reference with the previous one (K,), NaN if empty."""

    references: np.ndarray
    counts: np.ndarray
    history: list[np.ndarray] = field(default_factory=list)


def _rows_with_ids(batch: dict, ids: np.ndarray) -> dict:
    keep = np.isin(np.asarray(batch["id"], dtype=np.int64), ids)
    return {"id": np.asarray(batch["id"])[keep], "volume": np.asarray(batch["volume"])[keep]}


def fetch_volumes(ds, ids) -> dict[int, np.ndarray]:
    """The volumes ``(d, h, w)`` of the rows with these ``ids`` (a few: they are collected on the driver)."""
    wanted = np.asarray(sorted(set(int(i) for i in ids)), dtype=np.int64)
    rows = ds.select_columns(["id", "volume"]).map_batches(_rows_with_ids, fn_kwargs={"ids": wanted},
                                                            batch_format="numpy").take_all()
    found = {int(r["id"]): np.asarray(r["volume"], dtype=np.float32) for r in rows}
    missing = sorted(set(wanted.tolist()) - set(found))
    if missing:
        raise KeyError(f"ids {missing[:5]} not found in the data (it changed between passes)")
    return found


def reduce_sums(sums_ds, n_clusters: int, shape: tuple[int, int, int]) -> dict[int, WedgeAccumulator]:
    """Add the partial-sum rows of a :class:`TemplateSums` pass (volumes of ``shape`` (d, h, w)) into one
    accumulator per cluster (on the driver)."""
    accumulators: dict[int, WedgeAccumulator] = {}
    for batch in sums_ds.iter_batches(batch_size=64, batch_format="numpy"):
        for i, label in enumerate(np.asarray(batch["label"], dtype=np.int64)):
            if not 0 <= label < n_clusters:
                raise ValueError(f"partial sums name cluster {label}, outside 0..{n_clusters - 1}")
            spectrum = torch.complex(torch.from_numpy(np.asarray(batch["spectrum_real"][i], np.float32)),
                                     torch.from_numpy(np.asarray(batch["spectrum_imag"][i], np.float32)))
            weight = torch.from_numpy(np.asarray(batch["weight"][i], np.float32))
            if int(label) not in accumulators:
                accumulators[int(label)] = WedgeAccumulator(tuple(shape), dtype=torch.float32)
            acc = accumulators[int(label)]
            acc.spectrum_sum += spectrum
            acc.weight_sum += weight
            acc.count += int(batch["count"][i])
    return accumulators


def _references_from(accumulators: dict[int, WedgeAccumulator], n_clusters: int, shape, wiener_floor: float):
    references = np.zeros((n_clusters, *shape), dtype=np.float32)
    counts = np.zeros(n_clusters, dtype=np.int64)
    for label, acc in accumulators.items():
        references[label] = acc.result(wiener_floor)[0].numpy()
        counts[label] = acc.count
    return references, counts


def _correlations(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    out = np.full(len(new), np.nan)
    for k in range(len(new)):
        a, b = new[k].ravel() - new[k].mean(), old[k].ravel() - old[k].mean()
        denominator = np.sqrt((a * a).sum() * (b * b).sum())
        if denominator > 0:
            out[k] = float((a * b).sum() / denominator)
    return out


def _template_pass(ds, run_ref, references, table_ref, n_clusters, shape, align, actors, batch_size, wiener_floor):
    import ray

    refs_ref = None if references is None else ray.put(references)
    sums = map_with_actors(ds.select_columns(["id", "volume", "tilt_range_degrees"]), TemplateSums, actors=actors,
                           batch_size=batch_size, changes_rows=True, run=run_ref, references=refs_ref,
                           labels=table_ref, align=align)
    return _references_from(reduce_sums(sums, n_clusters, shape), n_clusters, shape, wiener_floor)


def estimate_references(
    ds,
    run_ref,
    table: LabelTable,
    n_clusters: int,
    *,
    iterations: int = 2,
    initial: str = "best",
    actors: int = 2,
    batch_size: int = 16,
    wiener_floor: float = 1.0,
    progress: Callable[[str], None] | None = None,
) -> TemplateEstimate:
    """Iterative per-cluster references (module docstring). ``ds``: rows with ``id``, ``volume``,
    ``tilt_range_degrees``; ``run_ref``: ``ray.put(TrainedRun.payload())``; ``table``: every particle's cluster."""
    import ray

    if initial not in INITIAL_TEMPLATES:
        raise ValueError(f"initial must be one of {INITIAL_TEMPLATES}, got {initial!r}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    say = progress or (lambda _message: None)
    table_ref = ray.put(table)
    counts = table.sizes(n_clusters)
    if initial == "best":
        best = table.best_members()
        volumes = fetch_volumes(ds, best.values())
        shape = next(iter(volumes.values())).shape
        references = np.zeros((n_clusters, *shape), dtype=np.float32)
        for label, member in best.items():
            references[label] = volumes[member]
        say(f"initial references: the most probable member of each of {len(best)} clusters")
    else:
        shape = tuple(ds.take(1)[0]["volume"].shape)
        references, counts = _template_pass(ds, run_ref, None, table_ref, n_clusters, shape, False, actors,
                                            batch_size, wiener_floor)
        say(f"initial references: wedge-aware means of {int((counts > 0).sum())} clusters")
    history = []
    for it in range(1, iterations + 1):
        new, counts = _template_pass(ds, run_ref, references, table_ref, n_clusters, shape, True, actors,
                                     batch_size, wiener_floor)
        history.append(_correlations(new, references))
        references = new
        say(f"template iteration {it}/{iterations}: correlation with the previous reference "
            f"{np.nanmean(history[-1]):.3f} (mean over clusters)")
    return TemplateEstimate(references, counts, history)
