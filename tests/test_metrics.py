"""Metrics against scikit-image and SciPy (the references), invariants, masks and errors.

skimage takes ``(image_true, image_test)``, the other way round from ours, so every call below passes
``(target, pred)`` to skimage and ``(pred, target)`` to medsr. 3D SSIM is the ``ssim`` of 5-D input, checked
against skimage on volumes in the tests below as well.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage
import scipy.stats
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from medsr.metrics import (
    _laplacian_of_gaussian,
    evaluate,
    hf_energy_ratio,
    hfen,
    paired_difference,
    psnr,
    ssim,
    ssim_map,
)

TOL = 1e-6


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _sk_ssim(pred: np.ndarray, target: np.ndarray, data_range: float) -> float:
    """skimage SSIM of one (C, *spatial) item, with the settings medsr reproduces."""
    return structural_similarity(
        target,
        pred,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=data_range,
        channel_axis=0,
    )


def _smooth_plus_noise(rng: np.random.Generator, spatial: tuple[int, ...], scale: float) -> tuple[np.ndarray, ...]:
    """A smooth HU-like phantom (target) and a noisy copy (pred), both (1, 1, *spatial) float64."""
    grids = np.meshgrid(*(np.linspace(-1, 1, s) for s in spatial), indexing="ij")
    target = scale * np.cos(2 * grids[0]) * np.exp(-sum(g**2 for g in grids)) - scale / 4
    pred = target + rng.normal(0, 0.05 * scale, spatial)
    return pred[None, None], target[None, None]


@pytest.mark.parametrize("shape", [(2, 1, 40, 37), (2, 1, 24, 20, 16), (1, 3, 32, 29)])
def test_psnr_matches_skimage(rng, shape):
    target = rng.random(shape)
    pred = target + rng.normal(0, 0.1, shape)
    ours = psnr(torch.from_numpy(pred), torch.from_numpy(target), data_range=1.0).numpy()
    ref = [peak_signal_noise_ratio(target[n], pred[n], data_range=1.0) for n in range(shape[0])]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)


@pytest.mark.parametrize("shape", [(2, 1, 40, 37), (2, 1, 24, 20, 16), (2, 3, 40, 37), (1, 2, 24, 20, 16)])
def test_ssim_matches_skimage_random(rng, shape):
    target = rng.random(shape)
    pred = np.clip(target + rng.normal(0, 0.2, shape), 0, 1)
    ours = ssim(torch.from_numpy(pred), torch.from_numpy(target), data_range=1.0).numpy()
    ref = [_sk_ssim(pred[n], target[n], 1.0) for n in range(shape[0])]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)


@pytest.mark.parametrize("spatial", [(48, 44), (24, 20, 16)])
def test_ssim_psnr_match_skimage_hu_range(rng, spatial):
    pred, target = _smooth_plus_noise(rng, spatial, 1000.0)
    p, t = torch.from_numpy(pred), torch.from_numpy(target)
    assert abs(ssim(p, t, data_range=4000.0).item() - _sk_ssim(pred[0], target[0], 4000.0)) < TOL
    assert abs(psnr(p, t, data_range=4000.0).item() - peak_signal_noise_ratio(target, pred, data_range=4000.0)) < TOL


def test_float32_inputs_keep_dtype_and_agree(rng):
    target = rng.random((1, 1, 30, 30)).astype(np.float32)
    pred = target + rng.normal(0, 0.1, target.shape).astype(np.float32)
    out = ssim(torch.from_numpy(pred), torch.from_numpy(target), data_range=1.0)
    assert out.dtype == torch.float32
    ref = _sk_ssim(pred[0].astype(np.float64), target[0].astype(np.float64), 1.0)
    assert abs(out.item() - ref) < TOL


@pytest.mark.parametrize("shape", [(2, 1, 16, 16), (1, 2, 12, 13, 14)])
def test_identities(rng, shape):
    x = torch.from_numpy(rng.random(shape))
    assert torch.allclose(ssim(x, x, data_range=1.0), torch.ones(shape[0], dtype=x.dtype), rtol=0, atol=1e-12)
    assert torch.isinf(psnr(x, x, data_range=1.0)).all()


def test_ssim_map_shape_and_grad(rng):
    pred = torch.from_numpy(rng.random((2, 3, 24, 20, 16))).requires_grad_()
    target = torch.from_numpy(rng.random((2, 3, 24, 20, 16)))
    smap = ssim_map(pred, target, data_range=1.0)
    assert smap.shape == (2, 3, 14, 10, 6)
    smap.mean().backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()


def test_all_true_mask_equals_unmasked(rng):
    shape = (2, 2, 24, 20, 16)
    pred, target = torch.from_numpy(rng.random(shape)), torch.from_numpy(rng.random(shape))
    mask = torch.ones(shape[2:], dtype=torch.bool)
    for metric in (psnr, ssim):
        masked = metric(pred, target, data_range=1.0, mask=mask)
        torch.testing.assert_close(masked, metric(pred, target, data_range=1.0), rtol=0, atol=1e-12)


def test_half_mask_psnr_by_hand(rng):
    shape = (2, 2, 40, 37)
    target = rng.random(shape)
    pred = target + rng.normal(0, 0.1, shape)
    mask = torch.zeros(2, 1, 40, 37, dtype=torch.bool)
    mask[..., :20, :] = True
    ours = psnr(torch.from_numpy(pred), torch.from_numpy(target), data_range=2.0, mask=mask).numpy()
    ref = [peak_signal_noise_ratio(target[n, :, :20], pred[n, :, :20], data_range=2.0) for n in range(2)]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)


def test_half_mask_ssim_is_masked_mean_of_map(rng):
    shape = (2, 2, 24, 20, 16)
    pred, target = torch.from_numpy(rng.random(shape)), torch.from_numpy(rng.random(shape))
    mask = torch.zeros(shape[2:], dtype=torch.bool)
    mask[:12] = True  # keeps cropped rows 5..11 of 24
    smap = ssim_map(pred, target, data_range=1.0)  # (N, C, 14, 10, 6)
    ref = smap[:, :, :7].flatten(1).mean(1)
    torch.testing.assert_close(ssim(pred, target, data_range=1.0, mask=mask), ref, rtol=0, atol=1e-12)


def test_evaluate_returns_float_row(rng):
    pred, target = _smooth_plus_noise(rng, (24, 20, 16), 1.0)
    scores = evaluate(torch.from_numpy(pred[0]), torch.from_numpy(target[0]), data_range=1.5)
    assert set(scores) == {"psnr", "ssim", "hfen"} and all(type(v) is float for v in scores.values())
    assert math.isclose(scores["ssim"], _sk_ssim(pred[0], target[0], 1.5), rel_tol=0, abs_tol=TOL)
    body = torch.from_numpy(np.abs(target[0]) > 0.1)  # (1, *spatial) mask
    masked = evaluate(torch.from_numpy(pred[0]), torch.from_numpy(target[0]), data_range=1.5, mask=body)
    assert masked["psnr"] != scores["psnr"]


def test_data_range_is_required():
    x = torch.rand(1, 1, 16, 16)
    with pytest.raises(TypeError):
        psnr(x, x)
    with pytest.raises(TypeError):
        ssim(x, x)
    with pytest.raises(TypeError):
        evaluate(x[0], x[0])


def test_errors():
    x = torch.rand(1, 1, 16, 16)
    with pytest.raises(ValueError, match=r"same shape.*\(1, 1, 16, 16\).*\(1, 1, 16, 15\)"):
        psnr(x, x[..., :15], data_range=1.0)
    with pytest.raises(ValueError, match=r"at least 11 voxels.*\(1, 1, 16, 10\)"):
        ssim(x[..., :10], x[..., :10], data_range=1.0)
    with pytest.raises(ValueError, match="data_range must be > 0"):
        psnr(x, x, data_range=0.0)
    nan = x.clone()
    nan[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ssim(nan, x, data_range=1.0)
    empty = torch.zeros(16, 16, dtype=torch.bool)
    for metric in (psnr, ssim):
        with pytest.raises(ValueError, match="mask selects no voxels"):
            metric(x, x, data_range=1.0, mask=empty)
    border_only = torch.zeros(16, 16, dtype=torch.bool)
    border_only[:5] = True  # non-empty, but empty once SSIM's 5-voxel border is cropped
    with pytest.raises(ValueError, match="mask selects no voxels"):
        ssim(x, x, data_range=1.0, mask=border_only)
    with pytest.raises(ValueError, match="does not broadcast"):
        psnr(x, x, data_range=1.0, mask=torch.ones(15, 16, dtype=torch.bool))


def _scipy_hfen(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> list[float]:
    """HFEN of each (C, *spatial) item from scipy.ndimage.gaussian_laplace: 15 taps at sigma 1.5, mirrored borders."""

    def log(image: np.ndarray) -> np.ndarray:
        return np.stack([scipy.ndimage.gaussian_laplace(c, 1.5, mode="mirror", truncate=14 / 3) for c in image])

    keep = np.ones(pred.shape[2:], dtype=bool) if mask is None else mask
    return [
        np.linalg.norm((log(p) - log(t))[:, keep]) / np.linalg.norm(log(t)[:, keep])
        for p, t in zip(pred, target, strict=True)
    ]


@pytest.mark.parametrize("shape", [(2, 1, 40, 37), (1, 2, 30, 33), (2, 1, 24, 20, 16)])
def test_hfen_matches_scipy(rng, shape):
    pred, target = _smooth_plus_noise(rng, shape[2:], 1000.0)
    target = np.repeat(target, shape[0], 0).repeat(shape[1], 1) + rng.normal(0, 10.0, shape)
    pred = target + rng.normal(0, 50.0, shape)
    ours = hfen(torch.from_numpy(pred), torch.from_numpy(target)).numpy()
    np.testing.assert_allclose(ours, _scipy_hfen(pred, target), rtol=1e-10, atol=0)
    mask = np.zeros(shape[2:], dtype=bool)
    mask[3:17, 5:] = True
    masked = hfen(torch.from_numpy(pred), torch.from_numpy(target), mask=torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(masked, _scipy_hfen(pred, target, mask), rtol=1e-10, atol=0)


@pytest.mark.parametrize("spatial", [(31, 29), (17, 19, 21)])
def test_log_kernel_has_15_taps_per_axis_at_sigma_1_5(spatial):
    impulse = torch.zeros(1, 1, *spatial, dtype=torch.float64)
    centre = tuple(s // 2 for s in spatial)
    impulse[(0, 0, *centre)] = 1.0
    support = torch.nonzero(_laplacian_of_gaussian(impulse, 1.5)[0, 0])  # (voxels, spatial_dims)
    for axis, c in enumerate(centre):
        assert (support[:, axis].min().item(), support[:, axis].max().item()) == (c - 7, c + 7)


def test_hfen_invariants(rng):
    target = torch.from_numpy(rng.random((2, 1, 24, 20, 16)))
    pred = target + 0.1 * torch.from_numpy(rng.standard_normal(target.shape))
    assert torch.equal(hfen(target, target), torch.zeros(2, dtype=torch.float64))
    assert (hfen(pred, target) > 0).all()
    # a ratio of norms: intensity scale and units do not matter, so it takes no data_range
    torch.testing.assert_close(hfen(1000 * pred, 1000 * target), hfen(pred, target), rtol=1e-12, atol=0)
    all_true = torch.ones(target.shape[2:], dtype=torch.bool)
    torch.testing.assert_close(hfen(pred, target, mask=all_true), hfen(pred, target), rtol=1e-12, atol=0)
    smoother = torch.nn.functional.avg_pool3d(target, 3, stride=1, padding=1, count_include_pad=False)
    assert (hfen(smoother, target) > hfen(target + 0.01 * (smoother - target), target)).all()
    assert hfen(pred.float(), target.float()).dtype == torch.float32


def test_hfen_errors():
    x = torch.rand(1, 1, 16, 16)
    with pytest.raises(ValueError, match=r"more than 7 voxels.*\(1, 2, 16, 7\)"):
        hfen(x[..., :7], x[..., :7])
    with pytest.raises(ValueError, match="sigma must be > 0"):
        hfen(x, x, sigma=0.0)
    with pytest.raises(ValueError, match="same shape"):
        hfen(x, x[..., :15])


def test_paired_difference_matches_scipy_t_interval(rng):
    bicubic = rng.normal(30.0, 2.0, 12)
    model = bicubic + rng.normal(0.8, 0.5, 12)
    result = paired_difference(torch.from_numpy(model), list(bicubic), confidence=0.9)
    difference = model - bicubic
    assert result.n == 12
    assert math.isclose(result.mean, difference.mean(), rel_tol=1e-12)
    assert math.isclose(result.std, difference.std(ddof=1), rel_tol=1e-12)
    low, high = scipy.stats.t.interval(0.9, 11, loc=difference.mean(), scale=scipy.stats.sem(difference))
    assert math.isclose(result.low, low, rel_tol=1e-12) and math.isclose(result.high, high, rel_tol=1e-12)
    assert result.low < result.mean < result.high
    wider = paired_difference(model, bicubic)  # 95 % by default
    assert wider.low < result.low and wider.high > result.high
    two = paired_difference([1.0, 3.0], [0.0, 0.0])  # t_{0.975, 1} = 12.706, std 1.414, sem 1
    assert math.isclose(two.high - two.mean, 12.7062047361747, rel_tol=1e-9)


def test_paired_difference_errors():
    with pytest.raises(ValueError, match=r"same length.*\(3,\) and \(2,\)"):
        paired_difference([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least 2 pairs, got 1"):
        paired_difference([1.0], [2.0])
    with pytest.raises(ValueError, match="inf or NaN"):
        paired_difference([1.0, math.inf], [2.0, 3.0])
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\)"):
        paired_difference([1.0, 2.0], [2.0, 3.0], confidence=95)


def test_hf_energy_ratio_counts_energy_beyond_the_lr_band(rng):
    from medsr.degrade.sampling import kspace_truncate, kspace_upsample

    target = torch.from_numpy(rng.random((2, 1, 32, 32)))
    assert torch.allclose(hf_energy_ratio(target, target, factors=(2, 2)), torch.ones(2, dtype=torch.float64))
    band_limited = kspace_upsample(kspace_truncate(target, (2, 2)), (32, 32))  # nothing beyond the LR band
    assert torch.all(hf_energy_ratio(band_limited, target, factors=(2, 2)) < 1e-20)
    noisy = target + 0.3 * torch.from_numpy(rng.standard_normal(target.shape))
    ratio = hf_energy_ratio(noisy, target, factors=(2, 2))
    assert torch.all(ratio > 1.2)
    assert torch.allclose(hf_energy_ratio(3 * noisy, 3 * target, factors=(2, 2)), ratio)
    with pytest.raises(ValueError, match="one > 1"):
        hf_energy_ratio(target, target, factors=(1, 1))
    # per axis: a band limit along i only leaves the j detail, which a factor along j counts
    along_i = kspace_upsample(kspace_truncate(target, (2, 1)), (32, 32))
    assert torch.all(hf_energy_ratio(along_i, target, factors=(2, 1)) < 1e-20)
    assert torch.all(hf_energy_ratio(along_i, target, factors=(1, 2)) > 0.4)  # ~0.5 of white noise's j detail
