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

    ``mode`` is 'nearest', 'linear' (bi/trilinear), 'cubic': PyTorch's bicubic (Keys, a = -0.75), applied
    separably in 3D (in-plane, then along k), since PyTorch has no tricubic; or 'lanczos': Lanczos-3, separable
    (:func:`lanczos_weights`). A factor of 1 leaves an axis exactly as it is in every mode, so a 3D call with scale
    (si, sj, 1) equals the 2D call on each slice.
    """
    dims = x.ndim - 2
    if dims not in (2, 3) or mode not in ("nearest", "linear", "cubic", "lanczos"):
        raise ValueError(f"no {mode!r} interpolation for {dims} spatial dims")
    if mode == "lanczos":
        for axis, factor in enumerate(scale, start=2):
            if factor != 1:
                weights = lanczos_weights(x.shape[axis], int(factor)).to(x.dtype)  # (n * factor, n)
                x = torch.movedim(torch.tensordot(weights, torch.movedim(x, axis, 0), dims=1), 0, axis)
        return x.contiguous()
    scale_factor = tuple(float(s) for s in scale)
    if mode == "nearest":
        return nn.functional.interpolate(x, scale_factor=scale_factor, mode="nearest-exact")
    if mode == "linear":
        torch_mode = "bilinear" if dims == 2 else "trilinear"
        return nn.functional.interpolate(x, scale_factor=scale_factor, mode=torch_mode, align_corners=False)
    if dims == 2:
        return nn.functional.interpolate(x, scale_factor=scale_factor, mode="bicubic", align_corners=False)
    n, c, _, _, k = x.shape
    slices = interpolate(x.permute(0, 4, 1, 2, 3).reshape(n * k, c, *x.shape[2:4]), scale[:2], "cubic")
    i, j = slices.shape[2:]
    columns = slices.reshape(n, k, c, i, j).permute(0, 3, 2, 4, 1).reshape(n * i, c, j, k)  # (N * I, C, J, K)
    columns = interpolate(columns, (1, scale[2]), "cubic")
    return columns.reshape(n, i, c, j, k * scale[2]).permute(0, 2, 1, 3, 4)


def lanczos_weights(n: int, factor: int, lobes: int = 3) -> torch.Tensor:
    """Lanczos interpolation from ``n`` samples to ``n * factor`` on the voxel-centre grid, as an (n * factor, n)
    matrix: the windowed sinc ``sinc(d) sinc(d / lobes)`` over ``2 * lobes`` taps, normalised to sum 1 (so constants
    stay constant), edges replicated. Duchon, J. Appl. Meteorol. 1979; Turkowski, Graphics Gems 1990.

    >>> w = lanczos_weights(8, 2)
    >>> tuple(w.shape), bool(torch.allclose(w.sum(1), torch.ones(16)))
    ((16, 8), True)
    """
    position = (torch.arange(n * factor, dtype=torch.float64) + 0.5) / factor - 0.5  # output centres, input units
    taps = torch.floor(position)[:, None] + torch.arange(1 - lobes, lobes + 1, dtype=torch.float64)  # (m, 2 lobes)
    distance = position[:, None] - taps
    weights = torch.sinc(distance) * torch.sinc(distance / lobes)
    weights = weights / weights.sum(1, keepdim=True)
    matrix = torch.zeros(n * factor, n, dtype=torch.float64)
    return matrix.scatter_add_(1, taps.clamp(0, n - 1).long(), weights).float()
