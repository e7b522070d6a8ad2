import numpy as np
import pytest
import torch

from medsr.volume import Modality, Volume, crop, integer_scale, scale_affine, world_coordinates

from .conftest import oblique_affine


def test_spacing_and_orientation_come_from_the_affine():
    volume = Volume(torch.zeros(1, 4, 5, 6), oblique_affine(spacing=(0.9, 1.1, 2.0)), Modality.MR)
    np.testing.assert_allclose(volume.spacing, (0.9, 1.1, 2.0))
    assert volume.spatial_shape == (4, 5, 6)
    assert Volume(torch.zeros(1, 2, 2, 2), np.diag([-1.0, -1, 1, 1])).orientation == ("L", "P", "S")
    assert "spacing=(0.9, 1.1, 2) mm" in repr(volume)


@pytest.mark.parametrize(
    "array, affine, match",
    [
        (torch.zeros(4, 5, 6), np.eye(4), "C, I, J, K"),
        (torch.zeros(1, 4, 5, 6, dtype=torch.int16), np.eye(4), "floating point"),
        (torch.zeros(1, 4, 5, 6), np.eye(3), "4x4"),
        (torch.zeros(1, 4, 5, 6), np.diag([1.0, 0, 1, 1]), "singular"),
    ],
)
def test_invalid_volumes_are_rejected(array, affine, match):
    with pytest.raises(ValueError, match=match):
        Volume(array, affine)


@pytest.mark.parametrize("scale", [(2, 2, 1), (1, 1, 4), (1.5, 3, 0.5)])
def test_scale_affine_keeps_the_field_of_view(scale):
    """The outer edges of the first and last voxel land at the same world points on both grids."""
    affine, shape = oblique_affine(), np.array([10, 12, 6])
    new = scale_affine(affine, scale)
    new_shape = shape * np.asarray(scale)
    for old_corner, new_corner in [(-0.5 * np.ones(3), -0.5 * np.ones(3)), (shape - 0.5, new_shape - 0.5)]:
        np.testing.assert_allclose(new[:3, :3] @ new_corner + new[:3, 3], affine[:3, :3] @ old_corner + affine[:3, 3])
    np.testing.assert_allclose(Volume(torch.zeros(1, 2, 2, 2), new).spacing, np.array([0.9, 1.1, 2.0]) / scale)


def test_scale_affine_matches_torch_interpolation_of_a_linear_ramp():
    """Linear interpolation (align_corners=False) of a ramp along i gives the ramp on the new grid."""
    affine = oblique_affine()
    x = torch.from_numpy(world_coordinates(affine, (8, 6, 4))[0]).float()[None, None]  # world x, (1, 1, I, J, K)
    up = torch.nn.functional.interpolate(x, scale_factor=(2, 2, 2), mode="trilinear", align_corners=False)
    expected = world_coordinates(scale_affine(affine, (2, 2, 2)), (16, 12, 8))[0]
    interior = (slice(1, -1),) * 3  # linear interpolation clamps at the outermost half voxel
    np.testing.assert_allclose(up[0, 0].numpy()[interior], expected[interior], atol=1e-4)


def test_scale_affine_rejects_bad_factors():
    with pytest.raises(ValueError, match="3 positive"):
        scale_affine(np.eye(4), (2, 2))


def test_integer_scale_refuses_to_truncate():
    assert integer_scale((2.0, 2.0, 1.0)) == (2, 2, 1)
    with pytest.raises(ValueError, match="integer factors"):
        integer_scale((1.5, 2, 1))


def test_crop_keeps_every_kept_voxel_where_it_was():
    affine = oblique_affine()
    volume = Volume(torch.rand(1, 8, 7, 6), affine)
    part = crop(volume, (2, 1, 3), (6, 7, 5))
    assert part.spatial_shape == (4, 6, 2)
    assert torch.equal(part.array, volume.array[:, 2:6, 1:7, 3:5])
    np.testing.assert_allclose(
        world_coordinates(part.affine, (4, 6, 2)), world_coordinates(affine, (8, 7, 6))[:, 2:6, 1:7, 3:5]
    )
    with pytest.raises(ValueError, match="outside"):
        crop(volume, (0, 0, 0), (9, 7, 6))
