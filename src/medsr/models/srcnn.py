"""SRCNN: Dong et al., "Image Super-Resolution Using Deep Convolutional Networks", TPAMI 2016 (ECCV 2014).

The LR input is first interpolated to the output size (bicubic in 2D, trilinear in 3D: PyTorch has no tricubic), then
three convolutions do patch extraction, non-linear mapping and reconstruction; the 9-5-5 kernels with 64-32 filters
are the paper's best setting. Convolutions are zero-padded to keep the size (the paper trained on valid convolutions
and cropped the target instead). Optionally (``residual=True``, not the paper's form) the interpolated input is added
back, as in VDSR (Kim et al. 2016): the network then learns only the missing detail, which converges faster.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medsr.models.bicubic import Interpolation
from medsr.models.blocks import conv
from medsr.models.registry import register_model


class SRCNN(nn.Module):
    """Interpolate, then conv-ReLU, conv-ReLU, conv.

    Args:
        spatial_dims: 2 or 3.
        scale: Integer upsampling factor per spatial axis, e.g. (2, 2) or (1, 1, 4).
        in_channels: Image channels (1 for grey scans).
        channels: Filters of the first two layers (n1, n2).
        kernel_sizes: Kernel size of the three layers (f1, f2, f3), odd.
        residual: Add the interpolated input to the output (VDSR-style global residual; the paper does not).
    """

    def __init__(
        self,
        spatial_dims: int,
        scale: Sequence[int],
        *,
        in_channels: int = 1,
        channels: Sequence[int] = (64, 32),
        kernel_sizes: Sequence[int] = (9, 5, 5),
        residual: bool = False,
    ) -> None:
        super().__init__()
        n1, n2 = channels
        f1, f2, f3 = kernel_sizes
        if min(f1, f2, f3) < 1 or not f1 % 2 == f2 % 2 == f3 % 2 == 1:
            raise ValueError(f"kernel_sizes must be three odd integers (size-preserving padding), got {kernel_sizes}")
        self.upsample = Interpolation(spatial_dims, scale, in_channels=in_channels)
        self.scale = self.upsample.scale
        self.residual = residual
        self.body = nn.Sequential(
            conv(spatial_dims, in_channels, n1, f1),
            nn.ReLU(inplace=True),
            conv(spatial_dims, n1, n2, f2),
            nn.ReLU(inplace=True),
            conv(spatial_dims, n2, in_channels, f3),
        )

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        """(N, C, *spatial) -> (N, C, *(spatial * scale))."""
        upsampled = self.upsample(lr)  # (N, C, *(spatial * scale))
        sr = self.body(upsampled)
        return sr + upsampled if self.residual else sr


@register_model
def srcnn(spatial_dims: int = 2, scale: Sequence[int] = (2, 2), **kwargs) -> SRCNN:
    """The paper's 9-5-5 network with 64-32 filters."""
    return SRCNN(spatial_dims, scale, **{"channels": (64, 32), "kernel_sizes": (9, 5, 5), **kwargs})


@register_model
def srcnn_tiny(spatial_dims: int = 2, scale: Sequence[int] = (2, 2), **kwargs) -> SRCNN:
    """5-3-3 kernels with 16-8 filters: for tests and smoke runs."""
    return SRCNN(spatial_dims, scale, **{"channels": (16, 8), "kernel_sizes": (5, 3, 3), **kwargs})
