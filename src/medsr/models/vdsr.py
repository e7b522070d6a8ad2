"""VDSR: Kim et al., "Accurate Image Super-Resolution Using Very Deep Convolutional Networks", CVPR 2016.

The LR input is interpolated to the output size (bicubic in 2D, trilinear in 3D: PyTorch has no tricubic); a plain
stack of ``depth`` 3x3 convolutions (ReLU between them) predicts the residual, which is added to the interpolated
image. Weights use He et al. (2015) initialisation as in the paper; PyTorch's default shrinks the signal at every
layer, so a 20-layer stack would start as a near-zero residual with vanishing gradients. The paper's high learning
rate with gradient clipping belongs to training, not to the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medsr.models.bicubic import Interpolation
from medsr.models.blocks import conv
from medsr.models.registry import register_model


class VDSR(nn.Module):
    """Interpolate, then ``depth`` convolutions (ReLU after all but the last), plus the interpolated image.

    Args:
        spatial_dims: 2 or 3.
        scale: Integer upsampling factor per spatial axis, e.g. (2, 2) or (1, 1, 4).
        in_channels: Image channels (1 for grey scans).
        channels: Feature channels of the hidden layers.
        depth: Number of convolution layers, including the first and the last (20 in the paper).
    """

    def __init__(
        self, spatial_dims: int, scale: Sequence[int], *, in_channels: int = 1, channels: int = 64, depth: int = 20
    ) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth must be >= 2 (first and last convolution), got {depth}")
        self.upsample = Interpolation(spatial_dims, scale, in_channels=in_channels)
        self.scale = self.upsample.scale
        layers = [conv(spatial_dims, in_channels, channels), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [conv(spatial_dims, channels, channels), nn.ReLU(inplace=True)]
        layers.append(conv(spatial_dims, channels, in_channels))
        self.body = nn.Sequential(*layers)
        for module in self.body:
            if isinstance(module, nn.Conv2d | nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        """(N, C, *spatial) -> (N, C, *(spatial * scale))."""
        upsampled = self.upsample(lr)  # (N, C, *(spatial * scale))
        return upsampled + self.body(upsampled)


@register_model
def vdsr(spatial_dims: int = 2, scale: Sequence[int] = (2, 2), **kwargs) -> VDSR:
    """The paper's network: 20 layers of 64 channels."""
    return VDSR(spatial_dims, scale, **{"channels": 64, "depth": 20, **kwargs})


@register_model
def vdsr_tiny(spatial_dims: int = 2, scale: Sequence[int] = (2, 2), **kwargs) -> VDSR:
    """4 layers of 16 channels: for tests and smoke runs."""
    return VDSR(spatial_dims, scale, **{"channels": 16, "depth": 4, **kwargs})
