"""Trust maps (medsr.uncertainty): augmentations undo themselves, an equivariant upsampler has no spread, the
hallucination split finds a pattern a predictor adds (and nothing in an exactly consistent output), the conformal
factor covers what it promises, and sigma's fit recovers a known error model."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from medsr.cli import main
from medsr.consistency import kspace_consistency
from medsr.data import degrade_normalised
from medsr.degrade import Degradation
from medsr.evaluation import classical_upsample, evaluate
from medsr.io import read_volume, write_volume
from medsr.models.blocks import interpolate
from medsr.pipeline import upscale_file
from medsr.report import scores_text, write_evaluation
from medsr.samples import sample_path
from medsr.uncertainty import (
    LEVELS,
    MAPS,
    augmentations,
    conformal_factor,
    fit_sigma,
    hallucination,
    map_path,
    maps,
    spread,
)
from medsr.volume import Modality, Volume, crop

MR_X2 = Degradation(factors=(2, 2, 1), modality="MR")


def _brain_like(shape=(64, 48, 3), seed=0) -> Volume:
    """A smooth phantom with edges: ellipses of different intensities, plus mild texture, in [0, 1]."""
    rng = np.random.default_rng(seed)
    i, j = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    image = 0.8 * ((i / 0.8) ** 2 + (j / 0.7) ** 2 < 1) - 0.3 * ((i / 0.3) ** 2 + ((j - 0.2) / 0.2) ** 2 < 1)
    array = np.stack([image + 0.02 * rng.standard_normal(image.shape) for _ in range(shape[2])], axis=-1)
    return Volume(torch.from_numpy(array[None]).float(), np.diag([1.0, 1.2, 3.0, 1.0]), Modality.MR)


def _linear(batch: torch.Tensor) -> torch.Tensor:
    """An orientation-equivariant x2 upsampler of (N, C, I, J) planes (zero-fill is not quite: the Nyquist bins of
    an even grid go to one side)."""
    return interpolate(batch, (2, 2), "linear")


@pytest.mark.parametrize("scale", [(2, 2), (1, 4), (2, 2, 2)])
def test_each_augmentation_is_undone_exactly(scale):
    batch = torch.rand(2, 1, *(6 + d for d in range(len(scale))))
    for augmentation in augmentations(scale):
        torch.testing.assert_close(augmentation.undo(augmentation.apply(batch)), batch, rtol=0, atol=0)
    assert augmentations(scale)[0] == ((), 0)  # the identity first: the output is the plain prediction
    assert len(set(augmentations(scale))) == len(augmentations(scale))


def test_an_orientation_equivariant_upsampler_has_no_spread():
    lr = degrade_normalised(_brain_like(), MR_X2, rng=None)
    output, variance = spread(_linear, lr, model_scale=(2, 2), scale=(2, 2, 1), progress=False)
    assert float(variance.max()) < 1e-12
    torch.testing.assert_close(output.array, classical_upsample(lr, (2, 2, 1), "linear"), rtol=0, atol=1e-6)


def test_a_rotation_dependent_predictor_has_spread_where_it_differs():
    """A predictor that brightens the first rows of what it sees: turned, the rows are other image rows."""

    def biased(batch: torch.Tensor) -> torch.Tensor:
        out = _linear(batch)
        return out + torch.cat([torch.full_like(out[..., :4, :], 0.1), torch.zeros_like(out[..., 4:, :])], dim=-2)

    lr = degrade_normalised(_brain_like(), MR_X2, rng=None)
    _, variance = spread(biased, lr, model_scale=(2, 2), scale=(2, 2, 1), progress=False)
    border, centre = variance[0, :3].mean(), variance[0, 10:54, 10:38].max()  # output 64 x 48
    assert float(border) > 1e-3 > 1e6 * float(centre)


def test_an_exactly_consistent_output_has_no_residual():
    hr = _brain_like()
    lr = degrade_normalised(hr, MR_X2, rng=None)
    guess = hr.replace(array=hr.array + 0.05 * torch.randn_like(hr.array))  # any output, made consistent
    consistent_output = kspace_consistency(guess, lr, MR_X2)
    consistent, residual = hallucination(consistent_output, lr, MR_X2)
    assert float(residual.abs().max()) < 1e-5
    assert float(consistent.abs().mean()) > 1e-2  # the detail it adds is all on the consistent side


@pytest.mark.parametrize("frequency", ["low", "high"])
def test_the_maps_show_a_pattern_a_predictor_adds(frequency):
    """zero-fill + a fixed pattern: a smooth pattern contradicts the measured LR (residual), a pattern at the HR
    grid's Nyquist frequency is invisible to the scanner (consistent); the two maps always add up to it."""
    hr = _brain_like()
    lr = degrade_normalised(hr, MR_X2, rng=None)
    i, j = torch.meshgrid(torch.arange(64.0), torch.arange(48.0), indexing="ij")
    pattern = 0.1 * (torch.exp(-((i - 20) ** 2 + (j - 30) ** 2) / 50) if frequency == "low" else (-1) ** (i + j))
    sr = lr.replace(array=classical_upsample(lr, (2, 2, 1), "zerofill") + pattern[None, :, :, None])
    sr = sr.replace(affine=hr.affine)
    consistent, residual = hallucination(sr, lr, MR_X2)
    added = pattern[None, :, :, None].expand_as(consistent)
    torch.testing.assert_close(consistent + residual, added, rtol=0, atol=1e-5)
    shown, hidden = (residual, consistent) if frequency == "low" else (consistent, residual)
    assert float((shown - added).abs().max()) < 0.1 * 0.05 and float(hidden.abs().max()) < 0.1 * 0.05


