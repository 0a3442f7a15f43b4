"""Callable classes for ``Dataset.map_batches`` on an actor pool: each actor loads the trained run ONCE.

Use :func:`map_with_actors` (it picks the resources: one GPU per actor when the cluster has GPUs, else a
fraction of a CPU that leaves room for Ray Data's read tasks) or call ``ds.map_batches(Cls,
fn_constructor_kwargs=..., compute=ray.data.ActorPoolStrategy(size=n), batch_format="numpy")`` yourself.
Constructor arguments may be values or ``ray.ObjectRef`` s (``ray.put`` the run payload and the references
once; every actor fetches them from the object store).

* :class:`ClusterPredictor` adds ``label`` (0-based cluster) and ``probability`` (max posterior).
* :class:`PosePredictor` adds ``rot``, ``tilt``, ``psi`` (RELION ZYZ, degrees) and ``shift_x/y/z`` (voxels):
  the pose of each particle relative to its cluster's reference, ``particle ~ transform(reference, R, t)``.
* :class:`TemplateSums` aligns the particles of a batch like :class:`PosePredictor` and emits, per cluster
  present in the batch, the wedge-weighted partial sums of :class:`jimray.average.WedgeAccumulator`
  (``label``, ``count``, ``spectrum_real``, ``spectrum_imag``, ``weight``, rfft layout ``(d, h, w // 2 + 1)``):
  references are re-estimated from those sums without any particle leaving the actors.

Particles' clusters come from a ``label`` column of the batch or, when absent, from a :class:`LabelTable`
(id -> label, probability) computed once by a :class:`ClusterPredictor` pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from jimray.average.wedge_average import WedgeAccumulator
from jimray.conventions import matrix_to_euler
from jimray.predict.run import TrainedRun

__all__ = [
    "LabelTable",
    "ClusterPredictor",
    "PosePredictor",
    "TemplateSums",
    "POSE_COLUMNS",
    "SUM_COLUMNS",
    "actor_resources",
    "map_with_actors",
]

POSE_COLUMNS = ("rot", "tilt", "psi", "shift_x", "shift_y", "shift_z")
SUM_COLUMNS = ("label", "count", "spectrum_real", "spectrum_imag", "weight")


@dataclass
class LabelTable:
    """Cluster of every particle: ``ids`` (n,) int64 sorted, ``labels`` (n,) int64, ``probabilities`` (n,)."""

    ids: np.ndarray
    labels: np.ndarray
    probabilities: np.ndarray

    @classmethod
    def from_arrays(cls, ids, labels, probabilities) -> LabelTable:
        ids = np.asarray(ids, dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        ids = ids[order]
        if len(ids) > 1 and bool((np.diff(ids) == 0).any()):
            raise ValueError("particle ids are not unique; re-ingest the data so that every subtomogram has its own id")
        return cls(ids, np.asarray(labels, dtype=np.int64)[order], np.asarray(probabilities, dtype=np.float64)[order])

    def __len__(self) -> int:
        return len(self.ids)

    def lookup(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """``(labels, probabilities)`` of ``ids``; every id must be in the table."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.clip(np.searchsorted(self.ids, ids), 0, max(len(self.ids) - 1, 0))
        if len(self.ids) == 0 or not bool((self.ids[pos] == ids).all()):
            missing = ids[(len(self.ids) == 0) | (self.ids[pos] != ids)]
            raise KeyError(f"ids {missing[:5].tolist()} are not in the label table (the data changed between passes)")
        return self.labels[pos], self.probabilities[pos]

    def best_members(self) -> dict[int, int]:
        """For each cluster present, the id of its member with the highest posterior."""
        best: dict[int, int] = {}
        order = np.lexsort((self.ids, -self.probabilities))  # highest probability first, ties by smaller id
        for i in order:
            best.setdefault(int(self.labels[i]), int(self.ids[i]))
        return best

    def sizes(self, n_clusters: int) -> np.ndarray:
        return np.bincount(self.labels, minlength=n_clusters)


def _resolve(value):
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _volumes(batch: dict, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(batch["volume"], dtype=np.float32)).to(device)


class ClusterPredictor:
    """``map_batches`` class: adds ``label`` (int64, 0-based) and ``probability`` (max GMM posterior) columns.

    ``run``: :meth:`TrainedRun.payload` (or its ObjectRef). Needs a ``volume`` column ``(b, d, h, w)``.
    """

    def __init__(self, run):
        self.run = TrainedRun.from_payload(_resolve(run), _device())

    def __call__(self, batch: dict) -> dict:
        tilts = batch.get("tilt_range_degrees")
        tilts = None if tilts is None else np.asarray(tilts, dtype=np.float32)
        probabilities = self.run.cluster_probabilities(_volumes(batch, self.run.device), tilts).cpu().numpy()
        out = dict(batch)
        out["label"] = probabilities.argmax(axis=1).astype(np.int64)
        out["probability"] = probabilities.max(axis=1)
        return out


