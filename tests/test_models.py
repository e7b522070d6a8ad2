import pytest
import torch
import torch.nn.functional as F

from medsr.models import create_model, list_models
from medsr.models.blocks import pixel_shuffle


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("spatial_dims, scale", [(2, (2, 2)), (2, (3, 1)), (3, (1, 1, 2))])
def test_forward_backward(name, spatial_dims, scale):
    model = create_model(name, spatial_dims=spatial_dims, scale=scale, channels=8, num_blocks=1)
    lr = torch.rand(2, 1, *[6] * spatial_dims)
    sr = model(lr)
    assert sr.shape == (2, 1, *(6 * s for s in scale))
    assert torch.isfinite(sr).all()
    sr.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_pixel_shuffle_matches_torch_in_2d():
    x = torch.randn(2, 12, 5, 7)
    torch.testing.assert_close(pixel_shuffle(x, (2, 2)), F.pixel_shuffle(x, 2))


def test_pixel_shuffle_places_each_channel_at_its_sub_voxel():
    """Channel c of a (1, 1, 2) shuffle goes to k offset c: the 3D per-axis layout is the natural extension."""
    x = torch.arange(2.0).reshape(1, 2, 1, 1, 1)
    assert pixel_shuffle(x, (1, 1, 2)).flatten().tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="cannot be shuffled"):
        pixel_shuffle(torch.zeros(1, 3, 2, 2), (2, 2))


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'edsr_huge'; known: edsr_baseline"):
        create_model("edsr_huge")
