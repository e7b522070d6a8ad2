import hashlib
import json

import numpy as np
import pytest
import torch

import medsr
from medsr.cli import main
from medsr.degrade import Degradation
from medsr.evaluation import best_baseline, body_mask, compare_methods, evaluate, evaluate_pair, scan_digest
from medsr.models.blocks import interpolate
from medsr.report import SCORE_COLUMNS
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


def test_slices_of_air_or_with_body_only_at_the_edge_are_not_scored(head):
    """A slice of air and one whose only tissue is a strip at the edge (inside SSIM's border, where it has no
    window: its body SSIM is undefined) are left out; the other slices score as they do alone."""
    array = head.array.clone()
    array[..., 0] = 0
    array[..., 1] = 0
    array[:, :2, :, 1] = 0.8  # tissue in the first 2 rows only: with the mask's 2-voxel margin, within SSIM's 5
    rows, slices, _ = compare_methods(head.replace(array=array), Degradation((2, 2, 1)), {}, slices=(0, 6))
    alone, _, _ = compare_methods(head, Degradation((2, 2, 1)), {}, slices=(2, 6))
    assert [row["slice"] for row in slices if row["method"] == "cubic"] == [2, 3, 4, 5]
    for row, reference in zip(rows, alone, strict=True):
        assert row["psnr_body"] == pytest.approx(reference["psnr_body"]) and row["ssim_body"] == pytest.approx(
            reference["ssim_body"]
        )


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kspace_consistency_checks_itself_in_k_space_without_a_fallback_pass(dtype, monkeypatch):
    """The one pass meets the tolerance at the output's precision (float32: float32 FFTs), so the image-domain
    passes through T never run; the output still degrades to the LR."""
    from medsr.consistency import kspace_consistency
    from medsr.degrade.sampling import kspace_truncate

    def refused(*args, **kwargs):
        raise AssertionError("a fallback pass ran")

    generator = torch.Generator().manual_seed(2)
    lr = Volume(torch.rand((1, 64, 48, 2), generator=generator).to(dtype), np.eye(4))
    guess = Volume(torch.rand((1, 128, 96, 2), generator=generator).to(dtype), np.eye(4))
    degradation = Degradation(factors=(2, 2, 1), modality="MR")
    kspace_consistency(guess, lr, degradation)  # the band's gain G is measured (through T) once per shape
    monkeypatch.setattr("medsr.consistency.kspace_truncate", refused)
    fixed = kspace_consistency(guess, lr, degradation)
    assert fixed.array.dtype == dtype
    error = float((kspace_truncate(fixed.array.double(), (2, 2, 1)) - lr.array.double()).abs().max())
    assert error < (1e-5 if dtype == torch.float32 else 1e-12)


def test_kspace_consistency_refuses_what_it_cannot_invert(phantom):
    from medsr.consistency import kspace_consistency

    for degradation in (
        Degradation(factors=(2, 2, 1), modality="MR", slice_thickness=3.0),
        Degradation(factors=(2, 2, 1), modality="MR", psf_fwhm=(1.0, 1.0, 0.0)),
        Degradation(factors=(2, 2, 1), modality="CT"),
    ):
        with pytest.raises(ValueError, match="k-space consistency needs"):
            kspace_consistency(phantom, phantom, degradation)


