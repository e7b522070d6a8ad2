import logging
import math

import numpy as np
import pytest
import torch

from medsr.checkpoint import shipped_models
from medsr.infer import (
    CPU_CALL_BYTES,
    MAX_RADIUS,
    MEMORY_FACTOR,
    Tiling,
    choose_tiles,
    footprint,
    model_plan,
    model_predictor,
    native_bf16,
    parse_memory,
    predict_tiled,
    predict_volume,
    receptive_radius,
    resolve_precision,
    super_resolve,
    tile_bounds,
    tile_starts,
    volume_tiling,
)
from medsr.models import create_model
from medsr.models.blocks import interpolate
from medsr.volume import Modality, Volume, scale_affine, world_coordinates
from medsr.zoo import is_through_plane, load_model

from .conftest import oblique_affine

SHIPPED = ("edsr_mr_x2", "edsr_mr_x4", "edsr_ct_x2", "edsr_us_x2", "edsr_xray_x2", "edsr_mr_slices_x4")
SHIPPED += ("edsr_ct_slices_x3",)


def pointwise_model(batch: torch.Tensor) -> torch.Tensor:
    """Nearest upsampling x (2, 3) + 1: no spatial context, so tiling must be invisible."""
    return batch.repeat_interleave(2, dim=2).repeat_interleave(3, dim=3) + 1


def conv_stack(n: int, spatial_dims: int, channels: int = 4) -> torch.nn.Module:
    """n 3x3 (3x3x3) convolutions, float64: receptive radius n."""
    conv = torch.nn.Conv2d if spatial_dims == 2 else torch.nn.Conv3d
    widths = [1, *[channels] * (n - 1), 1]
    return torch.nn.Sequential(*[conv(a, b, 3, padding=1) for a, b in zip(widths, widths[1:], strict=False)]).double()


@pytest.mark.parametrize("shape, tile, overlap", [((37, 29), (16, 12), (4, 6)), ((8, 8), (16, 16), (4, 4))])
def test_tiling_is_invisible_for_a_pointwise_model(shape, tile, overlap):
    image = torch.rand(2, *shape)
    out = predict_tiled(pointwise_model, image, scale=(2, 3), tile=tile, overlap=overlap, batch_size=3)
    assert out.shape == (2, shape[0] * 2, shape[1] * 3) and out.dtype == torch.float32
    torch.testing.assert_close(out, pointwise_model(image[None])[0], atol=1e-6, rtol=0)


@pytest.mark.kernels
def test_tiled_equals_whole_when_the_overlap_covers_twice_the_receptive_radius():
    torch.manual_seed(0)
    model = create_model("edsr_tiny", spatial_dims=2, scale=(2, 2)).eval()
    predictor = model_predictor(model, precision="fp32")
    radius = footprint(predictor, 2).radius
    image = torch.rand(1, 150, 131)
    with torch.no_grad():
        whole = model(image[None])[0]
    tiled = predict_tiled(predictor, image, scale=(2, 2), tile=(40, 40), overlap=[2 * r for r in radius])
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)


def test_tile_starts_cover_the_image_and_end_at_the_border():
    assert tile_starts(10, 16, 4) == [0]
    starts = tile_starts(37, 16, 4)
    assert starts[0] == 0 and starts[-1] == 37 - 16
    assert all(b - a <= 12 for a, b in zip(starts, starts[1:], strict=False))
    with pytest.raises(ValueError, match="larger than the overlap"):
        tile_starts(37, 16, 16)


@pytest.mark.parametrize(("size", "tile", "overlap"), [(100, 40, 10), (37, 16, 5), (64, 23, 22), (10, 16, 4)])
def test_tiles_keep_a_partition_at_least_half_the_overlap_from_shared_edges(size, tile, overlap):
    tile = min(tile, size)
    starts = tile_starts(size, tile, overlap)
    bounds = tile_bounds(starts, tile, size)
    assert bounds[0] == 0 and bounds[-1] == size and all(a < b for a, b in zip(bounds, bounds[1:], strict=False))
    for n, start in enumerate(starts):
        if n > 0:  # a shared left edge
            assert bounds[n] - start >= overlap // 2
        if n < len(starts) - 1:  # a shared right edge
            assert start + tile - bounds[n + 1] >= overlap // 2


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("n", [1, 4])
def test_receptive_radius_of_a_stack_of_3x3_convolutions_is_their_number(spatial_dims, n):
    torch.manual_seed(n)
    convs = conv_stack(n, spatial_dims)
    assert receptive_radius(convs, spatial_dims) == (n,) * spatial_dims
    assert receptive_radius(torch.no_grad()(convs), spatial_dims) == (n,) * spatial_dims  # no gradient: by changes


def test_receptive_radius_counts_output_voxels_by_their_input_voxel():
    """Cubic interpolation reads 2 input voxels either side; an axis of factor 1 is left as it is; a sub-pixel
    layer after 3 convolutions keeps their radius."""
    assert receptive_radius(lambda x: interpolate(x, (1, 3), "cubic"), 2) == (0, 2)
    torch.manual_seed(0)
    shuffled = torch.nn.Sequential(conv_stack(3, 2), torch.nn.Conv2d(1, 4, 1).double(), torch.nn.PixelShuffle(2))
    assert receptive_radius(shuffled, 2) == (3, 3)


