from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from nibabel.affines import apply_affine

from medsr.degrade import Degradation, degrade
from medsr.degrade.sampling import lr_shape
from medsr.degrade.ultrasound import degrade_bmode, to_amplitude, to_bmode
from medsr.volume import Modality, Volume, scale_affine

RAYLEIGH_CONTRAST = math.sqrt(4 / math.pi - 1)  # std / mean of a Rayleigh amplitude: 0.523


def _us(array: np.ndarray, spacing: float = 0.1) -> Volume:
    affine = np.diag([spacing, spacing, 1.0, 1.0])
    affine[:3, 3] = (-12.0, 30.0, 5.0)
    return Volume(torch.as_tensor(array, dtype=torch.float32)[None, ..., None], affine, Modality.US)


def _speckle(psf: tuple[float, float, float], seed: int = 0, *, size: int = 512, value: float = 180.0) -> Volume:
    degradation = Degradation(modality="US", factors=(2, 2, 1), psf_fwhm=psf, noise="speckle")
    return degrade(_us(np.full((size, size), value)), degradation, rng=np.random.default_rng(seed))


def _intensity(volume: Volume, margin: int = 16) -> np.ndarray:
    """Echo intensity |field|^2 of a 2D B-mode volume, away from the edges (replicated padding)."""
    return to_amplitude(volume.array.double(), 60.0)[0, margin:-margin, margin:-margin, 0].numpy() ** 2


def _acf_fwhm(intensity: np.ndarray, axis: int) -> float:
    """FWHM (in pixels) of the normalised autocovariance of ``intensity`` along ``axis``: the speckle grain."""
    centred = intensity - intensity.mean()
    spectrum = np.fft.fft2(centred, s=[2 * n for n in centred.shape])  # zero-padded: a linear, not circular, ACF
    acf = np.fft.ifft2(np.abs(spectrum) ** 2).real
    profile = (acf[:, 0] if axis == 0 else acf[0, :]) / acf[0, 0]
    k = int(np.argmax(profile < 0.5))
    return 2 * (k - 1 + (profile[k - 1] - 0.5) / (profile[k - 1] - profile[k]))


def test_lr_shape_and_affine_cover_the_same_field_of_view():
    hr = _us(np.full((101, 60), 120.0), spacing=0.25)
    degradation = Degradation(modality="US", factors=(2, 2, 1), psf_fwhm=(1.0, 0.6, 0), noise="speckle")

    lr = degrade(hr, degradation, rng=np.random.default_rng(0))

    shape = lr_shape(hr.spatial_shape, degradation.factors)
    assert lr.spatial_shape == shape == (50, 30, 1)
    applied = [n / m for n, m in zip(hr.spatial_shape, shape, strict=True)]
    np.testing.assert_allclose(lr.affine, scale_affine(hr.affine, [1 / f for f in applied]))
    assert lr.modality is Modality.US and lr.array.dtype == torch.float32


def test_lr_values_sit_where_the_lr_affine_says():
    """Without PSF or speckle, a ramp in B-mode along i is averaged per LR pixel: the ramp at its centre."""
    spacing = 0.25
    ramp = np.repeat(50 + np.arange(90.0)[:, None], 40, axis=1)  # b = 50 + i
    hr = _us(ramp, spacing)
    lr = degrade(hr, Degradation(modality="US", factors=(3, 2, 1)))

    centres = apply_affine(lr.affine, np.stack(np.meshgrid(np.arange(30), np.arange(20), [0], indexing="ij"), -1))
    expected = 50 + (centres[..., 0] - hr.affine[0, 3]) / spacing  # world x -> HR index i -> value
    # interior only: the shared sampler renormalises the weights that fall outside the first and last HR voxel
    np.testing.assert_allclose(lr.array[0, 1:-1].numpy(), expected[1:-1], atol=1e-3)


def test_uniform_region_becomes_fully_developed_speckle():
    amplitude = np.sqrt(_intensity(_speckle((1.0, 0.6, 0.0))))
    contrast = amplitude.std() / amplitude.mean()
    assert contrast == pytest.approx(RAYLEIGH_CONTRAST, rel=0.1)


def test_speckle_grain_is_the_psf_and_grows_with_it():
    """The intensity autocovariance of speckle from a Gaussian PSF has the PSF's FWHM (Burckhardt 1978)."""
    lr_spacing = 0.2  # mm: HR 0.1 mm, factor 2
    grains = {}
    for psf in [(1.0, 0.6, 0.0), (2.0, 1.2, 0.0)]:
        intensity = _intensity(_speckle(psf))
        grains[psf] = [_acf_fwhm(intensity, axis) * lr_spacing for axis in (0, 1)]
        np.testing.assert_allclose(grains[psf], psf[:2], rtol=0.15)
    narrow, wide = grains.values()
    assert wide[0] > 1.5 * narrow[0] and wide[1] > 1.5 * narrow[1]
    assert narrow[0] > narrow[1]  # lateral grain is coarser than axial, as the PSF is


