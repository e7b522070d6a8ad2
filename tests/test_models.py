"""Every registered model, tested without anyone writing a test for it (timm's test_models.py, for SR)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medsr.models import create_model, list_models
from medsr.models.blocks import interpolate, pixel_shuffle
from medsr.models.fsrcnn import deconv_padding
from medsr.models.rrdb import plan_upsampling

GEOMETRIES = [(2, (2, 2)), (2, (3, 1)), (2, (4, 4)), (3, (1, 1, 2)), (3, (2, 2, 2))]


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("spatial_dims, scale", GEOMETRIES)
def test_forward_backward(name, spatial_dims, scale):
    """Exact output shape, finite values, and a non-zero gradient for every parameter, in 2D and 3D."""
    torch.manual_seed(0)
    model = create_model(name, spatial_dims=spatial_dims, scale=scale)
    lr = torch.rand(2, 1, *[6] * spatial_dims)
    sr = model(lr)
    assert sr.shape == (2, 1, *(6 * s for s in scale))
    assert torch.isfinite(sr).all()
    parameters = list(model.parameters())
    if not parameters:  # an interpolation baseline: nothing to learn
        return
    sr.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in parameters)


@pytest.mark.parametrize("name", list_models())
def test_models_refuse_what_they_cannot_do(name):
    with pytest.raises(TypeError):
        create_model(name, spatial_dims=2, scale=(2, 2), no_such_option=1)
    with pytest.raises(ValueError):
        create_model(name, spatial_dims=3, scale=(2, 2))  # a scale per spatial axis
    with pytest.raises(ValueError):
        create_model(name, spatial_dims=2, scale=(2.5, 2))  # never silently truncated to 2


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
    with pytest.raises(ValueError, match="unknown model 'edsr_huge'; known: bicubic, edsr_baseline"):
        create_model("edsr_huge")


@pytest.mark.parametrize("spatial_dims, scale", GEOMETRIES)
def test_bicubic_is_the_interpolation(spatial_dims, scale):
    model = create_model("bicubic", spatial_dims=spatial_dims, scale=scale)
    assert list(model.parameters()) == []
    lr = torch.rand(2, 1, *(6, 7, 8)[:spatial_dims])
    sr = model(lr)
    assert sr.shape == (2, 1, *(n * s for n, s in zip(lr.shape[2:], scale, strict=True)))
    assert torch.equal(sr, interpolate(lr, scale, "cubic"))


def keys_upsample(line: np.ndarray, factor: int, a: float = -0.75) -> np.ndarray:
    """1D cubic convolution (Keys 1981) at the voxel-centre positions of a ``factor`` times finer grid, edges
    replicated: written from the formula, independently of PyTorch."""

    def kernel(t: np.ndarray) -> np.ndarray:
        t = np.abs(t)
        near = ((a + 2) * t - (a + 3)) * t * t + 1
        far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
        return np.where(t <= 1, near, np.where(t < 2, far, 0.0))

    x = (np.arange(len(line) * factor) + 0.5) / factor - 0.5
    base = np.floor(x).astype(int)
    taps = base[:, None] + np.arange(-1, 3)[None, :]
    weights = kernel(x[:, None] - taps)
    return (weights * line[np.clip(taps, 0, len(line) - 1)]).sum(1)


def test_3d_cubic_is_keys_along_each_axis(rng):
    """Separable tricubic: a product image f(i) g(j) h(k) upsamples to the product of the 1D Keys upsamplings."""
    f, g, h = rng.random(5), rng.random(6), rng.random(7)
    image = torch.from_numpy(np.einsum("i,j,k->ijk", f, g, h))[None, None]
    expected = np.einsum("i,j,k->ijk", keys_upsample(f, 2), keys_upsample(g, 3), keys_upsample(h, 4))
    np.testing.assert_allclose(interpolate(image, (2, 3, 4), "cubic")[0, 0].numpy(), expected, atol=1e-12)
    per_slice = torch.stack([interpolate(image[..., k], (2, 3), "cubic") for k in range(7)], dim=-1)
    assert torch.equal(interpolate(image, (2, 3, 1), "cubic"), per_slice)  # factor 1 along k: slices untouched


def test_bicubic_checks_channels_and_mode():
    with pytest.raises(ValueError, match=r"expected \(N, 1, \*spatial\)"):
        create_model("bicubic")(torch.rand(1, 2, 4, 4))
    with pytest.raises(ValueError, match="mode must be"):
        create_model("bicubic", spatial_dims=3, scale=(2, 2, 2), mode="quintic")


@pytest.mark.parametrize("scale", [(1, 1), (2, 2), (3, 3), (4, 4), (1, 3), (4, 2)])
def test_fsrcnn_output_size_for_odd_lr_sizes(scale):
    model = create_model("fsrcnn_tiny", spatial_dims=2, scale=scale)
    assert model(torch.rand(1, 1, 7, 5)).shape == (1, 1, 7 * scale[0], 5 * scale[1])


def test_fsrcnn_output_size_3d_odd():
    model = create_model("fsrcnn_tiny", spatial_dims=3, scale=(3, 1, 4))
    assert model(torch.rand(1, 1, 5, 3, 7)).shape == (1, 1, 15, 3, 28)


@pytest.mark.parametrize("stride, expected", [(1, (4, 0)), (2, (4, 1)), (3, (3, 0)), (4, (3, 1))])
def test_deconv_padding(stride, expected):
    assert deconv_padding(9, stride) == expected


@pytest.mark.parametrize("stride", [1, 2, 3, 4])
def test_fsrcnn_deconv_centres_each_lr_voxel_on_its_footprint(stride):
    """A centre-tap kernel puts LR voxel i at HR index i r + floor((r - 1) / 2): the middle of [i r, (i + 1) r)."""
    model = create_model("fsrcnn_tiny", spatial_dims=2, scale=(stride, 1))
    with torch.no_grad():
        model.deconv.weight.zero_()
        model.deconv.weight[0, 0, 4, 4] = 1.0
        model.deconv.bias.zero_()
        features = torch.zeros(1, 16, 5, 1)
        features[0, 0, :, 0] = torch.arange(1.0, 6.0)
        out = model.deconv(features)[0, 0, :, 0]
    expected = torch.zeros(5 * stride)
    expected[torch.arange(5) * stride + (stride - 1) // 2] = torch.arange(1.0, 6.0)
    assert torch.equal(out, expected)


def test_srcnn_residual_adds_the_interpolated_input():
    model = create_model("srcnn_tiny", residual=True)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    lr = torch.rand(1, 1, 6, 6)
    assert torch.equal(model(lr), interpolate(lr, (2, 2), "cubic"))


@pytest.mark.parametrize(
    "scale, steps",
    [((4, 4), [(2, 2), (2, 2)]), ((3, 1), [(3, 1)]), ((2, 3), [(2, 3)]), ((8, 1, 1), [(2, 1, 1)] * 3), ((1, 1), [])],
)
def test_rrdb_upsampling_plan(scale, steps):
    assert plan_upsampling(scale) == steps


def test_rrdb_upsampling_plan_rejects_zero():
    with pytest.raises(ValueError, match=r"scale must be integers >= 1, got \(0, 2\)"):
        plan_upsampling((0, 2))


def test_lanczos_interpolation_matches_pillow_away_from_the_edges():
    """Pillow's LANCZOS resize (3 lobes, voxel centres) on a float image; edges differ (Pillow renormalises the
    clipped taps, medsr replicates the edge voxel)."""
    from PIL import Image

    image = np.random.default_rng(0).random((20, 24)).astype(np.float32)
    pillow = np.asarray(Image.fromarray(image, mode="F").resize((48, 40), Image.Resampling.LANCZOS))
    ours = interpolate(torch.from_numpy(image)[None, None], (2, 2), "lanczos")[0, 0].numpy()
    np.testing.assert_allclose(ours[6:-6, 6:-6], pillow[6:-6, 6:-6], atol=1e-5)