def test_the_conformal_factor_covers_new_voxels_as_promised():
    rng = np.random.default_rng(1)
    sigma = rng.uniform(0.5, 3.0, 20000)
    calibration = np.abs(rng.standard_normal(20000))  # |error| / sigma of calibration voxels
    factor = conformal_factor(calibration, alpha=0.1)
    new_errors = np.abs(rng.standard_normal(20000) * sigma)
    assert 0.89 < float((new_errors <= factor * sigma).mean()) < 0.91
    assert factor == pytest.approx(1.645, abs=0.05)  # the normal 95th percentile
    assert conformal_factor(np.ones(5), alpha=0.1) == np.inf  # too few scores for 90 %
    with pytest.raises(ValueError, match="no calibration scores"):
        conformal_factor(np.array([]))


def test_sigma_fit_recovers_a_known_error_model():
    rng = np.random.default_rng(2)
    variance = torch.from_numpy(rng.uniform(0, 0.01, (1, 80, 80, 2)))
    error = torch.from_numpy(rng.standard_normal((1, 80, 80, 2))) * (9 * variance + 0.1**2).sqrt()
    a, b = fit_sigma(variance, error, torch.ones_like(variance, dtype=torch.bool))
    assert a == pytest.approx(3.0, rel=0.05) and b == pytest.approx(0.1, rel=0.1)


def test_maps_of_an_exact_upsampler_on_its_own_degradation():
    """An equivariant upsampler made k-space consistent: no spread, no residual, an interval of the given factor
    around the output."""
    lr = degrade_normalised(_brain_like(), MR_X2, rng=None)
    result = maps(_linear, lr, MR_X2, model_scale=(2, 2), scale=(2, 2, 1), consistency=True, factor=2.0, progress=False)
    assert float(result.spread.array.max()) < 1e-5 and float(result.residual.array.abs().max()) < 1e-5
    torch.testing.assert_close(result.upper.array - result.output.array, 2.0 * result.sigma.array)
    torch.testing.assert_close(result.output.array - result.lower.array, 2.0 * result.sigma.array)
    assert result.output.spatial_shape == (64, 48, 3) and result.sigma.spatial_shape == (64, 48, 3)


def test_a_scan_too_small_to_calibrate_itself_is_refused():
    lr = degrade_normalised(_brain_like((4, 4, 1)), MR_X2, rng=None)
    with pytest.raises(ValueError, match="too small to calibrate"):
        maps(_linear, lr, MR_X2, model_scale=(2, 2), scale=(2, 2, 1), consistency=True, progress=False)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("a/sr.nii.gz", "a/sr_lower.nii.gz"),
        ("sr.nii", "sr_lower.nii"),
        ("sr.tif", "sr_lower.tif"),
        ("a/sr", "a/sr_lower"),
    ],
)
def test_map_files_sit_beside_the_output(target, expected):
    assert str(map_path(target, "lower")) == expected


# What `medsr upscale --uncertainty` writes, on small real scans


@pytest.fixture(scope="module")
def mr_nifti(tmp_path_factory) -> Path:
    """A 64 x 56 x 2 crop of the Kmeans T1 head (slices 30-31), as NIfTI."""
    scan = read_volume(sample_path("mr_kmeans_t1"), modality="MR")
    path = tmp_path_factory.mktemp("mr") / "t1.nii.gz"
    write_volume(crop(scan, (32, 36, 30), (96, 92, 32)), path)
    return path