def test_errors_in_physical_units_are_the_normalised_errors_times_the_window_width(head):
    from medsr.intensity import Window

    hr = head.replace(meta={"window": Window(-100.0, 300.0)})
    comparison = compare_methods(hr, Degradation((2, 2, 1)), {}, slices=(0, 12))
    for row in comparison.slices:  # per slice: RMSE in the mask is what PSNR in the mask says, times the width
        assert row["rmse_body"] == pytest.approx(400 * 10 ** (-row["psnr_body"] / 20), rel=1e-4)
        assert 0 < row["mae_body"] <= row["rmse_body"]
    assert "rmse_body" not in compare_methods(head, Degradation((2, 2, 1)), {}, slices=(0, 12)).rows[0]


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_scan_digest_is_sha256sum_of_a_file_and_of_a_folders_files_in_sorted_order(tmp_path):
    (tmp_path / "series" / "b").mkdir(parents=True)
    for name, data in (("b/1.dcm", b"third"), ("a-2.dcm", b"first"), ("a.dcm", b"second")):  # sorted: a-2, a., b/
        (tmp_path / "series" / name).write_bytes(data)
    assert scan_digest(tmp_path / "series") == hashlib.sha256(b"firstsecondthird").hexdigest()
    assert scan_digest(tmp_path / "series" / "a.dcm") == hashlib.sha256(b"second").hexdigest()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A real-looking LR/HR pair: a 120x120x4 crop of Colin27 (HR) and its LR simulated as edsr_mr_x2 was trained,
    both written as float32 NIfTI."""
    from medsr.samples import sample_path
    from medsr.volume import crop

    folder = tmp_path_factory.mktemp("pair")
    scan = crop(medsr.read_volume(sample_path("colin27"), modality="MR"), (30, 40, 90), (150, 160, 94))
    hr = scan.replace(array=scan.array.contiguous(), meta={})
    medsr.write_volume(hr, folder / "hr.nii.gz")
    medsr.write_volume(medsr.degrade(hr, medsr.load_model("edsr_mr_x2").degradation), folder / "lr.nii.gz")
    return folder / "lr.nii.gz", folder / "hr.nii.gz"


def test_a_real_pair_scores_as_the_lr_simulated_from_its_hr(pair):
    """Nothing is simulated for a pair: given the LR the model's degradation makes, every score is what evaluate
    gives on the HR alone (same window, same LR up to float rounding)."""
    lr, hr = pair
    real = evaluate_pair("edsr_mr_x2", lr, hr, precision="fp32")
    simulated = evaluate("edsr_mr_x2", hr, precision="fp32")
    assert real.lr == str(lr) and simulated.lr is None and real.slab == simulated.slab
    assert (real.window.lo, real.window.hi) == pytest.approx((simulated.window.lo, simulated.window.hi))
    assert [row["method"] for row in real.comparison.rows] == [row["method"] for row in simulated.comparison.rows]
    for ours, theirs in zip(real.comparison.slices, simulated.comparison.slices, strict=True):
        assert ours.keys() == theirs.keys() and ours["slice"] == theirs["slice"]
        for key in ours.keys() - {"method", "slice"}:
            assert ours[key] == pytest.approx(theirs[key], rel=1e-3, abs=1e-4), (ours["method"], key)
    assert {row["slice"] for row in real.comparison.slices} == {0, 1, 2, 3, "0..3"}  # slab-wide scores: one row
    assert real.sources == {str(p.resolve()): _sha256(p) for p in (lr, hr)}
    assert real.card.startswith("# Model card: edsr_mr_x2") and len(real.weights_sha256) == 64


def test_evaluate_a_real_pair_from_the_command_line(pair, tmp_path, capsys):
    lr, hr = pair
    out = tmp_path / "report"
    assert main(["evaluate", "--lr", str(lr), "--hr", str(hr), "--out", str(out), "--precision", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert f"with its real LR {lr} (nothing simulated)" in printed and "rmse_body[a.u.]" in printed
    scores = json.loads((out / "scores.json").read_text())
    assert [row["method"] for row in scores][-1] == "edsr_mr_x2" and scores[0]["error_unit"] == "a.u."
    assert (out / "scores.csv").read_text().startswith(",".join([*SCORE_COLUMNS, "error_unit"]) + "\n")
    html = (out / "report.html").read_text()
    for text in (
        "the LR is a real acquisition",
        "Misregistration or motion between the two acquisitions lowers every method",
        f"medsr evaluate --lr {lr} --hr {hr} --out {out} --precision fp32",  # provenance
        f"{_sha256(hr)}  {hr.resolve()}",
        f"{_sha256(lr)}  {lr.resolve()}",
        "Model weights SHA-256",
        "# Model card: edsr_mr_x2",
        "RMSE body (a.u.)",
        "HF energy / HR",
        "LR consistency RMSE",
        "slices 0, 2, 3",  # the figures show three slices spread over the slab
    ):
        assert text in html, text


def test_a_pair_that_does_not_share_a_field_of_view_is_a_one_line_error(pair, tmp_path, capsys):
    lr, hr = pair
    volume = medsr.read_volume(lr)
    cut, moved = tmp_path / "cut.nii.gz", tmp_path / "moved.nii.gz"
    medsr.write_volume(volume.replace(array=volume.array[:, :, 1:].contiguous()), cut)
    shifted = volume.affine.copy()
    shifted[:3, 3] += (3.0, 0.0, 0.0)  # 3 mm: more than half an HR voxel
    medsr.write_volume(volume.replace(affine=shifted), moved)
    for low, problem in (
        (cut, "HR shape (120, 120, 4) is not LR shape (60, 59, 4) x scale = (120, 118, 4)"),
        (moved, "fields of view 3 mm apart at a corner (tolerance 0.5 mm)"),
    ):
        assert main(["evaluate", "--lr", str(low), "--hr", str(hr), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err == f"medsr evaluate: error: LR {low} and HR {hr} are not a pair at scale 2x2x1: {problem}\n"
    assert main(["evaluate", "--lr", str(lr)]) == 2
    assert "needs both --lr and --hr" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_slices_of_air_are_not_scored(head):
    """A slab whose first slices are air: only the slices with some body count, in the rows and per slice."""
    array = head.array.clone()
    array[..., :4] = 0
    rows, slices, _ = compare_methods(head.replace(array=array), Degradation((2, 2, 1)), {}, slices=(0, 12))
    assert [row["slice"] for row in slices if row["method"] == "cubic"] == list(range(4, 12))
    assert all(np.isfinite(row["psnr_body"]) for row in rows)
    with pytest.raises(ValueError, match="nothing to score"):
        compare_methods(head.replace(array=torch.zeros_like(array)), Degradation((2, 2, 1)), {}, slices=(0, 12))


def test_a_through_plane_model_is_scored_across_the_rows_of_a_coronal_image():
    """The dipy coronal T1 (rows head to foot): its rows thinned x4 and restored, scored as one plane."""
    result = evaluate("edsr_mr_slices_x4", "mr_t1_coronal", precision="fp32", slice_axis=1)
    assert str(result.slab) == "j 0..255" and result.comparison.images["hr"].shape == (1, 1, 256, 256)
    assert result.comparison.images["lr"].shape == (1, 1, 256, 64)
    rows = {row["method"]: row for row in result.comparison.rows}
    assert list(rows) == ["nearest", "linear", "cubic", "bspline", "edsr_mr_slices_x4"]
    assert [row["slice"] for row in result.comparison.slices if row["method"] == "bspline"] == ["0..255"]
    assert rows["edsr_mr_slices_x4"]["psnr"] > best_baseline(result.comparison.rows)[1]


def test_only_a_through_plane_model_is_scored_across_another_axis():
    with pytest.raises(ValueError, match="upsamples in-plane"):
        evaluate("edsr_mr_x2", "mr_t1_coronal", slice_axis=1)
    with pytest.raises(ValueError, match="trained on part of it"):
        evaluate("edsr_mr_slices_x4", "colin27", (110, 150), slice_axis=1)


def test_evaluate_across_the_rows_from_the_command_line(capsys):
    assert main(["evaluate", "--model", "edsr_mr_slices_x4", "--scan", "mr_rat_lung", "--slice-axis", "j"]) == 0
    out = capsys.readouterr().out
    assert "held-out slab j 0..127" in out and "its j axis taking the place of k" in out and "bspline" in out
    assert main(["evaluate", "--model", "edsr_mr_x2", "--scan", "mr_rat_lung", "--slice-axis", "j"]) == 2
    assert "upsamples in-plane" in capsys.readouterr().err
