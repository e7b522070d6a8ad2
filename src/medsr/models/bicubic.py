"""Interpolation as a model: the baseline every SR network has to beat, behind the same interface as the networks.

Bicubic in 2D and separable tricubic in 3D (PyTorch's Keys kernel, a = -0.75), with the voxel-centre convention
of :func:`medsr.models.blocks.interpolate`. It has no parameters, so training it is
meaningless: there is nothing to optimise, and ``train.py`` is to refuse models without parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medsr.models.blocks import check_scale, interpolate
from medsr.models.registry import register_model


class Interpolation(nn.Module):
    """Fixed upsampling by a per-axis integer scale; no learned weights.

    Args:
        spatial_dims: 2 or 3.
        scale: Integer upsampling factor per spatial axis, e.g. (2, 2) or (1, 1, 4).
        in_channels: Image channels; checked against the input, since the interpolation itself works on any number.
        mode: 'nearest', 'linear' or 'cubic' (the default).
    """

    def __init__(self, spatial_dims: int, scale: Sequence[int], *, in_channels: int = 1, mode: str = "cubic") -> None:
        super().__init__()
        self.scale = check_scale(spatial_dims, scale)
        self.in_channels = in_channels
        if mode not in ("nearest", "linear", "cubic"):
            raise ValueError(f"mode must be 'nearest', 'linear' or 'cubic', got {mode!r}")
        self.mode = mode

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        """(N, C, *spatial) -> (N, C, *(spatial * scale))."""
        if lr.ndim != 2 + len(self.scale) or lr.shape[1] != self.in_channels:
            raise ValueError(
                f"expected (N, {self.in_channels}, *spatial) with {len(self.scale)} spatial axes, got {tuple(lr.shape)}"
            )
        return interpolate(lr, self.scale, self.mode)


@register_model
def bicubic(spatial_dims: int = 2, scale: Sequence[int] = (2, 2), **kwargs) -> Interpolation:
    """Bicubic in 2D, tricubic in 3D: the interpolation baseline. No parameters; do not train it."""
    return Interpolation(spatial_dims, scale, **kwargs)
