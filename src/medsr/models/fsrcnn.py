"""FSRCNN: Dong et al., "Accelerating the Super-Resolution Convolutional Neural Network", ECCV 2016.

Works on the LR grid and upsamples only at the end with a learned transposed convolution (the paper's
"deconvolution"): feature extraction (5, d), shrinking (1, s), m mapping layers (3, s), expanding (1, d), each
followed by a channel-wise PReLU, then a kernel-9 transposed convolution with stride = scale per axis.

Transposed-convolution geometry, per axis with LR length ``n``, stride ``r``, kernel ``k = 9``, padding ``p`` and
output padding ``q``: the output length is ``(n - 1) r - 2p + (k - 1) + q + 1``, which equals ``n r`` exactly when
``2p - q = k - r``. PyTorch needs ``0 <= q < r`` (``q = 0`` when ``r = 1``) and ``p >= 0``. LR voxel ``i`` is spread
over output ``i r - p + [0, k)``, centred at ``i r - p + (k - 1) / 2``; on the voxel-centre grid its HR footprint
``[i r, (i + 1) r)`` is centred at ``i r + (r - 1) / 2``, so the centres agree for ``p = (k - r) / 2``. Hence
``p = max(0, ceil((k - r) / 2))`` and ``q = 2p - (k - r)``: exactly centred (``q = 0``) for odd ``r <= 9``, half an HR
voxel early for even ``r`` (an odd kernel cannot do better; the learned weights absorb it), and ``q = r - 9`` once
``r > 9``. For r = 1, 2, 3, 4: (p, q) = (4, 0), (4, 1), (3, 0), (3, 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from medsr.models.blocks import check_scale, conv
from medsr.models.registry import register_model


def deconv_padding(kernel_size: int, stride: int) -> tuple[int, int]:
    """``(padding, output_padding)`` that make a transposed convolution output exactly ``n * stride`` (derivation
    in the module docstring)."""
    padding = max(0, math.ceil((kernel_size - stride) / 2))
    return padding, 2 * padding - (kernel_size - stride)


class FSRCNN(nn.Module):
    """Conv-PReLU layers on the LR grid, then a transposed convolution to the HR grid.

    Args:
        spatial_dims: 2 or 3.
        scale: Integer upsampling factor per spatial axis, e.g. (2, 2) or (1, 1, 4).
        in_channels: Image channels (1 for grey scans).
        d: Feature (LR) dimension.
        s: Shrunk dimension of the mapping layers.
        m: Number of mapping layers.
        deconv_kernel: Kernel size of the transposed convolution (9 in the paper).
    """

    def __init__(
        self,
        spatial_dims: int,
        scale: Sequence[int],
        *,
        in_channels: int = 1,
        d: int = 56,
        s: int = 12,
        m: int = 4,
        deconv_kernel: int = 9,
    ) -> None:
        super().__init__()
        self.scale = check_scale(spatial_dims, scale)
        layers = [conv(spatial_dims, in_channels, d, 5), nn.PReLU(d), conv(spatial_dims, d, s, 1), nn.PReLU(s)]
        for _ in range(m):
            layers += [conv(spatial_dims, s, s, 3), nn.PReLU(s)]
        layers += [conv(spatial_dims, s, d, 1), nn.PReLU(d)]
        self.body = nn.Sequential(*layers)
        padding, output_padding = zip(*(deconv_padding(deconv_kernel, r) for r in self.scale), strict=True)
        deconv_type = nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d
        self.deconv = deconv_type(
            d, in_channels, deconv_kernel, stride=self.scale, padding=padding, output_padding=output_padding
        )

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        """(N, C, *spatial) -> (N, C, *(spatial * scale))."""
        features = self.body(lr)  # (N, d, *spatial)
        return self.deconv(features)  # (N, C, *(spatial * scale))


@register_model
def fsrcnn(spatial_dims: int = 2, scale: Sequence[int] = (2, 2), **kwargs) -> FSRCNN:
    """The paper's FSRCNN(56, 12, 4)."""
    return FSRCNN(spatial_dims, scale, **{"d": 56, "s": 12, "m": 4, **kwargs})


@register_model
def fsrcnn_tiny(spatial_dims: int = 2, scale: Sequence[int] = (2, 2), **kwargs) -> FSRCNN:
    """FSRCNN(16, 8, 1): for tests and smoke runs."""
    return FSRCNN(spatial_dims, scale, **{"d": 16, "s": 8, "m": 1, **kwargs})
