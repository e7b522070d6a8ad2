import math

import numpy as np
import pytest
import torch

from medsr.degrade import Degradation, degrade, explain, kspace_truncate, lr_shape
from medsr.volume import Modality, Volume, world_coordinates

from .conftest import oblique_affine


@pytest.mark.parametrize("n, factor", [(64, 2), (63, 2), (60, 3), (60, 1.5)])
def test_truncation_keeps_band_limited_content_and_samples_it_at_block_centres(n, factor):
    """A sinusoid below the LR Nyquist frequency is reproduced exactly at HR positions m * f + (f - 1) / 2."""
    m = lr_shape([n], [factor])[0]
    f = n / m  # the applied factor
    cycles = m // 2 - 1
    position = torch.arange(n, dtype=torch.float64)
    signal = torch.cos(2 * math.pi * cycles * position / n + 0.4) + 0.5
    lr = kspace_truncate(signal, [factor])
    lr_position = torch.arange(m, dtype=torch.float64) * f + (f - 1) / 2
    expected = torch.cos(2 * math.pi * cycles * lr_position / n + 0.4) + 0.5
    torch.testing.assert_close(lr, expected, atol=1e-10, rtol=0)


def test_truncation_removes_frequencies_above_the_lr_band():
    n, m = 64, 32
    position = torch.arange(n, dtype=torch.float64)
    high = torch.cos(2 * math.pi * (m // 2 + 3) * position / n)
    assert kspace_truncate(high, [2]).abs().max() < 1e-10


def test_hann_window_trades_ringing_for_blur():
    """Truncation rings at an edge (Gibbs: about 9 % overshoot where a sample falls near the first lobe); Hann not."""
    edge = (torch.arange(1024, dtype=torch.float64) >= 512).double()
    rect, hann = kspace_truncate(edge, [3]), kspace_truncate(edge, [3], window="hann")
    assert rect.max() > 1.08 and rect.min() < -0.08
    assert hann.max() < 1.01 and hann.min() > -0.01
    assert abs(float(rect.mean()) - 0.5) < 1e-3 and abs(float(hann.mean()) - 0.5) < 1e-3  # DC kept


def test_degrade_keeps_world_coordinates_consistent():
    """Intensity = own world x (mm): after degrade, each LR voxel's value is the world x of its LR position."""
    affine = oblique_affine(spacing=(1.0, 1.0, 2.0))
    shape = (64, 48, 3)
    x = torch.from_numpy(world_coordinates(affine, shape)[0]).float()[None]
    lr = degrade(Volume(x, affine, Modality.MR), Degradation((2, 2, 1)))
    assert lr.spatial_shape == (32, 24, 3)
    np.testing.assert_allclose(lr.spacing, (2.0, 2.0, 2.0))
    expected = world_coordinates(lr.affine, lr.spatial_shape)[0]
    interior = (slice(6, -6), slice(6, -6), slice(None))  # truncation rings at the FOV wrap-around edges
    error = np.abs(lr.array[0].numpy() - expected)[interior]
    assert error.max() < 0.15  # mm; a half-voxel geometry slip would be >= 0.5 mm
    assert np.median(error) < 0.05


def test_degrade_along_k_of_a_2d_image_is_an_error():
    with pytest.raises(ValueError, match="2D image"):
        degrade(Volume(torch.zeros(1, 8, 8, 1), np.eye(4)), Degradation((2, 2, 2)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"factors": (2, 2)}, "3 numbers"),
        ({"factors": (0.5, 1, 1)}, r"in \[1, 16\]"),
        ({"factors": (1e9, 1e9, 1)}, r"in \[1, 16\]"),
        ({"kspace_window": "kaiser"}, "kspace_window"),
    ],
)
def test_bad_degradations_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Degradation(**kwargs)


@pytest.mark.parametrize(
    "degradation, words",
    [
        (Degradation((2, 2, 1)), ["MR: k-space truncation 2x2x1 (rect window", "no added noise"]),
        (Degradation((1, 1, 4), slice_profile="gaussian"), ["slices 4x thicker along k, gaussian profile"]),
        (Degradation((2, 2, 3), modality="CT", noise="gaussian", noise_sigma=20), ["aperture sampling 2x2x3", "20 HU"]),
        (Degradation((2, 2, 1), modality="US", psf_fwhm=(0.5, 0.3, 0)), ["incoherent", "display grid"]),
        (Degradation((2, 2, 1), modality="CR", noise="poisson", photons=1000), ["aperture", "1000 quanta"]),
    ],
)
def test_explain_names_what_each_scanner_model_does(degradation, words):
    text = explain(degradation)
    assert all(word in text for word in words), text