def test_a_global_model_gets_the_largest_radius_and_a_warning(caplog):
    def global_mean(x: torch.Tensor) -> torch.Tensor:
        return x + x.mean(dim=(2, 3), keepdim=True)

    with caplog.at_level(logging.WARNING, logger="medsr"):
        assert receptive_radius(global_mean, 2) == (MAX_RADIUS, MAX_RADIUS)
    assert "global context" in caplog.text


def test_footprint_of_a_network_is_measured_once():
    network = create_model("edsr_small", spatial_dims=2, scale=(2, 2))
    measured = footprint(model_predictor(network, precision="fp32"), 2)
    assert measured.radius == (20, 20)  # 19 convolutions at LR, 1 at HR (head, 8 x 2 in the body, end, upsampling)
    assert measured.widest == 32 * 4  # the sub-pixel convolution: 32 channels x 4 before the shuffle
    assert measured.bytes_per_voxel == MEMORY_FACTOR * 32 * 4 * 4
    assert footprint(model_predictor(network, precision="bf16"), 2) is measured  # cached per network


def test_tiles_from_the_memory_budget():
    """Whole planes when they fit; small planes stacked up to the budget, and on the CPU up to CPU_CALL_BYTES of
    the widest tensor; else the tiles that fit."""
    predictor = model_predictor(load_model("edsr_mr_x2").network, precision="fp32")
    per_voxel = footprint(predictor, 2).bytes_per_voxel  # 4 x 128 channels x 4 bytes
    whole = volume_tiling(predictor, (1, 256, 256, 40), spatial_dims=2, memory=2 * 2**30)
    assert whole == Tiling((256, 256, 1), (40, 40, 0), 1)  # a 256^2 plane has 32 MiB of sub-pixel features
    small = volume_tiling(predictor, (1, 32, 32, 40), spatial_dims=2, memory=2 * 2**30)
    assert small == Tiling((32, 32, 16), (40, 40, 0), 16) and 16 * 32 * 32 * 128 * 4 == CPU_CALL_BYTES
    assert volume_tiling(predictor, (1, 32, 32, 40), spatial_dims=2, memory=per_voxel * 32 * 32 * 5).tile[2] == 5
    memory = per_voxel * 100 * 100
    tiled = volume_tiling(predictor, (1, 256, 256, 40), spatial_dims=2, memory=memory)
    assert math.prod(tiled.tile[:2]) * per_voxel <= memory and tiled.batch == 1 and tiled.tile[2] == 1
    assert volume_tiling(predictor, (1, 256, 256, 40), spatial_dims=2, memory=memory, tile=64).tile[:2] == (64, 64)
    assert volume_tiling(predictor, (1, 256, 256, 40), spatial_dims=2, overlap=6).overlap == (6, 6, 0)


def test_balanced_tiles_cost_the_least_work():
    """Two tiles of 110 cover 200 with an overlap of 20 (work 220), where the largest that fit, 120, overlap by 40
    (work 240): among the grids that fit, the one with the least work."""
    assert choose_tiles((200,), (20,), 120) == (110,)
    assert choose_tiles((200, 100), (20, 20), 200 * 100) == (200, 100)
    tiles = choose_tiles((160, 160, 160), (16, 16, 16), 2**21)
    assert math.prod(tiles) <= 2**21
    starts = [tile_starts(160, t, 16) for t in tiles]
    assert math.prod(len(s) * t for s, t in zip(starts, tiles, strict=True)) < 1.5 * 160**3


def test_a_budget_too_small_for_any_tile_warns_and_takes_the_smallest(caplog):
    with caplog.at_level(logging.WARNING, logger="medsr"):
        assert choose_tiles((200, 200), (40, 40), 100) == (60, 60)
    assert "too small for overlaps of (40, 40) voxels" in caplog.text


