"""Invariants of the scanner models: what each keeps exactly, where its samples sit, what its noise measures."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from medsr.degrade import Degradation, degrade, factors_for_spacing, kspace_truncate, kspace_upsample, lr_shape
from medsr.degrade.noise import correlated_gaussian, poisson, rician
from medsr.degrade.sampling import profile_matrix
from medsr.volume import Modality, Volume, scale_affine, world_coordinates

from .conftest import oblique_affine


@pytest.mark.parametrize("n, factor, window", [(64, 2, "rect"), (61, 3, "rect"), (60, 1.5, "rect"), (64, 2, "tukey")])
def test_kspace_truncation_keeps_the_retained_frequencies_exactly(n, factor, window, rng):
    x = torch.from_numpy(rng.standard_normal(n))
    m = lr_shape([n], [factor])[0]
    lr = kspace_truncate(x, [factor], window=window)
    hr_spectrum, lr_spectrum = torch.fft.fft(x), torch.fft.fft(lr)
    k = torch.fft.fftfreq(m, d=1.0 / m).round().long()
    shift = (n / m - 1) / 2
    expected = hr_spectrum[k % n] * (m / n) * torch.exp(2j * math.pi * k.double() * shift / n)
    kept = k.abs() < (m / 4 if window == "tukey" else m / 2)  # tukey is flat over the middle half of the band
    torch.testing.assert_close(lr_spectrum[kept], expected[kept], atol=1e-9, rtol=1e-9)


def test_the_ideal_upsampler_restores_band_limited_content(rng):
    """Zero-filling inverts truncation for content inside the LR band (2D, x2 and x3)."""
    spectrum = np.zeros((60, 48), complex)
    spectrum[:8, :6] = rng.standard_normal((8, 6)) + 1j * rng.standard_normal((8, 6))  # low frequencies only
    image = torch.from_numpy(np.fft.ifft2(spectrum).real * 100)
    restored = kspace_upsample(kspace_truncate(image, [2, 3]), [60, 48])
    torch.testing.assert_close(restored, image, atol=1e-9, rtol=0)


@pytest.mark.parametrize(
    "factor, thickness_mm, profile",
    [(3, 0.0, "rect"), (3, 2.0, "rect"), (3, 4.5, "gaussian"), (2.5, 0.0, "rect"), (4, 6.0, "gaussian")],
)
def test_a_ramp_through_thick_slices_sits_where_the_lr_affine_says(factor, thickness_mm, profile):
    """Intensity = world position: each thick slice averages a symmetric profile, so it reads its centre's position."""
    affine = oblique_affine(spacing=(1.0, 1.0, 1.5))
    shape = (6, 5, 60)
    z = torch.from_numpy(world_coordinates(affine, shape)[2]).float()[None]  # world z depends on k only
    degradation = Degradation((1, 1, factor), slice_profile=profile, slice_thickness=thickness_mm)
    lr = degrade(Volume(z, affine, Modality.MR), degradation)
    m = lr_shape([60], [factor])[0]
    assert lr.spatial_shape == (6, 5, m)
    np.testing.assert_allclose(lr.affine, scale_affine(affine, (1, 1, m / 60)))
    expected = world_coordinates(lr.affine, lr.spatial_shape)[2]
    reach = math.ceil((thickness_mm or factor * 1.5) / 1.5 * (2 if profile == "gaussian" else 0.5)) + 1
    interior = slice(reach // math.floor(factor) + 1, -(reach // math.floor(factor) + 1))  # profile inside the volume
    np.testing.assert_allclose(lr.array[0, ..., interior].numpy(), expected[..., interior], atol=1e-4)


def test_slice_profiles_have_the_requested_thickness_and_gap():
    weights = profile_matrix(30, 10, profile="rect", fwhm=2.0)  # slices 2 voxels thick every 3: a 1-voxel gap
    assert torch.allclose(weights.sum(1), torch.ones(10, dtype=torch.float64))
    # Slice 4 is centred on HR voxel 13 and spans [12, 14]: voxels 11 and 15 fall in the gaps.
    torch.testing.assert_close(weights[4, 11:16], torch.tensor([0.0, 0.25, 0.5, 0.25, 0.0], dtype=torch.float64))
    assert torch.count_nonzero(weights[4]) == 3


@pytest.mark.parametrize("signal", [0.0, 1.0, 3.0, 20.0])
def test_rician_noise_has_the_rice_mean_and_spread(signal, rng):
    """Low SNR biases magnitude upwards (the Rician bias); the mean and std match scipy's Rice distribution."""
    sigma = 2.0
    noisy = rician(torch.full((1, 200, 200, 4), signal, dtype=torch.float64), sigma, rng)
    reference = stats.rice(b=signal / sigma, scale=sigma)
    assert float(noisy.mean()) == pytest.approx(reference.mean(), rel=0.01)
    assert float(noisy.std()) == pytest.approx(reference.std(), rel=0.02)


def test_ct_noise_has_the_requested_sigma_and_a_grain(rng):
    noisy = correlated_gaussian(torch.zeros(1, 128, 128, 4, dtype=torch.float64), 15.0, rng, grain=1.5)
    assert float(noisy.std()) == pytest.approx(15.0, rel=0.01)
    neighbour = float(torch.corrcoef(torch.stack([noisy[0, :-1].flatten(), noisy[0, 1:].flatten()]))[0, 1])
    assert neighbour > 0.3  # correlated, unlike white noise


def test_poisson_noise_variance_follows_the_photon_count(rng):
    image = torch.full((1, 300, 300, 1), 1000.0, dtype=torch.float64)
    noisy = poisson(image, 250.0, rng, reference=1000.0)  # 250 quanta at this intensity: SNR = sqrt(250)
    assert float(noisy.mean()) == pytest.approx(1000.0, rel=0.005)
    assert float(noisy.std()) == pytest.approx(1000.0 / math.sqrt(250.0), rel=0.02)


def test_ct_stays_in_hounsfield_units(rng):
    """Air stays -1000 HU and water 0 HU away from edges, through blur, aperture sampling, thick slices and noise."""
    array = torch.full((1, 64, 64, 30), -1000.0)
    array[:, 16:48, 16:48, :] = 0.0  # a water block in air
    affine = np.diag([0.5, 0.5, 1.0, 1.0])
    degradation = Degradation(
        (2, 2, 5), modality="CT", psf_fwhm=(1.0, 1.0, 0.0), slice_thickness=5.0, noise="gaussian", noise_sigma=10.0
    )
    lr = degrade(Volume(array, affine, Modality.CT), degradation, rng=rng)
    assert lr.spatial_shape == (32, 32, 6)
    np.testing.assert_allclose(lr.spacing, (1.0, 1.0, 5.0))
    water, air = lr.array[0, 12:20, 12:20], lr.array[0, :3, :3]
    assert abs(float(water.mean())) < 3 and abs(float(air.mean()) + 1000) < 3
    assert float(water.std()) == pytest.approx(10.0, rel=0.25)


def test_xray_binning_and_blur_keep_the_mean(rng):
    image = torch.from_numpy(rng.uniform(100, 200, (1, 80, 60, 1)))
    degradation = Degradation((2, 2, 1), modality="DX", psf_fwhm=(0.3, 0.3, 0.0))
    lr = degrade(Volume(image, np.diag([0.15, 0.15, 1, 1])), degradation)
    assert lr.spatial_shape == (40, 30, 1)
    assert float(lr.array.mean()) == pytest.approx(float(image.mean()), rel=1e-3)


def test_factors_for_a_target_spacing(phantom):
    assert factors_for_spacing(phantom, (1.8, 2.2, 2.0)) == pytest.approx((2.0, 2.0, 1.0))
    with pytest.raises(ValueError, match="finer"):
        factors_for_spacing(phantom, (0.5, 2.2, 2.0))


def test_random_degradations_need_an_rng_and_are_reproducible(phantom):
    degradation = Degradation((2, 2, 1), noise="rician", noise_sigma=0.05)
    with pytest.raises(ValueError, match="rng"):
        degrade(phantom, degradation)
    first = degrade(phantom, degradation, rng=np.random.default_rng(1)).array
    assert torch.equal(first, degrade(phantom, degradation, rng=np.random.default_rng(1)).array)
    assert not torch.equal(first, degrade(phantom, degradation, rng=np.random.default_rng(2)).array)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"modality": "PET"}, "PET"),
        ({"slice_profile": "sinc"}, "slice_profile"),
        ({"noise": "salt"}, "noise"),
        ({"noise": "rician"}, "noise_sigma"),
        ({"noise": "poisson", "modality": "DX"}, "photons"),
        ({"psf_fwhm": (1, 1)}, "psf_fwhm"),
        ({"noise": "gaussian", "noise_sigma": 1.0}, "not part of the MR"),
    ],
)
def test_bad_degradations_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Degradation(**kwargs)
