"""GAN discriminators (shapes in 2D/3D, spectral norm) and the adversarial losses."""

import math

import pytest
import torch

from medsr.losses import discriminator_loss, generator_loss
from medsr.models.discriminators import create_discriminator


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", ["vgg", "patchgan", "unet"])
def test_discriminators_take_any_patch_size_and_give_logits(name, spatial_dims):
    torch.manual_seed(0)
    net = create_discriminator(name, spatial_dims, in_channels=2, channels=4)
    for size in (32, 37):
        x = torch.randn(3, 2, *(size,) * spatial_dims, requires_grad=True)
        logits = net(x)
        expected = {
            "vgg": (3, 1),
            "unet": (3, 1, *(size,) * spatial_dims),
        }.get(name)
        if expected is not None:
            assert logits.shape == expected
        else:  # one logit per patch: 4x4 convs padded by 1, three of stride 2 ((n - 2) // 2 + 1), two of stride 1
            side = size
            for _ in range(3):
                side = (side - 2) // 2 + 1
            side = side - 2
            assert logits.shape == (3, 1, *(side,) * spatial_dims)
        logits.sum().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_spectral_norm_bounds_every_layer_of_the_unet():
    torch.manual_seed(0)
    net = create_discriminator("unet", 2, channels=4).train()
    for _ in range(30):  # power iterations run on each training forward
        net(torch.randn(2, 1, 16, 16))
    normalised = [m for m in net.modules() if hasattr(m, "parametrizations")]
    assert len(normalised) == 3 + 3 + 2
    for layer in normalised:
        sigma = torch.linalg.matrix_norm(layer.weight.detach().flatten(1), ord=2)
        assert float(sigma) == pytest.approx(1.0, abs=0.05)


def test_unknown_discriminator_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown discriminator 'resnet'"):
        create_discriminator("resnet", 2)
    with pytest.raises(ValueError, match="spatial_dims"):
        create_discriminator("vgg", 1)


def test_adversarial_losses_have_their_textbook_values():
    real, fake = torch.tensor([2.0, 1.0]), torch.tensor([-1.0, 0.5])
    softplus = torch.nn.functional.softplus  # -log(sigmoid(x)) = softplus(-x)
    vanilla = softplus(-real).mean() + softplus(fake).mean()
    assert float(discriminator_loss(real, fake, "vanilla")) == pytest.approx(float(vanilla))
    assert float(generator_loss(real, fake, "vanilla")) == pytest.approx(float(softplus(-fake).mean()))
    assert float(discriminator_loss(real, fake, "hinge")) == pytest.approx((0 + 0) / 2 + (0 + 1.5) / 2)
    assert float(generator_loss(real, fake, "hinge")) == pytest.approx(0.25)
    # ESRGAN: D_Ra(xr, xf) = sigmoid(C(xr) - E[C(xf)]); L_D = -E[log D_Ra(xr, xf)] - E[log(1 - D_Ra(xf, xr))]
    d_real = torch.sigmoid(real - fake.mean())
    d_fake = torch.sigmoid(fake - real.mean())
    ragan_d = -(torch.log(d_real).mean() + torch.log(1 - d_fake).mean()) / 2
    ragan_g = -(torch.log(1 - d_real).mean() + torch.log(d_fake).mean()) / 2
    assert float(discriminator_loss(real, fake, "ragan")) == pytest.approx(float(ragan_d))
    assert float(generator_loss(real, fake, "ragan")) == pytest.approx(float(ragan_g))


@pytest.mark.parametrize("kind", ["vanilla", "ragan", "hinge"])
def test_a_confident_discriminator_wins_and_the_generator_loses(kind):
    real, fake = torch.full((4, 1, 3, 3), 20.0), torch.full((4, 1, 3, 3), -20.0)
    assert float(discriminator_loss(real, fake, kind)) < 1e-6
    assert float(generator_loss(real, fake, kind)) > float(generator_loss(real, -fake, kind))
    with pytest.raises(ValueError, match="unknown adversarial loss"):
        discriminator_loss(real, fake, "wasserstein")
    assert math.isfinite(float(generator_loss(real, fake, kind)))
