import numpy as np
import pytest
import torch

from medsr.degrade import Degradation
from medsr.evaluation import best_baseline, body_mask, compare_methods
from medsr.models.blocks import interpolate
from medsr.volume import Modality, Volume


@pytest.fixture
def head() -> Volume:
    """A smooth disc 'head' with texture, in air: 64x64 in-plane, 12 slices."""
    i, j = np.meshgrid(np.linspace(-1, 1, 64), np.linspace(-1, 1, 64), indexing="ij")
    disc = (i**2 + j**2 < 0.6).astype(np.float32) * (0.6 + 0.3 * np.sin(9 * i) * np.cos(7 * j))
    array = torch.from_numpy(np.repeat(disc[..., None], 12, axis=2))[None]
    return Volume(array, np.eye(4), Modality.MR)


def test_a_model_that_is_bicubic_scores_exactly_like_bicubic(head):
    rows, _, images = compare_methods(
        head, Degradation((2, 2, 1)), {"bicubic_model": lambda b: interpolate(b, (2, 2), "cubic")}, slices=(4, 10)
    )
    by_method = {row["method"]: row for row in rows}
    assert list(by_method) == ["nearest", "linear", "cubic", "zerofill", "bicubic_model"]
    for key in ("psnr", "ssim", "psnr_body", "ssim_body"):
        assert by_method["bicubic_model"][key] == pytest.approx(by_method["cubic"][key], abs=1e-5)
    assert by_method["nearest"]["psnr"] < by_method["linear"]["psnr"] < by_method["cubic"]["psnr"]
    assert images["lr"].shape == (6, 1, 32, 32) and images["hr"].shape == (6, 1, 64, 64)


def test_body_mask_excludes_air_and_lowers_psnr(head):
    hr = head.array.permute(3, 0, 1, 2)
    mask = body_mask(hr)
    assert 0.3 < float(mask.float().mean()) < 0.7
    rows, _, _ = compare_methods(head, Degradation((2, 2, 1)), {}, slices=(0, 12))
    assert all(row["psnr_body"] < row["psnr"] for row in rows)  # air is easy: leaving it out is stricter


def test_per_slice_scores_average_to_the_rows_and_extras_are_sane(head):
    rows, slices, _ = compare_methods(head, Degradation((2, 2, 1)), {}, slices=(0, 12), extras=True)
    cubic = [row for row in slices if row["method"] == "cubic"]
    assert [row["slice"] for row in cubic] == [*range(12), "0..11"]
    mean = next(row for row in rows if row["method"] == "cubic")
    assert mean["psnr"] == pytest.approx(np.mean([row["psnr"] for row in cubic[:12]]), rel=1e-6)
    assert mean["ssim3d"] == cubic[-1]["ssim3d"] and 0 < mean["ssim3d"] < 1
    assert all(0 < row["hfen"] < 1 for row in rows)  # relative error of the LoG-filtered slices


def test_lr_consistency_is_zero_for_the_truth_and_reported_for_every_method(phantom):
    """HR itself degrades to the (noise-free) LR exactly; interpolation does not."""
    from medsr.consistency import lr_rmse
    from medsr.data import degrade_normalised

    degradation = Degradation(factors=(2, 2, 1), modality="MR")
    hr = phantom.replace(array=phantom.array[:, :24, :20, :12])
    lr = degrade_normalised(hr, degradation, rng=None)
    assert lr_rmse(hr, lr, degradation) < 1e-6
    comparison = compare_methods(phantom, degradation, {}, slices=(4, 12), extras=True)
    rmse = {row["method"]: row["lr_rmse"] for row in comparison.rows}
    assert set(rmse) == {"nearest", "linear", "cubic", "zerofill"}
    assert all(rmse[method] > 1e-3 for method in ("nearest", "linear", "cubic"))
    # zero-filled k-space keeps the measured band: it re-degrades to the LR but for the Nyquist line of an even
    # matrix (its energy splits between +-m/2 in the real image, and truncation keeps one of them)
    assert rmse["zerofill"] < rmse["cubic"] / 5


