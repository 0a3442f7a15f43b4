"""A trained run directory, loaded once: config, Jim-Net, GMM and PCA (orchestration layer, no Ray needed).

``RUN_DIR`` is what ``jimray train`` writes (see :mod:`jimray.train.driver`): ``config.yaml`` (the resolved
job) and ``model/`` (the last round's checkpoint, :mod:`jimray.train.state`). :func:`load_trained_run`
rebuilds everything inference needs; :meth:`TrainedRun.payload` / :meth:`TrainedRun.from_payload` move it to
Ray actors as plain tensors (``ray.put`` once, loaded once per actor).

The two inference maths used by ``jimray predict``:

* :meth:`TrainedRun.cluster_probabilities`: the last round's embedding -> PCA -> ``gmm.predict_proba``, the
  same path as that round's clustering step (:attr:`TrainedRun.rule` names it): for a common-frame run the
  aligned scores against the references stored with the round (:class:`jimray.train.frame_step.FrameRound`),
  so prediction on the training data gives the final round's labels; for a network-embedding run
  ``model.embed(x)`` (the weights are those after the round's training, the mixture is from before it);
* :meth:`TrainedRun.particle_poses`: Jim-Net ``G(particle, reference)`` gives ``(R, t)`` with
  ``reference ~ transform(particle, R, t)``; the returned pose is its inverse, RELION's "reference rotated
  into the particle": ``particle ~ transform(reference, R', t')`` (:func:`jimray.conventions.invert_pose`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from jimray.cluster.gmm import GaussianMixture
from jimray.cluster.pca import PCAState
from jimray.config import ConfigError, JobConfig, load_job
from jimray.conventions import invert_pose
from jimray.errors import JimrayError
from jimray.model.jimnet import JimNet
from jimray.run_files import MODEL_DIR, RUN_CONFIG, STATE_FILE
from jimray.train.frame_step import FrameRound

__all__ = ["RunError", "TrainedRun", "load_trained_run"]


class RunError(JimrayError):
    """A run directory that cannot be used for prediction; the message names the path and the fix."""


@dataclass
class TrainedRun:
    """A trained model ready for inference: job ``config``, ``model`` (eval mode), fitted ``gmm`` and ``pca``
    (``None`` = the GMM works on the raw embeddings), on ``device``."""

    config: JobConfig
    model: JimNet
    gmm: GaussianMixture
    pca: PCAState | None
    run_dir: Path | None = None
    frame: FrameRound | None = None

    @property
    def rule(self) -> str:
        """How clusters are predicted, in words (recorded in predict.json)."""
        if self.frame is not None:
            return (f"common frame: aligned scores against the final round's {self.frame.references.shape[0]} "
                    "references -> PCA -> GMM of that round")
        return "network: Jim-Net F(x, x) -> PCA -> GMM of the final round"

    @property
    def n_clusters(self) -> int:
        return int(self.gmm.n_components)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def payload(self) -> dict:
        """Plain CPU tensors and dicts (for ``ray.put``); :meth:`from_payload` rebuilds the run."""
        return {
            "config": self.config.model_dump(mode="json"),
            "n_clusters": self.model.n_clusters,
            "model_state": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "gmm_state": self.gmm.get_state(),
            "pca_state": None if self.pca is None else self.pca.get_state(),
            "frame_state": None if self.frame is None else self.frame.get_state(),
        }

    @classmethod
    def from_payload(cls, payload: dict, device: torch.device | str | None = None) -> TrainedRun:
        """Rebuild from :meth:`payload` (or the same keys of a round checkpoint) on ``device`` (default CPU)."""
        config = JobConfig.model_validate(payload["config"])
        return _build(config, payload["n_clusters"], payload["model_state"], payload["gmm_state"],
                      payload["pca_state"], device, None, payload.get("frame_state"))

    def cluster_probabilities(self, volumes: torch.Tensor, tilt_range_degrees=None) -> torch.Tensor:
        """Posterior of each cluster ``(b, K)`` (float64) for volumes ``(b, d, h, w)`` (normalised like training)
        with tilt ranges (a number or ``(b,)``, degrees; default the job's ``data.tilt_range_degrees``)."""
        _check_volumes(volumes, "volumes")
        with torch.no_grad():
            if self.frame is not None:
                tilts = self.config.data.tilt_range_degrees if tilt_range_degrees is None else tilt_range_degrees
                # np.array copies: the tilts of a Ray batch are read-only arrays (torch warns on those).
                tilts = torch.from_numpy(np.array(tilts, dtype=np.float32)).reshape(-1).expand(volumes.shape[0])
                embeddings = self.frame.embed(volumes.cpu().float(), tilts.contiguous())
            else:
                embeddings = self.model.embed(volumes.to(self.device, torch.float32)).double()
            z = embeddings if self.pca is None else self.pca.transform(embeddings)
            return self.gmm.predict_proba(z)

    def particle_poses(self, particles: torch.Tensor, references: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pose of each particle relative to its reference, both ``(b, d, h, w)``: ``(R (b, 3, 3), t (b, 3))``
        with ``particle ~ transform_volumes(reference, R, t)`` (RELION sense; shifts in voxels, x y z)."""
        _check_volumes(particles, "particles")
        if references.shape != particles.shape:
            raise ValueError(f"references must match particles {tuple(particles.shape)}, got {tuple(references.shape)}")
        with torch.no_grad():
            out = self.model(particles.to(self.device, torch.float32), references.to(self.device, torch.float32))
        return invert_pose(out.rotations[-1], out.shifts[-1])


def _check_volumes(volumes: torch.Tensor, name: str) -> None:
    if volumes.ndim != 4 or volumes.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (b, d, h, w) batch, got shape {tuple(volumes.shape)}")


def _build(config: JobConfig, n_clusters: int, model_state: dict, gmm_state: dict | None, pca_state: dict | None,
           device, run_dir: Path | None, frame_state: dict | None = None) -> TrainedRun:
    if not gmm_state or "means" not in gmm_state:
        where = run_dir / MODEL_DIR if run_dir is not None else "the checkpoint"
        raise RunError(f"{where}: the checkpoint holds no fitted GMM; train at least one full round "
                       "(`jimray train JOB.yaml`) before predicting")
    model = JimNet(config.model, int(n_clusters))
    model.load_state_dict(model_state)
    model.to(device or "cpu").eval()
    gmm = GaussianMixture.from_state(gmm_state, device=device)
    pca = PCAState.from_state(pca_state) if pca_state else None
    frame = FrameRound.from_state(frame_state) if frame_state else None
    return TrainedRun(config=config, model=model, gmm=gmm, pca=pca, run_dir=run_dir, frame=frame)


def load_trained_run(run_dir: str | Path, device: torch.device | str | None = None) -> TrainedRun:
    """Load ``RUN_DIR/config.yaml`` and ``RUN_DIR/model`` (the last round's checkpoint) for inference.

    Raises :class:`RunError` (one line naming the path and the fix) when the folder, its model or its config
    is missing or unusable.
    """
    from jimray.train.state import load_round_state

    run = Path(run_dir)
    if not run.is_dir():
        raise RunError(f"{run}: run directory not found; pass the output.dir of a `jimray train` run")
    model_dir = run / MODEL_DIR
    if not (model_dir / STATE_FILE).is_file():
        raise RunError(f"{model_dir / STATE_FILE}: no trained model in this run directory; run `jimray train` "
                       "until it finishes a round (it writes RUN_DIR/model)")
    try:
        state = load_round_state(model_dir)
    except Exception as exc:  # a truncated or foreign file: say which one
        raise RunError(f"{model_dir / STATE_FILE}: unreadable checkpoint ({exc}); re-run `jimray train`") from None
    config = _load_config(run, state.config)
    try:
        return _build(config, state.n_clusters, state.model_state, state.gmm_state, state.pca_state, device, run,
                      state.frame_state)
    except RuntimeError as exc:  # load_state_dict: the config does not describe the saved network
        raise RunError(f"{model_dir / STATE_FILE}: the weights do not match the model in {run / RUN_CONFIG} "
                       f"({str(exc).splitlines()[0]}); restore the run's original config.yaml") from None


def _load_config(run: Path, checkpoint_config: dict | None) -> JobConfig:
    path = run / RUN_CONFIG
    if path.is_file():
        try:
            return load_job(path)
        except ConfigError as exc:
            raise RunError(f"{path}: {exc}") from None
    if checkpoint_config is not None:
        return JobConfig.model_validate(checkpoint_config)
    raise RunError(f"{path}: missing, and the checkpoint holds no config; copy the job's config.yaml into {run}")
