"""ESPCN: Shi et al., "Real-Time Single Image and Video Super-Resolution Using an Efficient Sub-Pixel Convolutional
Neural Network", CVPR 2016.

Three convolutions on the LR grid (5x5 64, 3x3 32, 3x3 to C * prod(scale)), then a sub-pixel shuffle per axis
(:func:`medsr.models.blocks.pixel_shuffle`, the N-D per-axis form of the paper's periodic shuffle). One change from
the paper: the hidden activations are ReLU rather than tanh (tanh saturates and trains slower; ReLU is what later
SR networks and common ESPCN reimplementations use), and the output layer is linear (identity), so intensities
are not squashed into (-1, 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from medsr.models.blocks import check_scale, conv, pixel_shuffle
from medsr.models.registry import register_model


class ESPCN(nn.Module):
    """conv-ReLU, conv-ReLU, conv to C * prod(scale) channels, then per-axis pixel shuffle.

    Args:
        spatial_dims: 2 or 3.
        scale: Integer upsampling factor per spatial axis, e.g. (2, 2) or (1, 1, 4).
        in_channels: Image channels (1 for grey scans).
        channels: Filters of the two hidden layers (n1, n2).
    """

    def __init__(
        self, spatial_dims: int, scale: Sequence[int], *, in_channels: int = 1, channels: Sequence[int] = (64, 32)
    ) -> None:
        super().__init__()
        self.scale = check_scale(spatial_dims, scale)
        n1, n2 = channels
        self.body = nn.Sequential(
            conv(spatial_dims, in_channels, n1, 5),
            nn.ReLU(inplace=True),
            conv(spatial_dims, n1, n2, 3),
            nn.ReLU(inplace=True),
            conv(spatial_dims, n2, in_channels * math.prod(self.scale), 3),
        )

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        """(N, C, *spatial) -> (N, C, *(spatial * scale))."""
        return pixel_shuffle(self.body(lr), self.scale)  # body: (N, C * prod(scale), *spatial)


@register_model
def espcn(spatial_dims: int = 2, scale: Sequence[int] = (2, 2), **kwargs) -> ESPCN:
    """The paper's network: 64-32 filters."""
    return ESPCN(spatial_dims, scale, **{"channels": (64, 32), **kwargs})


@register_model
def espcn_tiny(spatial_dims: int = 2, scale: Sequence[int] = (2, 2), **kwargs) -> ESPCN:
    """16-8 filters: for tests and smoke runs."""
    return ESPCN(spatial_dims, scale, **{"channels": (16, 8), **kwargs})
