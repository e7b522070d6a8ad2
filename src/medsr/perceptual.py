"""Perceptual loss (Johnson et al., ECCV 2016; as in SRGAN/ESRGAN) from a VGG-19 the user supplies as weights.

medsr downloads nothing: the feature network is VGG-19's convolutional part (Simonyan & Zisserman, ICLR 2015),
defined here, with weights read from a safetensors file whose keys follow torchvision's ``vgg19().features``
(``features.0.weight`` ... ``features.34.bias``), e.g. converted once by the user with
``safetensors.torch.save_file({"features." + k: v for k, v in vgg19(weights=...).features.state_dict().items()})``.
Grey images are repeated to three channels and normalised with the ImageNet mean and std VGG was trained with;
3D batches are scored slice by slice along their last axis. As ESRGAN, features are taken before the activation
(``layer=34``: conv5_4), which keeps more of the high-frequency signal.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

# Output channels of each 3x3 conv of VGG-19, "M" for 2x2 max pooling (torchvision's configuration "E").
VGG19 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def vgg19_features(layer: int) -> nn.Sequential:
    """torchvision's ``vgg19().features[: layer + 1]`` (same module indices, so the same state-dict keys)."""
    modules: list[nn.Module] = []
    channels = 3
    for item in VGG19:
        if item == "M":
            modules.append(nn.MaxPool2d(2, 2))
        else:
            modules += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU(inplace=False)]
            channels = item
    if not 0 <= layer < len(modules):
        raise ValueError(f"VGG-19 feature layer must be in [0, {len(modules)}), got {layer}")
    return nn.Sequential(*modules[: layer + 1])


class PerceptualLoss(nn.Module):
    """L1 distance of VGG-19 features of SR and HR, images in [0, 1]; the network is frozen.

    Args:
        weights: safetensors file with torchvision's ``features.*`` keys (at least up to ``layer``).
        layer: Index in ``vgg19().features`` whose output is compared (34 = conv5_4 before ReLU, ESRGAN).
    """

    def __init__(self, weights: Path | str, *, layer: int = 34) -> None:
        super().__init__()
        self.features = vgg19_features(layer)
        try:
            tensors = load_file(str(weights))
        except (OSError, SafetensorError) as error:
            raise ValueError(f"{weights}: cannot read VGG-19 weights as safetensors ({error})") from error
        wanted = {f"features.{k}": v for k, v in self.features.state_dict().items()}
        missing = sorted(set(wanted) - set(tensors))
        wrong = sorted(k for k in set(wanted) & set(tensors) if tensors[k].shape != wanted[k].shape)
        if missing or wrong:
            raise ValueError(
                f"{weights}: not VGG-19 features up to layer {layer}: missing {missing}, wrong shape {wrong}"
            )
        self.features.load_state_dict({k.removeprefix("features."): tensors[k] for k in wanted})
        self.features.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1))

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, I, J) or (N, C, I, J, K) in [0, 1] -> features of every 2D slice."""
        if x.ndim == 5:  # (N, C, I, J, K) -> (N K, C, I, J)
            x = x.permute(0, 4, 1, 2, 3).flatten(0, 1)
        x = x.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1) if x.shape[1] != 3 else x
        return self.features((x - self.mean) / self.std)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean absolute feature difference; differentiable in ``pred``."""
        if pred.shape != target.shape:
            raise ValueError(
                f"pred and target must have the same shape, got {tuple(pred.shape)}, {tuple(target.shape)}"
            )
        return nn.functional.l1_loss(self._embed(pred.float()), self._embed(target.float()))
