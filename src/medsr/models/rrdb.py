"""RRDBNet, the ESRGAN generator: Wang et al., "ESRGAN: Enhanced Super-Resolution Generative Adversarial
Networks", ECCV Workshops 2018.

2D or 3D, with a per-axis scale. Residual-in-residual dense blocks (RRDB) without batch norm, a trunk skip, then
upsampling by nearest-neighbour interpolation and a conv per step (no sub-pixel checkerboard). The paper's x4
is two x2 steps; a per-axis scale is split the same way by :func:`plan_upsampling`. The dense-block convs start
from MSRA init scaled by 0.1, the paper's "smaller initialization" for very deep residual networks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medsr.models.blocks import check_scale, conv, interpolate
from medsr.models.registry import register_model


def plan_upsampling(scale: Sequence[int]) -> list[tuple[int, ...]]:
    """Split a per-axis scale into upsampling steps: x2 on every axis whose remaining factor is even, else the
    whole remaining factor, until every axis is done.

    E.g. (4, 4) -> [(2, 2), (2, 2)]; (3, 1) -> [(3, 1)]; (2, 3) -> [(2, 3)]; (8, 1, 1) -> three (2, 1, 1) steps.
    The product of the steps is ``scale`` on every axis; an all-ones scale needs no step.
    """
    remaining = [int(s) for s in scale]
    if min(remaining, default=0) < 1:
        raise ValueError(f"scale must be integers >= 1, got {tuple(scale)}")
    steps = []
    while any(r > 1 for r in remaining):
        step = tuple(2 if r % 2 == 0 else r for r in remaining)  # odd factors (incl. 1) go in one step
        steps.append(step)
        remaining = [r // s for r, s in zip(remaining, step, strict=True)]
    return steps


class ResidualDenseBlock(nn.Module):
    """Five densely connected convs (each sees the input and all earlier outputs); scaled identity skip.

    Args:
        spatial_dims: 2 or 3.
        channels: Input and output channels.
        growth_channels: Channels added by each of the first four convs.
        res_scale: Residual scaling (0.2 in the paper).
    """

    def __init__(self, spatial_dims: int, channels: int, growth_channels: int, res_scale: float = 0.2) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            conv(spatial_dims, channels + i * growth_channels, growth_channels if i < 4 else channels) for i in range(5)
        )
        self.act = nn.LeakyReLU(0.2, inplace=True)
        self.res_scale = res_scale
        for layer in self.convs:
            nn.init.kaiming_normal_(layer.weight)
            layer.weight.data.mul_(0.1)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, *spatial) -> (N, C, *spatial)."""
        features = [x]
        for layer in self.convs[:-1]:
            features.append(self.act(layer(torch.cat(features, dim=1))))  # (N, C + i * G, *spatial) in
        return x + self.convs[-1](torch.cat(features, dim=1)) * self.res_scale


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks in series, with a scaled identity skip."""

    def __init__(self, spatial_dims: int, channels: int, growth_channels: int, res_scale: float = 0.2) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *[ResidualDenseBlock(spatial_dims, channels, growth_channels, res_scale) for _ in range(3)]
        )
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, *spatial) -> (N, C, *spatial)."""
        return x + self.body(x) * self.res_scale


class RRDBNet(nn.Module):
    """First conv, RRDB trunk with a skip, nearest + conv upsampling steps, HR conv, last conv.

    Args:
        spatial_dims: 2 or 3.
        scale: Integer upsampling factor per spatial axis, e.g. (4, 4) or (1, 1, 4).
        in_channels: Image channels (1 for grey scans).
        channels: Feature channels.
        num_blocks: RRDBs in the trunk.
        growth_channels: Channels added per conv inside each dense block.
        res_scale: Residual scaling inside dense blocks and RRDBs (0.2 in the paper).
    """

    def __init__(
        self,
        spatial_dims: int,
        scale: Sequence[int],
        *,
        in_channels: int = 1,
        channels: int = 64,
        num_blocks: int = 23,
        growth_channels: int = 32,
        res_scale: float = 0.2,
    ) -> None:
        super().__init__()
        self.scale = check_scale(spatial_dims, scale)
        self.steps = plan_upsampling(self.scale)
        self.head = conv(spatial_dims, in_channels, channels)
        self.body = nn.Sequential(
            *[RRDB(spatial_dims, channels, growth_channels, res_scale) for _ in range(num_blocks)]
        )
        self.body_end = conv(spatial_dims, channels, channels)
        self.upsample_convs = nn.ModuleList(conv(spatial_dims, channels, channels) for _ in self.steps)
        self.hr_conv = conv(spatial_dims, channels, channels)
        self.tail = conv(spatial_dims, channels, in_channels)
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        """(N, C, *spatial) -> (N, C, *(spatial * scale))."""
        features = self.head(lr)  # (N, F, *spatial)
        features = features + self.body_end(self.body(features))
        for step, layer in zip(self.steps, self.upsample_convs, strict=True):
            features = self.act(layer(interpolate(features, step, "nearest")))  # (N, F, *(spatial * step))
        return self.tail(self.act(self.hr_conv(features)))  # (N, C, *(spatial * scale))


@register_model
def rrdb(spatial_dims: int = 2, scale: Sequence[int] = (2, 2), **kwargs) -> RRDBNet:
    """The paper's generator: 23 RRDBs, 64 channels, growth 32 (about 16.7M parameters at x4 in 2D)."""
    return RRDBNet(spatial_dims, scale, **{"channels": 64, "num_blocks": 23, "growth_channels": 32, **kwargs})


@register_model
def rrdb_small(spatial_dims: int = 2, scale: Sequence[int] = (2, 2), **kwargs) -> RRDBNet:
    """4 RRDBs, 32 channels, growth 16: trainable on a CPU."""
    return RRDBNet(spatial_dims, scale, **{"channels": 32, "num_blocks": 4, "growth_channels": 16, **kwargs})


@register_model
def rrdb_tiny(spatial_dims: int = 2, scale: Sequence[int] = (2, 2), **kwargs) -> RRDBNet:
    """1 RRDB, 8 channels, growth 4: for tests and smoke runs."""
    return RRDBNet(spatial_dims, scale, **{"channels": 8, "num_blocks": 1, "growth_channels": 4, **kwargs})
