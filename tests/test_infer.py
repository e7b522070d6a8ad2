import numpy as np
import pytest
import torch

from medsr.infer import (
    model_plan,
    model_predictor,
    native_bf16,
    predict_tiled,
    predict_volume,
    resolve_precision,
    super_resolve,
    tile_starts,
)
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


@pytest.mark.kernels
def test_tiled_equals_whole_when_the_receptive_field_fits_in_a_quarter_overlap():
    torch.manual_seed(0)
    # edsr_tiny: 7 LR convolutions + the bicubic skip (2) + 1 HR convolution -> receptive radius <= 8 LR voxels.
    model = create_model("edsr_tiny", spatial_dims=2, scale=(2, 2)).eval()
    image = torch.rand(1, 150, 131)
    with torch.no_grad():
        whole = model(image[None])[0]
    predictor = model_predictor(model, precision="fp32")
    tiled = predict_tiled(predictor, image, scale=(2, 2), tile=(64, 64), overlap=(32, 32))
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


def test_a_2d_model_upsamples_in_plane_or_through_plane_not_both(phantom):
    with pytest.raises(ValueError, match="not both"):
        predict_volume(pointwise_model, phantom, scale=(2, 2, 2), spatial_dims=2, progress=False)
    with pytest.raises(ValueError, match="self-supervised mode"):
        model_plan((2, 2, 2), (2, 2))
    assert model_plan((2, 2, 1), (2, 2)) == (2, 2, 1) and model_plan((1, 1, 2.5), (1, 2)) == (1, 1, 2)


def test_through_plane_with_a_2d_model_on_both_orthogonal_planes(phantom):
    """A (1, 3) 2D cubic upsampler run on the (i, k) and (j, k) planes is exactly the cubic along k."""
    sr = predict_volume(
        lambda b: interpolate(b, (1, 3), "cubic"), phantom, scale=(1, 1, 3), spatial_dims=2, tile=16, overlap=8
    )
    expected = interpolate(phantom.array[None], (1, 1, 3), "cubic")[0]
    torch.testing.assert_close(sr.array, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(sr.affine, scale_affine(phantom.affine, (1, 1, 3)))


def test_super_resolve_to_non_integer_factors(phantom):
    """The model's integer scale, then linear resampling to round(n * factor) voxels over the same field of view:
    a ramp along i through a linear x2 'model' lands on the new voxel centres' positions."""
    ramp = phantom.replace(array=torch.arange(24.0).reshape(1, 24, 1, 1).expand(1, 24, 20, 16).contiguous() + 1)
    model = create_model("bicubic", spatial_dims=2, scale=(2, 2), mode="linear")
    sr = super_resolve(ramp, model, model_scale=(2, 2), factors=(1.5, 2.5, 1), progress=False)
    assert sr.spatial_shape == (36, 50, 16)
    np.testing.assert_allclose(sr.affine, scale_affine(phantom.affine, (36 / 24, 50 / 20, 1)))
    position = (np.arange(36) + 0.5) / 1.5 - 0.5  # LR index of each output voxel centre
    np.testing.assert_allclose(sr.array[0, 2:-2, 5, 3].numpy(), position[2:-2] + 1, atol=1e-4)


@pytest.mark.kernels
def test_bf16_precision_is_close_to_fp32():
    torch.manual_seed(0)
    model = create_model("edsr_tiny", spatial_dims=2, scale=(2, 2))
    lr = torch.rand(2, 1, 16, 16)
    fp32, bf16 = model_predictor(model, precision="fp32")(lr), model_predictor(model, precision="bf16")(lr)
    assert bf16.dtype == torch.float32 and bf16.is_contiguous()
    assert 0 < float((fp32 - bf16).abs().max()) < 0.02  # bf16 keeps 8 bits of mantissa
    with pytest.raises(ValueError, match="precision"):
        model_predictor(model, precision="fp16")


@pytest.mark.kernels
def test_bf16_inference_leaves_the_callers_model_as_it_was():
    """Converted in place, a model validated during training trained on in channels-last weights (other kernels,
    other roundings than the contiguous weights a resumed run loads): resume was not exact on AVX2 CPUs."""
    model = create_model("edsr_tiny", spatial_dims=2, scale=(2, 2))
    strides = {name: p.stride() for name, p in model.named_parameters()}
    model_predictor(model, precision="bf16")(torch.rand(1, 1, 8, 8))
    assert {name: p.stride() for name, p in model.named_parameters()} == strides


@pytest.mark.parametrize(("isa", "native"), [("AVX2", False), ("AVX512_CORE", False), ("avx2_vnni", False)])
def test_a_onednn_isa_limit_below_bf16_means_no_native_bf16(monkeypatch, isa, native):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
    assert native_bf16() is native
    assert resolve_precision("auto") == "fp32"