def test_speckle_keeps_the_echogenicity_of_each_region():
    """The unit-energy PSF keeps the mean echo intensity of a region: anatomy's contrast survives."""
    b = np.full((512, 512), 120.0)
    b[256:] = 200.0  # a bright half, 80 grey levels = 18.8 dB above the dark one
    degradation = Degradation(modality="US", factors=(2, 2, 1), psf_fwhm=(1.0, 0.6, 0), noise="speckle")
    lr = degrade(_us(b), degradation, rng=np.random.default_rng(1))

    intensity = to_amplitude(lr.array.double(), 60.0)[0, :, :, 0].numpy() ** 2
    for rows, value in [(slice(10, 110), 120.0), (slice(146, 246), 200.0)]:
        expected = float(to_amplitude(torch.tensor(value), 60.0)) ** 2
        assert intensity[rows, 10:-10].mean() == pytest.approx(expected, rel=0.1)


def test_black_background_stays_black():
    """Display value 0 is below the displayed range: no echo, so no speckle appears there."""
    b = np.zeros((128, 128))
    b[:48] = 150.0  # tissue at i < 48; the lateral PSF (4 sigma = 17 HR pixels) reaches i < 65
    degradation = Degradation(modality="US", factors=(2, 2, 1), psf_fwhm=(1.0, 0.6, 0), noise="speckle")
    out = degrade(_us(b), degradation, rng=np.random.default_rng(2)).array[0, :, :, 0]
    assert float(out[34:].abs().max()) == 0.0  # LR i >= 34: HR i >= 68
    assert float(out[:20].min()) > 0.0


def test_without_psf_or_downsampling_the_image_comes_back():
    b = np.random.default_rng(3).uniform(0, 255, size=(40, 30))
    out = degrade(_us(b), Degradation(modality="US", factors=(1, 1, 1)))
    np.testing.assert_allclose(out.array[0, :, :, 0].numpy(), b, atol=1e-4)
    with pytest.raises(ValueError, match="speckle' needs a PSF"):
        Degradation(modality="US", noise="speckle")


def test_speckle_has_no_bright_borders():
    """Fresh phases beyond the edges: the mean echo intensity at the image border equals the interior's."""
    b = np.full((120, 120), 200.0)
    degradation = Degradation(modality="US", factors=(1, 1, 1), psf_fwhm=(0.5, 0.5, 0.0), noise="speckle")
    intensity = [
        to_amplitude(degrade(_us(b), degradation, rng=np.random.default_rng(s)).array[0, :, :, 0].double(), 60.0) ** 2
        for s in range(8)
    ]
    mean = torch.stack(intensity).mean(0)
    border = torch.cat([mean[:6].flatten(), mean[-6:].flatten(), mean[6:-6, :6].flatten(), mean[6:-6, -6:].flatten()])
    assert float(border.mean()) == pytest.approx(float(mean[20:-20, 20:-20].mean()), rel=0.05)  # was 2.25x


def test_log_compression_round_trips_and_clips():
    b = torch.linspace(0, 255, 256, dtype=torch.float64)
    np.testing.assert_allclose(to_bmode(to_amplitude(b, 50.0), 50.0), b, atol=1e-9)
    assert float(to_bmode(torch.tensor([2.0]), 60.0)) == 255.0
    assert float(to_bmode(torch.tensor([0.0]), 60.0)) == 0.0


def test_output_stays_in_the_display_range():
    b = np.random.default_rng(4).choice([0.0, 255.0], size=(128, 96))  # extremes, where clipping matters
    for noise in ("none", "speckle"):
        degradation = Degradation(modality="US", factors=(2, 2, 1), psf_fwhm=(1.0, 0.6, 0), noise=noise)
        out = degrade(_us(b), degradation, rng=np.random.default_rng(0)).array
        assert float(out.min()) >= 0.0 and float(out.max()) <= 255.0


def test_speckle_is_reproducible_with_a_seed_and_changes_with_another():
    psf = (1.0, 0.6, 0.0)
    first, again, other = (_speckle(psf, seed, size=64).array for seed in (7, 7, 8))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, other)


def test_speckle_without_rng_is_refused():
    degradation = Degradation(modality="US", psf_fwhm=(1.0, 0.6, 0), noise="speckle")
    with pytest.raises(ValueError, match="rng"):
        degrade(_us(np.full((16, 16), 100.0)), degradation)
    with pytest.raises(ValueError, match="rng"):
        degrade_bmode(torch.full((1, 16, 16, 1), 100.0), (0.1, 0.1, 1.0), degradation, None)


def test_gaussian_noise_on_bmode_is_refused():
    with pytest.raises(ValueError, match="US takes 'speckle'"):
        Degradation(modality="US", noise="gaussian", noise_sigma=5.0)


def test_values_outside_the_display_range_are_refused():
    normalised_too_far = np.full((16, 16), 300.0)
    with pytest.raises(ValueError, match="0..255"):
        degrade(_us(normalised_too_far), Degradation(modality="US"))
