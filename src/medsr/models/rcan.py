"""RCAN: Zhang et al., "Image Super-Resolution Using Very Deep Residual Channel Attention Networks", ECCV 2018.

2D or 3D, with a per-axis scale. Residual-in-residual body: residual groups of residual channel attention blocks
(RCAB), each group with a short skip and the whole body with a long skip. Departures from the paper: no mean
shift (scans are not RGB photographs with known channel means), and one per-axis sub-pixel step
(``blocks.Upsample``) instead of a cascade of x2 steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medsr.models.blocks import Upsample, check_scale, conv
from medsr.models.registry import register_model


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation gate: global average pool, 1x1 conv down, ReLU, 1x1 conv up, sigmoid, rescale.

    The squeezed width is ``max(1, channels // reduction)`` so narrow test models stay valid. The squeeze conv
    starts at weight 0 and bias 1, so every squeeze unit starts active: with PyTorch's default init, the pooled
    statistics are nearly the same for every input, and a unit whose pre-activation starts negative is dead
    for every input (in the paper's 10x20-block RCAN, about 1 attention module in 16 has all its units dead
    at init, so its weights never get a gradient). The gate then starts input-independent and learns from there.
    """

    def __init__(self, spatial_dims: int, channels: int, reduction: int = 16) -> None:
        super().__init__()
        squeezed = max(1, channels // reduction)
        self.gate = nn.Sequential(
            conv(spatial_dims, channels, squeezed, kernel_size=1),
            nn.ReLU(inplace=True),
            conv(spatial_dims, squeezed, channels, kernel_size=1),
            nn.Sigmoid(),
        )
        nn.init.zeros_(self.gate[0].weight)
        nn.init.ones_(self.gate[0].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, *spatial) -> (N, C, *spatial)."""
        pooled = x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)  # (N, C, 1, ..., 1): one statistic per channel
        return x * self.gate(pooled)


class ResidualChannelAttentionBlock(nn.Module):
    """RCAB: conv-ReLU-conv, channel attention, scaled identity skip."""

    def __init__(self, spatial_dims: int, channels: int, reduction: int = 16, res_scale: float = 1.0) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv(spatial_dims, channels, channels),
            nn.ReLU(inplace=True),
            conv(spatial_dims, channels, channels),
            ChannelAttention(spatial_dims, channels, reduction),
        )
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, *spatial) -> (N, C, *spatial)."""
        return x + self.body(x) * self.res_scale


class ResidualGroup(nn.Module):
    """``num_blocks`` RCABs and a conv, wrapped in a short skip."""

    def __init__(
        self, spatial_dims: int, channels: int, num_blocks: int, reduction: int = 16, res_scale: float = 1.0
    ) -> None:
        super().__init__()
        blocks = [
            ResidualChannelAttentionBlock(spatial_dims, channels, reduction, res_scale) for _ in range(num_blocks)
        ]
        self.body = nn.Sequential(*blocks, conv(spatial_dims, channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, *spatial) -> (N, C, *spatial)."""
        return x + self.body(x)


class RCAN(nn.Module):
    """Head conv, residual groups with a long skip, sub-pixel upsampling, tail conv.

    Args:
        spatial_dims: 2 or 3.
        scale: Integer upsampling factor per spatial axis, e.g. (2, 2) or (1, 1, 4).
        in_channels: Image channels (1 for grey scans).
        channels: Feature channels.
        num_groups: Residual groups in the body.
        num_blocks: RCABs per residual group.
        reduction: Channel-attention squeeze ratio (16 in the paper).
        res_scale: Residual scaling inside RCABs (1 in the paper).
    """

    def __init__(
        self,
        spatial_dims: int,
        scale: Sequence[int],
        *,
        in_channels: int = 1,
        channels: int = 64,
        num_groups: int = 10,
        num_blocks: int = 20,
        reduction: int = 16,
        res_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.scale = check_scale(spatial_dims, scale)
        self.head = conv(spatial_dims, in_channels, channels)
        groups = [ResidualGroup(spatial_dims, channels, num_blocks, reduction, res_scale) for _ in range(num_groups)]
        self.body = nn.Sequential(*groups, conv(spatial_dims, channels, channels))
        self.upsample = Upsample(spatial_dims, channels, self.scale)
        self.tail = conv(spatial_dims, channels, in_channels)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        """(N, C, *spatial) -> (N, C, *(spatial * scale))."""
        features = self.head(lr)  # (N, F, *spatial)
        features = features + self.body(features)  # long skip: the body learns the residual
        return self.tail(self.upsample(features))  # (N, C, *(spatial * scale))


@register_model
def rcan(spatial_dims: int = 2, scale: Sequence[int] = (2, 2), **kwargs) -> RCAN:
    """The paper's RCAN: 10 groups of 20 RCABs, 64 channels, reduction 16 (about 15.4M parameters at x2 in 2D)."""
    return RCAN(spatial_dims, scale, **{"channels": 64, "num_groups": 10, "num_blocks": 20, **kwargs})


@register_model
def rcan_small(spatial_dims: int = 2, scale: Sequence[int] = (2, 2), **kwargs) -> RCAN:
    """3 groups of 4 RCABs, 32 channels, reduction 8: 28 body convs, about 1.6x ``edsr_small``'s 17."""
    return RCAN(spatial_dims, scale, **{"channels": 32, "num_groups": 3, "num_blocks": 4, "reduction": 8, **kwargs})


@register_model
def rcan_tiny(spatial_dims: int = 2, scale: Sequence[int] = (2, 2), **kwargs) -> RCAN:
    """1 group of 1 RCAB, 8 channels, reduction 4: for tests and smoke runs."""
    return RCAN(spatial_dims, scale, **{"channels": 8, "num_groups": 1, "num_blocks": 1, "reduction": 4, **kwargs})
