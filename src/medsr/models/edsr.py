"""EDSR: Lim et al., "Enhanced Deep Residual Networks for Single Image Super-Resolution", CVPRW 2017.

2D or 3D, with a per-axis scale. One addition to the paper: the output is added to an interpolated copy of the
input (global residual learning, as in VDSR, Kim et al. 2016), so the network only learns the missing detail;
that makes short CPU training converge far faster and leaves the low frequencies to the interpolator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medsr.models.blocks import ResidualBlock, Upsample, check_scale, conv, interpolate
from medsr.models.registry import register_model


class EDSR(nn.Module):
    """Head conv, residual body, sub-pixel upsampling, tail conv; plus an interpolated skip.

    Args:
        spatial_dims: 2 or 3.
        scale: Integer upsampling factor per spatial axis, e.g. (2, 2) or (1, 1, 4).
        in_channels: Image channels (1 for grey scans).
        channels: Feature channels.
        num_blocks: Residual blocks in the body.
        res_scale: Residual scaling inside blocks (0.1 for wide models, as in the paper).
        skip: Interpolation for the global skip ('linear', 'cubic', or 'none' for the paper's EDSR).
    """

    def __init__(
        self,
        spatial_dims: int,
        scale: Sequence[int],
        *,
        in_channels: int = 1,
        channels: int = 64,
        num_blocks: int = 16,
        res_scale: float = 1.0,
        skip: str = "cubic",
    ) -> None:
        super().__init__()
        self.scale = check_scale(spatial_dims, scale)
        self.skip = skip if not (skip == "cubic" and spatial_dims == 3) else "linear"  # no tricubic in torch
        self.head = conv(spatial_dims, in_channels, channels)
        self.body = nn.Sequential(*[ResidualBlock(spatial_dims, channels, res_scale) for _ in range(num_blocks)])
        self.body_end = conv(spatial_dims, channels, channels)
        self.upsample = Upsample(spatial_dims, channels, self.scale)
        self.tail = conv(spatial_dims, channels, in_channels)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        """(N, C, *spatial) -> (N, C, *(spatial * scale))."""
        features = self.head(lr)  # (N, F, *spatial)
        features = features + self.body_end(self.body(features))
        sr = self.tail(self.upsample(features))  # (N, C, *(spatial * scale))
        if self.skip != "none":
            sr = sr + interpolate(lr, self.scale, self.skip)
        return sr


@register_model
def edsr_baseline(spatial_dims: int = 2, scale: Sequence[int] = (2, 2), **kwargs) -> EDSR:
    """The paper's baseline: 16 blocks of 64 channels."""
    return EDSR(spatial_dims, scale, **{"channels": 64, "num_blocks": 16, **kwargs})


@register_model
def edsr_small(spatial_dims: int = 2, scale: Sequence[int] = (2, 2), **kwargs) -> EDSR:
    """8 blocks of 32 channels: trains on a CPU in tens of minutes; the shipped default models use it."""
    return EDSR(spatial_dims, scale, **{"channels": 32, "num_blocks": 8, **kwargs})


@register_model
def edsr_tiny(spatial_dims: int = 2, scale: Sequence[int] = (2, 2), **kwargs) -> EDSR:
    """2 blocks of 8 channels: for tests and smoke runs."""
    return EDSR(spatial_dims, scale, **{"channels": 8, "num_blocks": 2, **kwargs})