@pytest.mark.kernels
@pytest.mark.parametrize("name", SHIPPED)
def test_tiled_equals_whole_image_for_every_shipped_model(name):
    """Default tiling (overlap from the receptive radius) with a memory budget a third of the image's need: the
    output is the whole-image output, in-plane on (i, j) planes, through-plane on the (i, k) and (j, k) planes."""
    assert name in shipped_models()
    model = load_model(name)
    predictor = model_predictor(model.network, precision="fp32")
    per_voxel = footprint(predictor, 2).bytes_per_voxel
    generator = torch.Generator().manual_seed(0)
    if is_through_plane(model.scale):
        volume = Volume(torch.rand(1, 130, 3, 90, generator=generator), np.eye(4), Modality.MR)
        with torch.no_grad():  # every (i, k) plane and every (j, k) plane whole, then averaged
            along_i = model.network(volume.array.permute(2, 0, 1, 3)).permute(1, 2, 0, 3)
            along_j = model.network(volume.array.permute(1, 0, 2, 3)).permute(1, 0, 2, 3)
        whole, plane = (along_i + along_j) / 2, (130, 90)
    else:
        volume = Volume(torch.rand(1, 150, 140, 2, generator=generator), np.eye(4), Modality.MR)
        with torch.no_grad():
            whole = model.network(volume.array.permute(3, 0, 1, 2)).permute(1, 2, 3, 0)
        plane = (150, 140)
    memory = per_voxel * math.prod(plane) / 3
    tiling = volume_tiling(
        predictor, volume.array.shape, spatial_dims=2, through_plane=is_through_plane(model.scale), memory=memory
    )
    on_plane = (max(tiling.tile[:2]), tiling.tile[2]) if is_through_plane(model.scale) else tiling.tile[:2]
    assert tiling.batch == 1 and math.prod(on_plane) < math.prod(plane)  # tiled
    sr = predict_volume(predictor, volume, scale=model.scale, spatial_dims=2, memory=memory, progress=False)
    assert float((sr.array - whole).abs().max()) < 1e-4  # of the data range, 1


@pytest.mark.kernels
def test_tiled_equals_whole_volume_for_a_3d_model():
    torch.manual_seed(0)
    network = create_model("edsr_tiny", spatial_dims=3, scale=(2, 2, 2))
    predictor = model_predictor(network, precision="fp32")
    volume = Volume(torch.rand(1, 48, 44, 40), np.eye(4), Modality.MR)
    memory = footprint(predictor, 3).bytes_per_voxel * 48 * 44 * 40 / 3
    tiling = volume_tiling(predictor, volume.array.shape, spatial_dims=3, memory=memory)
    assert math.prod(tiling.tile) * footprint(predictor, 3).bytes_per_voxel <= memory
    sr = predict_volume(predictor, volume, scale=(2, 2, 2), spatial_dims=3, memory=memory)
    with torch.no_grad():
        whole = network(volume.array[None])[0]
    assert float((sr.array - whole).abs().max()) < 1e-4


def test_small_planes_share_a_forward():
    calls = []

    def counting(batch: torch.Tensor) -> torch.Tensor:
        calls.append(len(batch))
        return interpolate(batch, (2, 2), "linear")

    volume = Volume(torch.rand(1, 20, 16, 12), np.eye(4), Modality.MR)
    memory = footprint(counting, 2).bytes_per_voxel * 20 * 16 * 5  # five planes at a time
    sr = predict_volume(counting, volume, scale=(2, 2, 1), spatial_dims=2, memory=memory, progress=False)
    assert calls[-3:] == [5, 5, 2]
    expected = interpolate(volume.array.permute(3, 0, 1, 2), (2, 2), "linear").permute(1, 2, 3, 0)
    torch.testing.assert_close(sr.array, expected, atol=1e-6, rtol=0)


def test_memory_sizes_parse_in_binary_units():
    assert parse_memory("2G") == 2 * 2**30 and parse_memory("1.5GiB") == 3 * 2**29
    assert parse_memory("300m") == 300 * 2**20 and parse_memory("4096") == 4096
    for bad in ("", "2X", "-1G", "nan", "0"):
        with pytest.raises(ValueError, match="like 2G"):
            parse_memory(bad)


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


def test_a_single_plane_across_the_slices_runs_only_as_that_plane(phantom):
    """A volume one voxel wide along j (one coronal image with k along its rows): the (j, k) 'planes' are lines, so
    only the (i, k) plane is used (averaging with lines would blur it)."""
    model = create_model("edsr_tiny", spatial_dims=2, scale=(1, 3))
    image = phantom.replace(array=phantom.array[:, :, 4:5].contiguous())  # (1, 24, 1, 16)
    sr = predict_volume(
        model_predictor(model, precision="fp32"), image, scale=(1, 1, 3), spatial_dims=2, progress=False
    )
    with torch.no_grad():
        alone = model(image.array.permute(2, 0, 1, 3)).permute(1, 2, 0, 3)  # the (i, k) plane, whole
    assert sr.spatial_shape == (24, 1, 48)
    torch.testing.assert_close(sr.array, alone, atol=1e-5, rtol=0)


def test_a_model_loaded_again_is_measured_once(monkeypatch):
    """The footprint (receptive radius, widest tensor) is keyed by the weights' digest: loading the same shipped
    model again does not probe it again; other weights are probed."""
    from medsr import infer
    from medsr.zoo import load_model

    calls = []
    original = infer._measure
    monkeypatch.setattr(infer, "_measure", lambda *args: calls.append(1) or original(*args))
    monkeypatch.setattr(infer, "_NETWORK_FOOTPRINTS", {})
    first = footprint(model_predictor(load_model("edsr_mr_x2").network), 2)
    again = footprint(model_predictor(load_model("edsr_mr_x2").network), 2)
    assert first == again and len(calls) == 1
    footprint(model_predictor(load_model("edsr_mr_x4").network), 2)
    assert len(calls) == 2
