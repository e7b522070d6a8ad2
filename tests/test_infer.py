import numpy as np
import pytest
import torch

from medsr.infer import model_predictor, predict_tiled, predict_volume, tile_starts
from medsr.models import create_model
from medsr.models.blocks import interpolate
from medsr.volume import Modality, Volume, scale_affine, world_coordinates

from .conftest import oblique_affine


def pointwise_model(batch: torch.Tensor) -> torch.Tensor:
    """Nearest upsampling x (2, 3) + 1: no spatial context, so tiling must be invisible."""
    return batch.repeat_interleave(2, dim=2).repeat_interleave(3, dim=3) + 1


@pytest.mark.parametrize("shape, tile, overlap", [((37, 29), (16, 12), (4, 6)), ((8, 8), (16, 16), (4, 4))])
def test_tiling_is_invisible_for_a_pointwise_model(shape, tile, overlap):
    image = torch.rand(2, *shape)
    out = predict_tiled(pointwise_model, image, scale=(2, 3), tile=tile, overlap=overlap, batch_size=3)
    assert out.shape == (2, shape[0] * 2, shape[1] * 3)
    torch.testing.assert_close(out, pointwise_model(image[None])[0], atol=1e-6, rtol=0)


def test_tiled_equals_whole_when_the_receptive_field_fits_in_a_quarter_overlap():
    torch.manual_seed(0)
    # edsr_tiny: 7 LR convolutions + the bicubic skip (2) + 1 HR convolution -> receptive radius <= 8 LR voxels.
    model = create_model("edsr_tiny", spatial_dims=2, scale=(2, 2)).eval()
    image = torch.rand(1, 150, 131)
    with torch.no_grad():
        whole = model(image[None])[0]
    tiled = predict_tiled(model_predictor(model), image, scale=(2, 2), tile=(64, 64), overlap=(32, 32))
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)


def test_tile_starts_cover_the_image_and_end_at_the_border():
    assert tile_starts(10, 16, 4) == [0]
    starts = tile_starts(37, 16, 4)
    assert starts[0] == 0 and starts[-1] == 37 - 16
    assert all(b - a <= 12 for a, b in zip(starts, starts[1:], strict=False))
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(37, 16, 9)


def test_predict_volume_keeps_world_coordinates_consistent():
    """Intensity = own world x: a linear upsampler through predict_volume returns world x of the new grid."""
    affine = oblique_affine()
    shape = (30, 26, 3)
    x = torch.from_numpy(world_coordinates(affine, shape)[0]).float()[None]
    volume = Volume(x, affine, Modality.MR)
    sr = predict_volume(
        lambda b: interpolate(b, (2, 2), "linear"),
        volume,
        scale=(2, 2, 1),
        spatial_dims=2,
        tile=16,
        overlap=4,
        progress=False,
    )
    assert sr.spatial_shape == (60, 52, 3)
    np.testing.assert_allclose(sr.affine, scale_affine(affine, (2, 2, 1)))
    expected = world_coordinates(sr.affine, sr.spatial_shape)[0]
    interior = (slice(1, -1), slice(1, -1), slice(None))  # linear interpolation clamps at the outer half voxel
    np.testing.assert_allclose(sr.array[0].numpy()[interior], expected[interior], atol=1e-3)


def test_predict_volume_with_a_3d_model(phantom):
    model = create_model("edsr_tiny", spatial_dims=3, scale=(1, 1, 2))
    sr = predict_volume(model_predictor(model), phantom, scale=(1, 1, 2), spatial_dims=3, tile=12, overlap=4)
    assert sr.spatial_shape == (24, 20, 32)
    np.testing.assert_allclose(sr.spacing, np.array(phantom.spacing) / (1, 1, 2))


def test_a_2d_model_cannot_upsample_through_plane(phantom):
    with pytest.raises(ValueError, match="in-plane only"):
        predict_volume(pointwise_model, phantom, scale=(2, 2, 2), spatial_dims=2, progress=False)
