"""Perceptual loss from a user-supplied VGG-19 weights file (safetensors, torchvision keys)."""

import pytest
import torch
from safetensors.torch import save_file

from medsr.perceptual import PerceptualLoss, vgg19_features


@pytest.fixture
def vgg_file(tmp_path):
    """Random VGG-19 weights up to conv2_1 (features.0 ... features.5), as a user's converted file would hold."""
    torch.manual_seed(0)
    path = tmp_path / "vgg19.safetensors"
    save_file({f"features.{k}": v for k, v in vgg19_features(6).state_dict().items()}, str(path))
    return path


def test_module_indices_match_torchvision():
    features = vgg19_features(36)
    assert len(features) == 37 and isinstance(features[34], torch.nn.Conv2d) and features[34].out_channels == 512
    assert [i for i, m in enumerate(features) if isinstance(m, torch.nn.MaxPool2d)] == [4, 9, 18, 27, 36]


@pytest.mark.parametrize("shape", [(2, 1, 24, 24), (1, 1, 16, 16, 3)])
def test_zero_for_equal_images_positive_and_differentiable_otherwise(vgg_file, shape):
    loss = PerceptualLoss(vgg_file, layer=5)
    target = torch.rand(shape)
    pred = (target + 0.1 * torch.randn(shape)).requires_grad_()
    assert float(loss(target, target)) == 0
    value = loss(pred, target)
    value.backward()
    assert value.item() > 0 and pred.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in loss.parameters())


def test_a_file_without_the_layers_or_not_safetensors_is_a_clear_error(vgg_file, tmp_path):
    with pytest.raises(
        ValueError, match=r"vgg19.safetensors: not VGG-19 features up to layer 34: missing \['features.10"
    ):
        PerceptualLoss(vgg_file)
    pickle = tmp_path / "vgg19.pth"
    torch.save(vgg19_features(3).state_dict(), pickle)
    with pytest.raises(ValueError, match="vgg19.pth: cannot read VGG-19 weights as safetensors"):
        PerceptualLoss(pickle, layer=3)
