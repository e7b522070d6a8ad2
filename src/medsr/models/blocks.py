"""N-D building blocks shared by the SR models: convolutions, residual blocks, per-axis sub-pixel upsampling."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def conv(spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Module:
    """A 'same'-padded convolution in 2D or 3D."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    conv_type = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    return conv_type(in_channels, out_channels, kernel_size, padding=kernel_size // 2)


def check_scale(spatial_dims: int, scale: Sequence[int]) -> tuple[int, ...]:
    """Validate ``spatial_dims`` (2 or 3) and return ``scale`` as one integer >= 1 per spatial axis."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    checked = tuple(int(s) for s in scale)
    if len(checked) != spatial_dims or min(checked) < 1 or checked != tuple(scale):
        raise ValueError(f"scale must be {spatial_dims} integers >= 1, got {tuple(scale)}")
    return checked


def pixel_shuffle(x: torch.Tensor, scale: Sequence[int]) -> torch.Tensor:
    """Rearrange channels into space with a separate factor per axis (Shi et al. 2016, generalised to N-D).

    Args:
        x: (N, C * prod(scale), *spatial).
        scale: Integer factor per spatial axis.

    Returns:
        (N, C, *(spatial * scale)). Equals ``F.pixel_shuffle(x, r)`` for 2D with ``scale == (r, r)``.
    """
    n, channels, *spatial = x.shape
    dims = len(spatial)
    if len(scale) != dims:
        raise ValueError(f"scale {tuple(scale)} does not match {dims} spatial axes")
    factor = math.prod(scale)
    if channels % factor:
        raise ValueError(f"{channels} channels cannot be shuffled by {tuple(scale)}")
    out_channels = channels // factor
    x = x.reshape(n, out_channels, *scale, *spatial)  # (N, C, s1.., d1..)
    # Interleave each factor after its spatial axis: (N, C, d1, s1, d2, s2, ...).
    order = [0, 1] + [axis for d in range(dims) for axis in (2 + dims + d, 2 + d)]
    x = x.permute(order)
    return x.reshape(n, out_channels, *(d * s for d, s in zip(spatial, scale, strict=True)))


class ResidualBlock(nn.Module):
    """conv-ReLU-conv with a scaled identity skip and no batch norm (EDSR, Lim et al. 2017)."""

    def __init__(self, spatial_dims: int, channels: int, res_scale: float = 1.0) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv(spatial_dims, channels, channels), nn.ReLU(inplace=True), conv(spatial_dims, channels, channels)
        )
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) * self.res_scale


class Upsample(nn.Module):
    """Sub-pixel upsampling by a per-axis integer scale: one conv to C * prod(scale) channels, then shuffle."""

    def __init__(self, spatial_dims: int, channels: int, scale: Sequence[int]) -> None:
        super().__init__()
        self.scale = check_scale(spatial_dims, scale)
        self.conv = conv(spatial_dims, channels, channels * math.prod(self.scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle(self.conv(x), self.scale)  # (N, C, *(spatial * scale))


def interpolate(x: torch.Tensor, scale: Sequence[int], mode: str) -> torch.Tensor:
    """Upsample (N, C, *spatial) by ``scale`` per axis with the voxel-centre convention (align_corners=False).

    ``mode`` is 'nearest', 'linear' or 'cubic'; 'linear' means bi/trilinear, and 'cubic' is PyTorch's bicubic
    (Keys, a = -0.75), available in 2D only.
    """
    dims = x.ndim - 2
    if mode == "nearest":
        return nn.functional.interpolate(x, scale_factor=tuple(float(s) for s in scale), mode="nearest-exact")
    torch_mode = {("linear", 2): "bilinear", ("linear", 3): "trilinear", ("cubic", 2): "bicubic"}.get((mode, dims))
    if torch_mode is None:
        raise ValueError(f"no {mode!r} interpolation for {dims} spatial dims")
    scale_factor = tuple(float(s) for s in scale)
    return nn.functional.interpolate(x, scale_factor=scale_factor, mode=torch_mode, align_corners=False)
