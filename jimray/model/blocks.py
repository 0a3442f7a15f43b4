"""Building blocks of the Jim-Net feature extractor and regressors (pure torch).

Volumes enter as ``(b, 1, d, h, w)``; every block is batch-first and keeps ``(b, c, d, h, w)`` layout.
GroupNorm (not BatchNorm) keeps each sample independent of the rest of its batch, in training and eval.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from jimray.fourier.spectral import spectral_pool


def _groups(channels: int) -> int:
    return math.gcd(channels, 4)


class ConvBlock(nn.Module):
    """``Conv3d -> GroupNorm -> ReLU``; ``padding = dilation * (kernel // 2)`` keeps the size at stride 1."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1, dilation: int = 1):
        super().__init__()
        pad = dilation * (kernel // 2)
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=pad, dilation=dilation)
        self.norm = nn.GroupNorm(_groups(out_channels), out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class SpectralPool(nn.Module):
    """Module form of :func:`jimray.fourier.spectral.spectral_pool` to a fixed edge ``size``."""

    def __init__(self, size: int):
        super().__init__()
        self.size = int(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return spectral_pool(x, self.size)


class DilatedStack(nn.Module):
    """Stacked dilated 3x3x3 conv blocks with residual connections: a large receptive field at low cost."""

    def __init__(self, channels: int, dilations: list[int]):
        super().__init__()
        self.blocks = nn.ModuleList(ConvBlock(channels, channels, 3, dilation=d) for d in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


def level_sizes(box_size: int, feature_size: int, levels: int) -> list[int]:
    """Grid edge of each extractor level: geometric from ``box_size`` down to ``feature_size`` (32, 16, 8)."""
    final = min(feature_size, box_size)
    if levels == 1:
        return [final]
    ratio = box_size / final
    return [max(final, round(final * ratio ** ((levels - 1 - i) / (levels - 1)))) for i in range(levels)]


class FeatureExtractor(nn.Module):
    """Siamese 3D feature extractor: one conv block per level, spectral pooling between levels, a dilated
    stack on the last level. ``(b, d, h, w)`` volumes -> ``(b, channels[-1], f, f, f)``, ``f = feature_size``
    for any box edge ``>= f`` (the correlation layers then have a fixed size).

    With ``return_statistics=True`` it also returns the mean and standard deviation over the grid of every
    level's activations, ``(b, statistics_dim)``: a summary that does not depend on where the particle sits in
    the box, and depends little on its orientation, for the clustering embedding."""

    def __init__(self, channels: list[int], dilations: list[int], feature_size: int):
        super().__init__()
        ins = [1, *channels[:-1]]
        self.levels = nn.ModuleList(ConvBlock(i, o) for i, o in zip(ins, channels, strict=True))
        self.dilated = DilatedStack(channels[-1], dilations)
        self.feature_size = int(feature_size)
        self.out_channels = channels[-1]
        self.statistics_dim = 2 * (sum(channels) + channels[-1])

    def forward(self, volumes: torch.Tensor, return_statistics: bool = False):
        d, h, w = volumes.shape[-3:]
        if not d == h == w:
            raise ValueError(f"Jim-Net needs cubic boxes, got (d, h, w) = {(d, h, w)}")
        sizes = level_sizes(d, self.feature_size, len(self.levels))
        x = volumes.unsqueeze(1)
        stats = []
        for size, block in zip(sizes, self.levels, strict=True):
            x = block(spectral_pool(x, size))
            stats.append(x)
        x = self.dilated(x)
        if not return_statistics:
            return x
        dims = (-3, -2, -1)
        pooled = [torch.cat([a.mean(dim=dims), a.std(dim=dims)], dim=1) for a in [*stats, x]]
        return x, torch.cat(pooled, dim=1)


class PoseRegressor(nn.Module):
    """One stage's regressor: correlation map ``(b, k, f, f, f)`` -> stage feature ``(b, feature_dim)`` and raw
    pose parameters ``(b, n_rotation + 3)``. The last layer starts tiny so every stage starts near identity."""

    def __init__(self, in_channels: int, hidden: int, feature_size: int, feature_dim: int, n_params: int):
        super().__init__()
        self.reduce = ConvBlock(in_channels, hidden, kernel=1)
        self.down = ConvBlock(hidden, hidden, kernel=3, stride=2)
        edge = (feature_size - 1) // 2 + 1
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(hidden * edge**3, feature_dim), nn.ReLU(inplace=True))
        self.pose = nn.Linear(feature_dim, n_params)
        with torch.no_grad():
            self.pose.weight.mul_(1e-2)
            self.pose.bias.zero_()

    def forward(self, correlation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature = self.fc(self.down(self.reduce(correlation)))
        return feature, self.pose(feature)
