"""GAN discriminators for (N, C, *spatial) images, 2D or 3D; they return logits (real > 0, fake < 0).

- ``vgg``: the SRGAN/ESRGAN discriminator (Ledig et al., CVPR 2017; Wang et al., ECCVW 2018): strided conv stages
  that double the channels, then global average pooling and a linear layer, one logit per image. Pooling instead
  of SRGAN's fixed dense layer makes it take any patch size.
- ``patchgan``: Isola et al., "Image-to-Image Translation with Conditional Adversarial Networks", CVPR 2017: a
  fully convolutional net with one logit per receptive field (a 70 x 70 patch for three stages in 2D).
- ``unet``: the U-Net discriminator with spectral normalisation of Real-ESRGAN (Wang et al., ICCVW 2021; after
  Schonfeld et al., CVPR 2020): one logit per voxel, so it judges local texture and global structure together.

Spectral normalisation (Miyato et al., ICLR 2018) bounds each layer's Lipschitz constant; it is optional for the
first two (``spectral_norm=True``) and always on for the U-Net. No batch norm anywhere: GAN batches on a CPU
are small, and batch statistics would leak between the real and fake halves.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from medsr.models.blocks import conv

LEAK = 0.2  # LeakyReLU slope of SRGAN, ESRGAN, PatchGAN and Real-ESRGAN


def _conv(spatial_dims: int, in_channels: int, out_channels: int, *, kernel: int, stride: int, sn: bool) -> nn.Module:
    """A 2D/3D convolution padded by (kernel - 1) // 2 (a 4x4 stride-2 conv halves an even size, as in pix2pix and
    Real-ESRGAN), optionally spectrally normalised."""
    layer = (nn.Conv2d if spatial_dims == 2 else nn.Conv3d)(
        in_channels, out_channels, kernel, stride, (kernel - 1) // 2
    )
    return nn.utils.parametrizations.spectral_norm(layer) if sn else layer


class VGGDiscriminator(nn.Module):
    """Conv stages (3x3 conv, 4x4 stride-2 conv, LeakyReLU) doubling channels up to 8x, then pool + linear.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        channels: Channels of the first stage (64 in SRGAN/ESRGAN).
        stages: Number of stride-2 stages (5 in ESRGAN's VGG-128: 128 -> 4).
        spectral_norm: Normalise every convolution and the linear layer.
    """

    def __init__(
        self,
        spatial_dims: int,
        *,
        in_channels: int = 1,
        channels: int = 64,
        stages: int = 4,
        spectral_norm: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width_in = in_channels
        for stage in range(stages):
            width = channels * min(2**stage, 8)
            layers += [_conv(spatial_dims, width_in, width, kernel=3, stride=1, sn=spectral_norm), nn.LeakyReLU(LEAK)]
            layers += [_conv(spatial_dims, width, width, kernel=4, stride=2, sn=spectral_norm), nn.LeakyReLU(LEAK)]
            width_in = width
        self.features = nn.Sequential(*layers)
        linear = nn.Linear(width_in, 1)
        self.head = nn.utils.parametrizations.spectral_norm(linear) if spectral_norm else linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, *spatial) -> (N, 1) logits."""
        return self.head(self.features(x).flatten(2).mean(dim=2))


class PatchDiscriminator(nn.Module):
    """PatchGAN: 4x4 convs, stride 2 for ``stages`` layers, then a stride-1 layer and a 1-channel map.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        channels: Channels of the first layer (64 in pix2pix), doubling up to 8x.
        stages: Stride-2 layers (3 in pix2pix: a 70 x 70 receptive field in 2D).
        spectral_norm: Normalise every convolution.
    """

    def __init__(
        self,
        spatial_dims: int,
        *,
        in_channels: int = 1,
        channels: int = 64,
        stages: int = 3,
        spectral_norm: bool = False,
    ) -> None:
        super().__init__()
        widths = [in_channels] + [channels * min(2**s, 8) for s in range(stages + 1)]
        layers: list[nn.Module] = []
        for index, (width_in, width) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            stride = 2 if index < stages else 1
            layers += [
                _conv(spatial_dims, width_in, width, kernel=4, stride=stride, sn=spectral_norm),
                nn.LeakyReLU(LEAK),
            ]
        layers.append(_conv(spatial_dims, widths[-1], 1, kernel=4, stride=1, sn=spectral_norm))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, *spatial) -> (N, 1, *patches) logits, one per receptive field."""
        return self.body(x)


class UNetDiscriminator(nn.Module):
    """Real-ESRGAN's U-Net discriminator: three stride-2 encoder convs, a decoder that upsamples (bi/trilinear)
    and adds the skips, two more convs, and a 1-channel map at the input's size. Spectral norm throughout.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        channels: Width of the first level (64 in Real-ESRGAN), doubling per level down to 8x.
    """

    def __init__(self, spatial_dims: int, *, in_channels: int = 1, channels: int = 64) -> None:
        super().__init__()
        widths = [channels, channels * 2, channels * 4, channels * 8]
        self.first = _conv(spatial_dims, in_channels, widths[0], kernel=3, stride=1, sn=False)  # as Real-ESRGAN
        self.down = nn.ModuleList(
            _conv(spatial_dims, a, b, kernel=4, stride=2, sn=True) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.up = nn.ModuleList(
            _conv(spatial_dims, b, a, kernel=3, stride=1, sn=True) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.refine = nn.Sequential(
            _conv(spatial_dims, widths[0], widths[0], kernel=3, stride=1, sn=True),
            nn.LeakyReLU(LEAK),
            _conv(spatial_dims, widths[0], widths[0], kernel=3, stride=1, sn=True),
            nn.LeakyReLU(LEAK),
            conv(spatial_dims, widths[0], 1),
        )
        self.mode = "bilinear" if spatial_dims == 2 else "trilinear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, *spatial) -> (N, 1, *spatial) logits, one per voxel."""
        act = nn.functional.leaky_relu
        skips = [act(self.first(x), LEAK)]
        for layer in self.down:
            skips.append(act(layer(skips[-1]), LEAK))
        y = skips.pop()
        for layer, skip in zip(reversed(self.up), reversed(skips), strict=True):
            y = nn.functional.interpolate(y, size=skip.shape[2:], mode=self.mode, align_corners=False)
            y = act(layer(y), LEAK) + skip
        return self.refine(y)


DISCRIMINATORS: dict[str, Callable[..., nn.Module]] = {
    "vgg": VGGDiscriminator,
    "patchgan": PatchDiscriminator,
    "unet": UNetDiscriminator,
}


def create_discriminator(name: str, spatial_dims: int, **kwargs) -> nn.Module:
    """Build a discriminator by name ('vgg', 'patchgan', 'unet'), e.g. ``create_discriminator("unet", 2)``."""
    if name not in DISCRIMINATORS:
        raise ValueError(f"unknown discriminator {name!r}; known: {', '.join(DISCRIMINATORS)}")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return DISCRIMINATORS[name](spatial_dims, **kwargs)