class PosePredictor:
    """``map_batches`` class: pose of each particle relative to its cluster's reference.

    ``run``: :meth:`TrainedRun.payload` (or ref); ``references``: ``(K, d, h, w)`` array (or ref), one per
    cluster; ``labels``: a :class:`LabelTable` (or ref) used when the batch has no ``label`` column (then
    ``label`` and ``probability`` columns are added too). Adds :data:`POSE_COLUMNS` (float64).
    """

    def __init__(self, run, references, labels=None):
        self.run = TrainedRun.from_payload(_resolve(run), _device())
        refs = _resolve(references)
        device = _device()
        self.references = None if refs is None else torch.tensor(np.asarray(refs), dtype=torch.float32, device=device)
        self.table: LabelTable | None = _resolve(labels)

    def labels_of(self, batch: dict) -> tuple[np.ndarray, np.ndarray | None]:
        if "label" in batch:
            return np.asarray(batch["label"], dtype=np.int64), None
        if self.table is None:
            raise ValueError("the batch has no 'label' column and no LabelTable was given; run ClusterPredictor first")
        return self.table.lookup(batch["id"])

    def poses(self, particles: torch.Tensor, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R (b, 3, 3), t (b, 3))`` of ``particles`` against ``references[labels]`` (particle ~ reference moved)."""
        if self.references is None:
            raise ValueError("PosePredictor was given no references")
        k = self.references.shape[0]
        if len(labels) and (labels.min() < 0 or labels.max() >= k):
            raise ValueError(f"labels {np.unique(labels).tolist()} out of range for {k} references")
        index = torch.as_tensor(labels, device=self.references.device)
        return self.run.particle_poses(particles, self.references[index])

    def __call__(self, batch: dict) -> dict:
        labels, probabilities = self.labels_of(batch)
        rotations, shifts = self.poses(_volumes(batch, self.run.device), labels)
        angles = matrix_to_euler(rotations.double().cpu().numpy())
        shifts = shifts.double().cpu().numpy()
        out = dict(batch)
        if probabilities is not None:
            out["label"], out["probability"] = labels, probabilities
        for i, name in enumerate(POSE_COLUMNS[:3]):
            out[name] = angles[:, i]
        for i, name in enumerate(POSE_COLUMNS[3:]):
            out[name] = shifts[:, i]
        return out


class TemplateSums(PosePredictor):
    """``map_batches`` class (changes the row count): per cluster present in a batch, one row of wedge-weighted
    partial sums (:data:`SUM_COLUMNS`) of its particles under their poses against ``references``. With
    ``align=False`` the poses are the identity (a wedge-aware mean of the unaligned members; no references
    needed). Needs columns ``id``, ``volume`` and ``tilt_range_degrees``."""

    def __init__(self, run, references, labels=None, align: bool = True):
        super().__init__(run, references, labels)
        self.align = bool(align)

    def __call__(self, batch: dict) -> dict:
        labels, _ = self.labels_of(batch)
        particles = _volumes(batch, self.run.device)
        b = particles.shape[0]
        if self.align:
            rotations, shifts = self.poses(particles, labels)
        else:
            rotations = torch.eye(3, device=particles.device).expand(b, 3, 3)
            shifts = torch.zeros(b, 3, device=particles.device)
        tilt = torch.as_tensor(np.asarray(batch["tilt_range_degrees"], dtype=np.float64))
        rows: dict[str, list] = {name: [] for name in SUM_COLUMNS}
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            idx = torch.as_tensor(members, device=particles.device)
            acc = WedgeAccumulator(tuple(particles.shape[1:]), device=particles.device, dtype=torch.float32)
            acc.add(particles[idx], rotations[idx], shifts[idx], tilt[members])
            spectrum = acc.spectrum_sum.cpu()
            rows["label"].append(int(label))
            rows["count"].append(acc.count)
            rows["spectrum_real"].append(spectrum.real.numpy())
            rows["spectrum_imag"].append(spectrum.imag.numpy())
            rows["weight"].append(acc.weight_sum.cpu().numpy())
        return {"label": np.asarray(rows["label"], np.int64), "count": np.asarray(rows["count"], np.int64),
                **{name: np.stack(rows[name]) for name in SUM_COLUMNS[2:]}}


def actor_resources(actors: int) -> dict:
    """``map_batches`` resource arguments for a pool of ``actors``: one GPU (and CPU) per actor when the cluster
    has GPUs (at most as many actors as GPUs), else ``min(1, (CPUs - 1) / actors)`` CPUs each (>= 0.25) so
    that Ray Data's read tasks keep a CPU."""
    import ray

    if actors < 1:
        raise ValueError(f"actors must be >= 1, got {actors}")
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus > 0:
        return {"size": min(actors, gpus), "num_cpus": 1.0, "num_gpus": 1.0}
    cpus = float(resources.get("CPU", 1.0))
    return {"size": actors, "num_cpus": max(0.25, min(1.0, (cpus - 1.0) / actors)), "num_gpus": None}


def map_with_actors(ds, cls, *, actors: int, batch_size: int, changes_rows: bool = False, **constructor_kwargs):
    """``ds.map_batches(cls, ...)`` on a fixed pool of ``actors`` (see :func:`actor_resources`)."""
    import ray

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    res = actor_resources(actors)
    gpu = {"num_gpus": res["num_gpus"]} if res["num_gpus"] else {}
    return ds.map_batches(
        cls, fn_constructor_kwargs=constructor_kwargs, batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=res["size"]), num_cpus=res["num_cpus"],
        udf_modifying_row_count=changes_rows, **gpu,
    )