@pytest.mark.parametrize(
    ("degradation", "strongest"),
    [
        (Degradation(factors=(2, 2, 1), modality="MR"), "zerofill"),
        (Degradation(factors=(2, 2, 1), modality="CT"), "lanczos"),
        (Degradation(factors=(2, 2, 1), modality="CR"), "lanczos"),
        (Degradation(factors=(1, 1, 4), modality="MR", slice_profile="gaussian"), "bspline"),
        (Degradation(factors=(1, 1, 3), modality="CT"), "bspline"),
    ],
)
def test_the_strongest_classical_baseline_is_scored_for_each_degradation(head, degradation, strongest):
    """The baseline a physicist would name for the degradation is scored on the same LR; the best baseline is the
    one with the highest PSNR, whichever it is."""
    rows = compare_methods(head, degradation, {}, slices=(0, 12)).rows
    assert [row["method"] for row in rows] == ["nearest", "linear", "cubic", strongest]
    best = max(rows, key=lambda row: row["psnr"])
    assert best_baseline(rows) == (best["method"], best["psnr"])


def test_classical_upsample_keeps_the_grid_and_constants(phantom):
    from medsr.evaluation import classical_upsample

    lr = phantom.replace(array=torch.full((1, 6, 5, 4), 0.5))
    for method, scale in (
        ("zerofill", (2, 2, 1)),
        ("lanczos", (2, 3, 1)),
        ("bspline", (1, 1, 3)),
        ("cubic", (2, 2, 2)),
    ):
        up = classical_upsample(lr, scale, method)
        assert up.shape == (1, 6 * scale[0], 5 * scale[1], 4 * scale[2])
        torch.testing.assert_close(up, torch.full_like(up, 0.5), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unknown baseline"):
        classical_upsample(lr, (2, 2, 1), "sinc")


def test_kspace_consistency_puts_the_measured_band_back(phantom):
    from medsr.consistency import kspace_consistency, lr_rmse
    from medsr.data import degrade_normalised

    degradation = Degradation(factors=(2, 2, 1), modality="MR")
    hr = phantom.replace(array=phantom.array[:, :24, :20, :12])
    lr = degrade_normalised(hr, degradation, rng=None)
    guess = hr.replace(array=hr.array + 0.1 * torch.randn(hr.array.shape, generator=torch.Generator().manual_seed(0)))
    fixed = kspace_consistency(guess, lr, degradation)
    assert lr_rmse(guess, lr, degradation) > 0.01 and lr_rmse(fixed, lr, degradation) < 1e-5
    # it only changes the measured band: closer to HR than the guess
    assert (fixed.array - hr.array).pow(2).mean() < (guess.array - hr.array).pow(2).mean()
    with pytest.raises(ValueError, match="rect k-space window"):
        kspace_consistency(guess, lr, Degradation(factors=(2, 2, 1), modality="MR", kspace_window="hann"))


@pytest.mark.parametrize("shape", [(24, 20), (22, 18), (30, 26)])  # LR sizes even/even, odd/odd, odd/odd at x2
def test_kspace_consistency_is_exact_in_one_pass_at_the_nyquist_bins(shape, monkeypatch):
    """The Nyquist bins of an even LR size (gain 1/2, 1/4 at the corner) are inverted in closed form: the measured
    band comes back to float64 precision with no fallback pass."""
    from medsr.consistency import kspace_consistency
    from medsr.degrade.sampling import kspace_truncate

    monkeypatch.setattr("medsr.consistency.KSPACE_ITERATIONS", 0)  # no fallback passes
    generator = torch.Generator().manual_seed(1)
    lr = Volume(torch.rand((1, shape[0] // 2, shape[1] // 2, 3), generator=generator, dtype=torch.float64), np.eye(4))
    guess = Volume(torch.rand((1, *shape, 3), generator=generator, dtype=torch.float64), np.eye(4))
    fixed = kspace_consistency(guess, lr, Degradation(factors=(2, 2, 1), modality="MR"))
    assert float((kspace_truncate(fixed.array, (2, 2, 1)) - lr.array).abs().max()) < 1e-12


def test_kspace_consistency_refuses_what_it_cannot_invert(phantom):
    from medsr.consistency import kspace_consistency

    for degradation in (
        Degradation(factors=(2, 2, 1), modality="MR", slice_thickness=3.0),
        Degradation(factors=(2, 2, 1), modality="MR", psf_fwhm=(1.0, 1.0, 0.0)),
        Degradation(factors=(2, 2, 1), modality="CT"),
    ):
        with pytest.raises(ValueError, match="k-space consistency needs"):
            kspace_consistency(phantom, phantom, degradation)
