"""3D Jim-Net: coarse-to-fine rigid alignment branch + cluster-prediction branch on shared features.

For a pair ``(source, target)`` of ``(b, d, h, w)`` volumes (cubic boxes):

* a siamese :class:`~jimray.model.blocks.FeatureExtractor` maps each volume to a ``f^3`` feature grid;
* stage 1: global correlation of target and source features (eq. 4) -> pose ``(R_1, t_1)``;
* stage ``i >= 2``: the source is resampled *once* from the original volume with the current pose, its
  features are recomputed, a local correlation (radius ``r``, eq. 5) with the target features gives a small
  update ``(dR, dt)`` that is composed after the current pose (:func:`jimray.conventions.compose_poses`);
  resampling the original with the composed pose is the residual connection of the composition layer;
* ``F(s, t)`` = concatenation of the stages' regressor features (and, with ``pooled_statistics``, the mean and
  std over the grid of the source's extractor levels) -> cluster head ``M_CP`` -> logits.

Each stage turns its correlation map into a pose with ``config.pose_decoder``: ``"regressor"`` is the
paper's learned regressor; ``"procrustes"`` (default) fits soft correspondences read from the correlation in
closed form (:mod:`jimray.model.decoders`) and composes the regressor's output after it as a small learned
correction. Both start near the identity correction, and the regressor's features feed ``F(s, t)`` either way.

Poses follow :mod:`jimray.conventions`: ``warped_i = transform_volumes(source, R_i, t_i) ~ target``, shifts in
voxels ``(x, y, z)``; each stage's update is bounded by ``max_shift_fraction * box`` per axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from jimray.config import ModelConfig
from jimray.conventions import compose_poses
from jimray.geometry.rigid import transform_volumes
from jimray.geometry.rotation_repr import (
    IDENTITY_6D,
    IDENTITY_QUATERNION,
    quaternion_to_matrix,
    six_d_to_matrix,
)
from jimray.model.blocks import FeatureExtractor, PoseRegressor
from jimray.model.correlation import cosine_correlation, global_correlation_map, local_correlation
from jimray.model.decoders import ProcrustesDecoder, bound_shift, feature_grid_positions, local_offsets
from jimray.precision import float32_region


@dataclass
class JimNetOutput:
    """What one forward pass gives, all batch-first.

    features: ``(b, embedding_dim)`` = ``F(s, t)``; logits: ``(b, K)``; rotations: ``m`` tensors ``(b, 3, 3)``,
    cumulative pose of each stage; shifts: ``m`` tensors ``(b, 3)``, voxels ``(x, y, z)``, cumulative;
    warped: ``m`` tensors ``(b, d, h, w)``, the source resampled once with each stage's pose.
    """

    features: torch.Tensor
    logits: torch.Tensor
    rotations: list[torch.Tensor]
    shifts: list[torch.Tensor]
    warped: list[torch.Tensor]


class JimNet(nn.Module):
    """Jim-Net for 3D subtomograms. ``JimNet(config, n_clusters)``; see the module docstring."""

    def __init__(self, config: ModelConfig, n_clusters: int):
        super().__init__()
        if n_clusters < 1:
            raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
        self.config = config
        self.extractor = FeatureExtractor(list(config.channels), list(config.dilations), config.feature_size)
        rot = IDENTITY_6D if config.rotation_representation == "6d" else IDENTITY_QUATERNION
        self.register_buffer("rotation_identity", torch.tensor(rot), persistent=False)
        n_params = len(rot) + 3
        fs, r = config.feature_size, config.local_radius
        in_channels = [fs**3] + [(2 * r + 1) ** 3] * (config.stages - 1)
        self.regressors = nn.ModuleList(
            PoseRegressor(c, config.regressor_channels, fs, config.feature_dim, n_params) for c in in_channels
        )
        self.decoders = (
            nn.ModuleList(
                ProcrustesDecoder(config.channels[-1], config.decoder_temperature) for _ in range(config.stages)
            )
            if config.pose_decoder == "procrustes"
            else None
        )
        embed_dim = self.embedding_dim
        self.cluster_trunk = nn.Sequential(nn.Linear(embed_dim, config.feature_dim), nn.ReLU(inplace=True))
        self.cluster_head = nn.Linear(config.feature_dim, n_clusters)

    @property
    def embedding_dim(self) -> int:
        """Length of ``F(s, t)``: ``stages * feature_dim`` (+ the extractor's statistics when pooled)."""
        pooled = self.extractor.statistics_dim if self.config.pooled_statistics else 0
        return self.config.stages * self.config.feature_dim + pooled

    @property
    def n_clusters(self) -> int:
        return self.cluster_head.out_features

    def resize_head(self, n_clusters: int) -> None:
        """Replace the last layer of the cluster head with a fresh one of ``n_clusters`` outputs (K changes
        between rounds); everything else, the cluster trunk included, keeps its weights."""
        if n_clusters < 1:
            raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
        old = self.cluster_head
        self.cluster_head = nn.Linear(old.in_features, n_clusters).to(device=old.weight.device, dtype=old.weight.dtype)

    @float32_region  # under bf16 autocast: identity + a small raw correction needs float32
    def _decode(self, raw: torch.Tensor, box: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_rot = self.rotation_identity.numel()
        params = raw[:, :n_rot] + self.rotation_identity.to(raw.dtype)
        to_matrix = six_d_to_matrix if n_rot == 6 else quaternion_to_matrix
        shift = torch.tanh(raw[:, n_rot:]) * (self.config.max_shift_fraction * box)
        return to_matrix(params), shift

    def _stage(self, raw: torch.Tensor, box: torch.Tensor, decoded) -> tuple[torch.Tensor, torch.Tensor]:
        """A stage's pose (stage 1) or update: the regressor's output ``raw`` alone, or composed after the
        ``decoded`` pose ``(R, t)`` of the procrustes decoder, the shift then bounded per axis by
        ``max_shift_fraction * box``."""
        rotation, shift = self._decode(raw, box)
        if decoded is None:
            return rotation, shift
        rotation, shift = compose_poses(*decoded, rotation, shift)
        return rotation, bound_shift(shift, self.config.max_shift_fraction * box)

    def forward(
        self, source: torch.Tensor, target: torch.Tensor, initial: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> JimNetOutput:
        """Align ``source`` ``(b, d, h, w)`` onto ``target`` (same shape) and predict the pair's cluster.

        ``initial`` ``(R (b, 3, 3), t (b, 3))``: a starting pose (e.g. an anchor of a multi-start search); stage 1
        then sees the source resampled with it and every output pose is composed after it (the source is still
        resampled once, from the original, with each cumulative pose)."""
        if source.ndim != 4 or source.shape != target.shape:
            raise ValueError(
                f"source and target must be (b, d, h, w) of one shape, got {tuple(source.shape)} and "
                f"{tuple(target.shape)}"
            )
        d, h, w = source.shape[-3:]
        box = source.new_tensor([w, h, d])
        f, r = self.config.feature_size, self.config.local_radius
        positions = feature_grid_positions(f, d, device=source.device, dtype=source.dtype)
        offsets = local_offsets(r, d / f, device=source.device, dtype=source.dtype)
        target_features = self.extractor(target)
        start = source if initial is None else transform_volumes(source, *initial)
        source_features, source_statistics = self.extractor(start, return_statistics=True)
        cosine = cosine_correlation(target_features, source_features)
        feature, raw = self.regressors[0](global_correlation_map(cosine, (f, f, f)))
        decoded = (
            None
            if self.decoders is None
            else self.decoders[0].global_pose(cosine, source_features, target_features, positions)
        )
        rotation, shift = self._stage(raw, box, decoded)
        if initial is not None:
            rotation, shift = compose_poses(*initial, rotation, shift)
        features, rotations, shifts = [feature], [rotation], [shift]
        warped = [transform_volumes(source, rotation, shift)]
        for i in range(1, len(self.regressors)):
            warped_features = self.extractor(warped[-1])
            local = local_correlation(target_features, warped_features, r)
            feature, raw = self.regressors[i](local)
            decoded = None
            if self.decoders is not None:
                reverse = local_correlation(warped_features, target_features, r)
                decoded = self.decoders[i].local_update(
                    local, reverse, warped_features, target_features, positions, offsets, r
                )
            d_rotation, d_shift = self._stage(raw, box, decoded)
            rotation, shift = compose_poses(rotation, shift, d_rotation, d_shift)
            features.append(feature)
            rotations.append(rotation)
            shifts.append(shift)
            warped.append(transform_volumes(source, rotation, shift))
        if self.config.pooled_statistics:
            features.append(source_statistics)
        joint = torch.cat(features, dim=1)
        logits = self.cluster_head(self.cluster_trunk(joint))
        return JimNetOutput(features=joint, logits=logits, rotations=rotations, shifts=shifts, warped=warped)

    def embed(self, volumes: torch.Tensor) -> torch.Tensor:
        """Clustering embedding ``F(x, x)`` ``(b, m * feature_dim)`` of volumes ``(b, d, h, w)``."""
        return self.forward(volumes, volumes).features


def parameter_count(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