def test_upscale_writes_every_map_in_the_outputs_geometry(mr_nifti, tmp_path):
    """The output is the plain upscale's, voxel for voxel; each map has its grid; the k-space consistent output
    contradicts nothing; the calibrated bounds hold the output; the sidecar names the maps and the calibration."""
    target = tmp_path / "sr.nii.gz"
    assert main(["upscale", str(mr_nifti), str(target), "--uncertainty", "--precision", "fp32"]) == 0
    assert main(["upscale", str(mr_nifti), str(tmp_path / "plain.nii.gz"), "--precision", "fp32"]) == 0
    output, plain = (nib.load(tmp_path / name) for name in ("sr.nii.gz", "plain.nii.gz"))
    np.testing.assert_array_equal(output.get_fdata(), plain.get_fdata())
    maps = {name: nib.load(map_path(target, name)) for name in MAPS}
    for image in maps.values():
        assert image.shape == output.shape and image.get_data_dtype() == np.float32
        np.testing.assert_allclose(image.affine, output.affine, atol=1e-5)
    values = {name: image.get_fdata() for name, image in maps.items()}
    window = float(output.header["cal_max"] - output.header["cal_min"])
    assert np.abs(values["residual"]).max() < 1e-4 * window  # k-space consistency: nothing contradicts the input
    assert (values["uncertainty"] > 0).mean() > 0.99
    assert (values["lower"] <= output.get_fdata() + 1e-3).all() and (output.get_fdata() <= values["upper"] + 1e-3).all()
    sidecar = json.loads((tmp_path / "sr.json").read_text())
    assert sidecar["UncertaintyMaps"] == {name: map_path(target, name).name for name in MAPS}
    assert sidecar["IntervalCoverage"] == pytest.approx(0.9) and sidecar["IntervalFactor"] > 0


def test_dicom_maps_are_their_own_derived_series(tmp_path):
    """An MR series in: the output and each map a new series over the same geometry, none of them the source's."""
    from tests.test_dicom_write import source_series

    source = source_series(tmp_path / "mr", "MR_small.dcm", spacing=3.0, thickness=3.0)
    target = tmp_path / "sr"
    assert main(["upscale", str(source), str(target), "--uncertainty", "--precision", "fp32"]) == 0
    output = read_volume(target)
    series = {pydicom.dcmread(next(source.iterdir())).SeriesInstanceUID}
    for name in MAPS:
        folder = map_path(target, name)
        field = read_volume(folder)
        assert field.spatial_shape == output.spatial_shape
        np.testing.assert_allclose(field.affine, output.affine, atol=1e-3)
        header = pydicom.dcmread(next(folder.iterdir()))
        assert header.SeriesDescription.startswith(f"medsr {name} ") and header.SeriesInstanceUID not in series
        series.add(header.SeriesInstanceUID)


def test_an_existing_map_stops_the_run_before_anything_is_written(mr_nifti, tmp_path):
    map_path(tmp_path / "sr.nii.gz", "lower").write_bytes(b"someone's file")
    with pytest.raises(ValueError, match="sr_lower.nii.gz"):
        upscale_file(mr_nifti, tmp_path / "sr.nii.gz", uncertainty=True, precision="fp32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sr_lower.nii.gz"]


def test_a_failed_write_leaves_no_map_behind(mr_nifti, tmp_path, monkeypatch):
    import medsr.pipeline

    real = medsr.pipeline.write_volume

    def fail_on_the_output(volume, path, **options):
        if Path(path).name == "sr.nii.gz":
            raise OSError("disk full")
        real(volume, path, **options)

    monkeypatch.setattr(medsr.pipeline, "write_volume", fail_on_the_output)
    with pytest.raises(OSError, match="disk full"):
        upscale_file(mr_nifti, tmp_path / "sr.nii.gz", uncertainty=True, precision="fp32")
    assert list(tmp_path.iterdir()) == []


def test_evaluate_scores_the_maps_and_the_report_shows_them(tmp_path):
    """On an unseen subject: the rank correlation and the calibrated coverage are reported and plotted."""
    result = evaluate("edsr_mr_x2", "mr_rat_lung", uncertainty=True, precision="fp32")
    trusted = result.trust
    assert -1 <= trusted.spearman_body <= trusted.spearman_ceiling + 0.2 and trusted.spearman > 0.2
    assert list(trusted.coverage) == [f"{level:g}" for level in LEVELS]
    assert 0.7 < trusted.coverage["0.9"] <= 1.0
    assert "Spearman(sigma, |error|)" in scores_text(result)
    write_evaluation(result, tmp_path / "report")
    html = (tmp_path / "report" / "report.html").read_text()
    assert "Trust maps beside the true error" in html and "Calibration:" in html


def test_a_png_gets_float_tiff_maps(tmp_path):
    """PNG holds integers: the output stays an 8-bit PNG like its input, the maps are float32 TIFFs on its grid."""
    from PIL import Image

    scan = read_volume(sample_path("mr_rat_lung"), modality="MR")
    pixels = np.clip(scan.array[0, 32:96, 32:96, 0].numpy().T, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "lung.png")
    target = tmp_path / "sr.png"
    argv = ["upscale", str(tmp_path / "lung.png"), str(target), "--uncertainty", "--modality", "MR"]
    assert main([*argv, "--precision", "fp32"]) == 0
    output = np.array(Image.open(target))
    assert output.dtype == np.uint8 and output.shape == (128, 128)
    for name in MAPS:
        field = np.array(Image.open(map_path(target, name)))
        assert map_path(target, name).suffix == ".tif" and field.dtype == np.float32 and field.shape == output.shape
