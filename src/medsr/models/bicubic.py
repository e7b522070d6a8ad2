"""Interpolation as a model: the baseline every SR network has to beat, behind the same interface as the networks.

Bicubic in 2D (PyTorch's Keys kernel, a = -0.75) and trilinear in 3D (PyTorch has no tricubic), both with the
voxel-centre convention of :func:`medsr.models.blocks.interpolate`. It has no parameters, so training it is
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
        mode: 'nearest', 'linear' or 'cubic' (2D only); ``None`` picks 'cubic' in 2D and 'linear' in 3D.
    """

    def __init__(
        self, spatial_dims: int, scale: Sequence[int], *, in_channels: int = 1, mode: str | None = None
    ) -> None:
        super().__init__()
        self.scale = check_scale(spatial_dims, scale)
        self.in_channels = in_channels
        self.mode = mode if mode is not None else ("cubic" if spatial_dims == 2 else "linear")
        if self.mode not in ("nearest", "linear", "cubic") or (self.mode == "cubic" and spatial_dims == 3):
            raise ValueError(f"mode must be 'nearest', 'linear' or (2D only) 'cubic', got {mode!r} in {spatial_dims}D")

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        """(N, C, *spatial) -> (N, C, *(spatial * scale))."""
        if lr.ndim != 2 + len(self.scale) or lr.shape[1] != self.in_channels:
            raise ValueError(
                f"expected (N, {self.in_channels}, *spatial) with {len(self.scale)} spatial axes, got {tuple(lr.shape)}"
            )
        return interpolate(lr, self.scale, self.mode)


@register_model
def bicubic(spatial_dims: int = 2, scale: Sequence[int] = (2, 2), **kwargs) -> Interpolation:
    """Bicubic in 2D, trilinear in 3D: the interpolation baseline. No parameters; do not train it."""
    return Interpolation(spatial_dims, scale, **kwargs)
