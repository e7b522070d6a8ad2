"""End-to-end tests of the `medsr` commands on small real data (a crop of Colin27)."""

import json

import numpy as np
import pydicom
import pytest
import torch

import medsr
from medsr.cli import main
from medsr.data import prepare_scan
from medsr.degrade import Degradation
from medsr.intensity import default_window, normalize
from medsr.io import read_volume, write_volume
from medsr.metrics import psnr
from medsr.samples import sample_path
from medsr.volume import Volume, scale_affine, world_coordinates


@pytest.fixture(scope="module")
def colin_crop(tmp_path_factory):
    """A 64x64x4 crop of Colin27 through the ventricles, with the affine moved to the crop (real MRI texture)."""
    colin = read_volume(sample_path("colin27"))
    corner = np.array([58, 80, 90])
    shift = np.eye(4)
    shift[:3, 3] = corner
    crop = colin.replace(array=colin.array[:, 58:122, 80:144, 90:94], affine=colin.affine @ shift)
    path = tmp_path_factory.mktemp("colin") / "crop.nii.gz"
    write_volume(crop, path)
    return path


def test_info_prints_geometry(colin_crop, capsys):
    assert main(["info", str(colin_crop)]) == 0
    assert "shape=(64, 64, 4)" in capsys.readouterr().out


def test_simulate_then_upscale_keeps_the_field_of_view(colin_crop, tmp_path):
    lr_path, sr_path = tmp_path / "lr.nii.gz", tmp_path / "sr.nii.gz"
    assert main(["simulate", str(colin_crop), str(lr_path), "--modality", "MR", "--factors", "2,2,1"]) == 0
    hr, lr = read_volume(colin_crop), read_volume(lr_path)
    assert lr.spatial_shape == (32, 32, 4)
    np.testing.assert_allclose(lr.affine, scale_affine(hr.affine, (0.5, 0.5, 1)))
    assert main(["upscale", str(lr_path), str(sr_path), "--scale", "2,2,1"]) == 0
    sr = read_volume(sr_path)
    assert sr.spatial_shape == hr.spatial_shape
    np.testing.assert_allclose(sr.affine, hr.affine, atol=1e-5)  # same grid as the HR scan: same FOV
    assert float((sr.array - hr.array).abs().mean()) < float((lr.array.mean() - hr.array).abs().mean())


def test_simulate_ct_thick_slices_keeps_hu_and_geometry(tmp_path):
    """`medsr simulate IN OUT --modality CT --slice-thickness 5` on the real head CT (1.5 mm slices)."""
    source, output, figure = sample_path("cranium_ct"), tmp_path / "thick.nii.gz", tmp_path / "ct.png"
    args = ["simulate", str(source), str(output), "--modality", "CT", "--slice-thickness", "5", "--figure", str(figure)]
    assert main(args) == 0
    hr, lr = read_volume(source), read_volume(output)
    m = round(108 / (5 / 1.5))  # 32 slices: the 162 mm slab at an increment of 5.06 mm
    assert lr.spatial_shape == (256, 256, m)
    np.testing.assert_allclose(lr.affine, scale_affine(hr.affine, (1, 1, m / 108)), atol=1e-5)
    assert float(lr.array.min()) >= float(hr.array.min()) - 1e-3  # averaging HU never undershoots air
    assert abs(float(lr.array.mean()) - float(hr.array.mean())) < 5  # HU, not normalised units
    assert figure.stat().st_size > 10_000


def test_simulate_mr_to_a_target_spacing_with_noise(colin_crop, tmp_path):
    output = tmp_path / "lr.nii.gz"
    args = [
        "simulate",
        str(colin_crop),
        str(output),
        "--modality",
        "MR",
        "--spacing",
        "2,2,2",
        "--noise",
        "rician",
        "--noise-sigma",
        "2",
    ]
    assert main(args) == 0
    lr = read_volume(output)
    assert lr.spatial_shape == (32, 32, 2)
    np.testing.assert_allclose(lr.spacing, (2, 2, 2))


def test_simulate_ultrasound_dicom_to_a_coarser_probe(tmp_path):
    """The real echo frame: cropped to its US region, x2 with a wider PSF and new speckle, geometry kept."""
    source, output = sample_path("us_echo"), tmp_path / "lr.nii.gz"
    args = ["simulate", str(source), str(output), "--factors", "2,2,1", "--psf-fwhm", "3,1.5,0", "--noise", "speckle"]
    assert main(args) == 0
    hr, lr = read_volume(source), read_volume(output)
    assert hr.spatial_shape == (997, 721, 1) and lr.spatial_shape == (498, 360, 1)
    np.testing.assert_allclose(lr.affine, scale_affine(hr.affine, (498 / 997, 360 / 721, 1)), atol=1e-6)
    assert 0 <= float(lr.array.min()) and float(lr.array.max()) <= 255


def test_simulate_needs_a_modality_for_nifti(colin_crop, tmp_path, capsys):
    assert main(["simulate", str(colin_crop), str(tmp_path / "lr.nii.gz"), "--factors", "2,2,1"]) == 2
    assert "--modality" in capsys.readouterr().err and not (tmp_path / "lr.nii.gz").exists()


def test_upscale_keeps_world_coordinates_with_the_shipped_model(tmp_path):
    """A volume whose intensity is its own world x: the SR output's values follow its own affine. (A ramp is no
    scanner's k-space reconstruction: it is not periodic, so k-space consistency would ring at its edges.)"""
    affine = np.array([[0.0, -1.2, 0, 30], [1.2, 0, 0, -20], [0, 0, 2.0, 5], [0, 0, 0, 1]])  # rotated in-plane
    shape = (40, 36, 2)
    x = torch.from_numpy(world_coordinates(affine, shape)[0]).float()[None]
    write_volume(Volume(x + 100, affine), tmp_path / "ramp.nii.gz")
    assert main(["upscale", str(tmp_path / "ramp.nii.gz"), str(tmp_path / "sr.nii.gz"), "--no-kspace-consistency"]) == 0
    sr = read_volume(tmp_path / "sr.nii.gz")
    expected = world_coordinates(sr.affine, sr.spatial_shape)[0] + 100
    interior = (slice(8, -8), slice(8, -8), slice(None))
    error = np.abs(sr.array[0].numpy() - expected)[interior]
    assert np.median(error) < 0.1  # mm, against a voxel of 0.6 mm: data and geometry agree


def test_upscale_png_gives_png_of_twice_the_size(tmp_path):
    from PIL import Image

    colin = read_volume(sample_path("colin27"))
    pixels = colin.array[0, 40:140, 50:170, 120].numpy().T.round().astype(np.uint8)  # (rows, columns)
    Image.fromarray(pixels).save(tmp_path / "slice.png")
    assert main(["upscale", str(tmp_path / "slice.png"), str(tmp_path / "sr.png")]) == 0
    with Image.open(tmp_path / "sr.png") as image:
        assert image.mode == "L" and image.size == (200, 240)


def test_upscale_dicom_warns_about_modality_and_keeps_geometry(tmp_path, capsys):
    source = pydicom.data.get_testdata_file("CT_small.dcm")
    assert main(["upscale", source, str(tmp_path / "sr.nii.gz"), "--model", "edsr_mr_x2"]) == 0
    assert "trained on MR" in capsys.readouterr().err
    lr, sr = read_volume(source), read_volume(tmp_path / "sr.nii.gz")
    assert sr.spatial_shape == (256, 256, 1)
    np.testing.assert_allclose(sr.affine, scale_affine(lr.affine, (2, 2, 1)), atol=1e-5)


def test_upscale_picks_the_shipped_model_of_the_modality_and_warns_outside_its_spacing(tmp_path, capsys):
    source = pydicom.data.get_testdata_file("CT_small.dcm")  # CT, 0.66 mm pixels; the CT model saw 1.9 mm LR pixels
    assert main(["upscale", source, str(tmp_path / "sr.nii.gz")]) == 0
    err = capsys.readouterr().err
    assert "model edsr_ct_x2" in err and "trained on MR" not in err and "intensit" not in err
    assert "spacing along i is 0.661 mm; the model was trained on 1.91 mm" in err
    assert read_volume(tmp_path / "sr.nii.gz").spatial_shape == (256, 256, 1)


def test_upscale_a_digital_radiograph_uses_the_x_ray_model_without_warnings(tmp_path, capsys):
    """DX and CR radiographs share the X-ray model: no modality warning, and no pixel-size check."""
    from PIL import Image

    tibia = read_volume(sample_path("xray_tibia"))
    pixels = (tibia.array[0, 600:700, 700:820, 0].numpy().T / 4).round().astype(np.uint8)  # 10-bit -> 8-bit
    Image.fromarray(pixels).save(tmp_path / "dx.png")
    assert main(["upscale", str(tmp_path / "dx.png"), str(tmp_path / "sr.png"), "--modality", "DX"]) == 0
    err = capsys.readouterr().err
    assert "model edsr_xray_x2" in err and "warning" not in err


@pytest.mark.kernels
def test_streamed_upscale_equals_the_in_memory_result(colin_crop, tmp_path):
    """The CLI streams NIfTI to NIfTI with the window of its input checks, and puts the measured k-space band back
    slice by slice: the voxels of ``super_resolve`` with k-space consistency."""
    from medsr.infer import super_resolve

    assert main(["upscale", str(colin_crop), str(tmp_path / "sr.nii"), "--modality", "MR", "--precision", "fp32"]) == 0
    model = medsr.load_model("edsr_mr_x2")
    expected = super_resolve(
        read_volume(colin_crop, modality="MR"),
        model.network,
        model_scale=(2, 2),
        precision="fp32",
        consistency=model.degradation,
    )
    torch.testing.assert_close(read_volume(tmp_path / "sr.nii").array, expected.array, rtol=0, atol=0)


def test_a_slice_model_refuses_in_plane_factors(colin_crop, tmp_path, capsys):
    args = ["upscale", str(colin_crop), str(tmp_path / "sr.nii.gz"), "--model", "edsr_mr_slices_x4"]
    assert main([*args, "--scale", "2,2,1"]) == 2
    assert "makes thin slices" in capsys.readouterr().err and not (tmp_path / "sr.nii.gz").exists()


def test_upscale_through_plane_picks_the_slice_model_and_keeps_geometry(colin_crop, tmp_path, capsys):
    """--scale 1,1,4 on MR: the through-plane model, 4 times more slices over the same field of view."""
    out = tmp_path / "thin.nii.gz"
    assert main(["upscale", str(colin_crop), str(out), "--scale", "1,1,4", "--modality", "MR"]) == 0
    assert "model edsr_mr_slices_x4" in capsys.readouterr().err
    lr, sr = read_volume(colin_crop), read_volume(out)
    assert sr.spatial_shape == (64, 64, 16)
    np.testing.assert_allclose(sr.affine, scale_affine(lr.affine, (1, 1, 4)), atol=1e-5)


def test_models_lists_the_shipped_models_and_prints_a_card(capsys):
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    names = ("edsr_mr_x2", "edsr_mr_x4", "edsr_mr_slices_x4", "edsr_ct_x2", "edsr_ct_slices_x3", "edsr_us_x2")
    for name in (*names, "edsr_xray_x2"):
        assert name in listing
    assert main(["models", "edsr_mr_x4"]) == 0
    assert "# Model card: edsr_mr_x4" in capsys.readouterr().out
    assert main(["models", "edsr_nope"]) == 2
    assert "not shipped models: ['edsr_nope']" in capsys.readouterr().err
    assert main(["models", "edsr_mr_x4", "--table", "t.md"]) == 2
    assert (
        "--table writes a table: pass it without model names, or with --evaluate or --calibrate"
        in capsys.readouterr().err
    )


def write_nifti(path, array):
    write_volume(Volume(torch.as_tensor(array, dtype=torch.float32)[None], np.eye(4)), path)


def ct_slice(path, series_uid, position):
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    ds.SeriesInstanceUID, ds.ImagePositionPatient = series_uid, [0, 0, position]
    ds.save_as(path)


@pytest.mark.parametrize("case", ["missing", "corrupt", "4d", "nan", "mixed_series"])
def test_bad_input_is_a_clear_error_and_writes_nothing(case, tmp_path, capsys):
    source = tmp_path / "in.nii.gz"
    if case == "corrupt":
        source.write_bytes(b"\x1f\x8b this is not a NIfTI file")
    elif case == "4d":
        import nibabel as nib

        nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 3), np.float32), np.eye(4)), source)
    elif case == "nan":
        write_nifti(source, np.where(np.eye(8)[..., None] > 0, np.nan, 1.0) * np.ones((8, 8, 3)))
    elif case == "mixed_series":
        source = tmp_path / "series"
        source.mkdir()
        ct_slice(source / "a.dcm", "1.2.3.1", 0.0)
        ct_slice(source / "b.dcm", "1.2.3.2", 5.0)
    output = tmp_path / "out.nii.gz"
    assert main(["upscale", str(source), str(output)]) == 2
    error = capsys.readouterr().err
    assert str(source) in error
    expected = {
        "missing": "no such file",
        "corrupt": "cannot read as NIfTI",
        "4d": "4D",
        "nan": "NaN",
        "mixed_series": "series",
    }[case]
    assert expected in error
    assert not output.exists()


def test_outputs_never_overwrite_inputs_or_existing_files(colin_crop, tmp_path, capsys):
    before = colin_crop.read_bytes()
    assert main(["upscale", str(colin_crop), str(colin_crop), "--force"]) == 2
    assert "never overwrites its input" in capsys.readouterr().err
    assert colin_crop.read_bytes() == before
    existing = tmp_path / "existing.nii.gz"
    existing.write_bytes(b"keep me")
    assert main(["simulate", str(colin_crop), str(existing)]) == 2
    assert "--force" in capsys.readouterr().err and existing.read_bytes() == b"keep me"


def test_unknown_options_are_rejected(colin_crop, tmp_path):
    with pytest.raises(SystemExit):
        main(["upscale", str(colin_crop), str(tmp_path / "o.nii.gz"), "--scale", "2,2"])
    assert main(["upscale", str(colin_crop), str(tmp_path / "o.nii.gz"), "--model", "nope"]) == 2
    assert main(["upscale", str(colin_crop), str(tmp_path / "o.nii.gz"), "--scale", "2,2,2"]) == 2
    assert main(["upscale", str(colin_crop), str(tmp_path / "o.nii.gz"), "--scale", "2,2,1", "--spacing", "1,1,1"]) == 2
    assert not (tmp_path / "o.nii.gz").exists()


def test_upscale_to_a_non_integer_target_spacing(colin_crop, tmp_path):
    """--spacing 0.7 mm from 1 mm: the model's x2, then linear resampling to round(64 / 0.7) = 91 voxels over the
    same field of view (outer edges unchanged)."""
    output = tmp_path / "sr.nii.gz"
    assert main(["upscale", str(colin_crop), str(output), "--spacing", "0.7,0.7,1", "--precision", "fp32"]) == 0
    lr, sr = read_volume(colin_crop), read_volume(output)
    assert sr.spatial_shape == (91, 91, 4)
    np.testing.assert_allclose(sr.affine, scale_affine(lr.affine, (91 / 64, 91 / 64, 1)), atol=1e-6)
    np.testing.assert_allclose(sr.spacing, (64 / 91, 64 / 91, 1.0), atol=1e-6)
    assert abs(float(sr.array.mean()) - float(lr.array.mean())) < 0.02 * float(lr.array.mean())


def test_upscale_dicom_series_to_a_new_dicom_series(colin_crop, tmp_path):
    """DICOM in, DICOM out: a new derived series whose geometry a second reader (SimpleITK) agrees with."""
    import SimpleITK as sitk

    source = tmp_path / "series"
    lr = read_volume(colin_crop, modality="MR")
    write_volume(lr, source, description="T1 source")
    output = tmp_path / "series_sr"
    assert main(["upscale", str(source), str(output), "--anonymize"]) == 0
    files = sorted(output.iterdir())
    assert len(files) == 4
    first, original = pydicom.dcmread(files[0]), pydicom.dcmread(sorted(source.iterdir())[0])
    assert (first.Rows, first.Columns) == (128, 128) and "DERIVED" in first.ImageType
    assert first.SeriesInstanceUID != original.SeriesInstanceUID and "edsr_mr_x2" in first.SeriesDescription
    assert first.PatientIdentityRemoved == "YES"
    image = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(output)))
    sr = read_volume(output)
    np.testing.assert_allclose(sr.affine, scale_affine(lr.affine, (2, 2, 1)), atol=1e-4)
    # A landmark: the world position of SR voxel (10, 20, 3) by SimpleITK (LPS) equals the one from the LR geometry.
    ras = scale_affine(lr.affine, (2, 2, 1)) @ np.array([10, 20, 3, 1.0])
    lps = np.array(image.TransformIndexToPhysicalPoint((10, 20, 3)))
    np.testing.assert_allclose(lps, ras[:3] * (-1, -1, 1), atol=1e-3)
    assert abs(float(sr.array.mean()) - float(lr.array.mean())) < 0.02 * float(lr.array.mean())


def test_upscale_a_folder_reports_and_skips_bad_files(colin_crop, tmp_path, capsys):
    folder = tmp_path / "scans"
    (folder / "b").mkdir(parents=True)
    (folder / "a.nii.gz").write_bytes(colin_crop.read_bytes())
    (folder / "b" / "c.nii.gz").write_bytes(colin_crop.read_bytes())
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b not a scan")
    assert main(["upscale", str(folder), str(tmp_path / "out"), "--precision", "fp32"]) == 1
    captured = capsys.readouterr()
    assert f"skipped {folder / 'broken.nii.gz'}" in captured.err and "upscaled 2 of 3 scans" in captured.out
    assert read_volume(tmp_path / "out" / "b" / "c.nii.gz").spatial_shape == (128, 128, 4)
    assert (tmp_path / "out" / "a.nii.gz").exists() and not (tmp_path / "out" / "broken.nii.gz").exists()


@pytest.mark.parametrize("slab, region", [("50:60", "train"), ("100:112", "val")])
def test_evaluate_refuses_slices_the_model_trained_or_was_selected_on(slab, region, capsys):
    assert main(["evaluate", "--slices", slab]) == 2
    assert f"overlap the {region} slices" in capsys.readouterr().err
    # Also when the scan is named by its path rather than its sample name.
    assert main(["evaluate", "--scan", str(sample_path("colin27")), "--slices", slab]) == 2


@pytest.mark.slow
def test_demo_prints_the_table_and_writes_its_outputs(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for method in ("nearest", "linear", "cubic", "edsr_mr_x2"):
        assert method in out
    names = {"report.html", "scores.csv", "per_slice.csv", "comparison.png", "error_map.png", "profile.png"}
    names |= {"scores.json", "per_slice.json", "colin27_lr.nii.gz", "colin27_sr.nii.gz"}
    assert names <= {p.name for p in tmp_path.iterdir()}
    sr, lr = read_volume(tmp_path / "colin27_sr.nii.gz"), read_volume(tmp_path / "colin27_lr.nii.gz")
    assert sr.spatial_shape == (180, 216, 181)

    # The table describes the written file: the SR scan, scored like evaluate does, gives the model's row.
    hr = prepare_scan(read_volume(sample_path("colin27"), modality="MR"), Degradation((2, 2, 1)))
    np.testing.assert_allclose(sr.affine, hr.affine, atol=1e-6)  # on the HR grid
    window = default_window(lr.replace(modality="MR"))
    slab = slice(110, 150)
    sr_slices = normalize(sr, window).array[..., slab].permute(3, 0, 1, 2)
    hr_slices = hr.array[..., slab].permute(3, 0, 1, 2)
    row = next(r for r in json.loads((tmp_path / "scores.json").read_text()) if r["method"] == "edsr_mr_x2")
    assert float(psnr(sr_slices, hr_slices, data_range=1.0).mean()) == pytest.approx(row["psnr"], abs=1e-3)


def test_export_writes_an_onnx_file_that_reproduces_the_model(tmp_path, capsys):
    from medsr.checkpoint import load_checkpoint
    from medsr.export import onnx_predictor
    from medsr.infer import model_predictor

    assert main(["export", str(tmp_path / "m.onnx")]) == 0
    lr = torch.rand(2, 1, 24, 20)
    model, _ = load_checkpoint("edsr_mr_x2")
    expected = model_predictor(model, precision="fp32")(lr)
    torch.testing.assert_close(onnx_predictor(tmp_path / "m.onnx")(lr), expected, atol=1e-4, rtol=0)
    assert main(["export", str(tmp_path / "m.onnx")]) == 2  # exists: needs --force
    assert "force" in capsys.readouterr().err


def test_upscale_with_kspace_consistency_reproduces_the_measured_scan(colin_crop, tmp_path, capsys):
    """MRI k-space models by default (streamed slice by slice) and in memory: the output's central k-space is the
    input's, so the scanner model applied to the output gives the input back; with --no-kspace-consistency it
    does not quite. Asking for it where it cannot hold is a one-line error."""
    from medsr.degrade.sampling import kspace_truncate

    lr = read_volume(colin_crop)
    for flag, name in (([], "dc.nii.gz"), (["--no-kspace-consistency"], "plain.nii.gz")):
        assert main(["upscale", str(colin_crop), str(tmp_path / name), *flag]) == 0
    scale = float(lr.array.abs().max())
    again = {
        name: kspace_truncate(read_volume(tmp_path / name).array, (2, 2, 1)) for name in ("dc.nii.gz", "plain.nii.gz")
    }
    assert float((again["dc.nii.gz"] - lr.array).abs().max()) < 1e-4 * scale
    assert float((again["plain.nii.gz"] - lr.array).abs().max()) > 1e-2 * scale
    in_memory = medsr.upscale(lr, "edsr_mr_x2")
    streamed = read_volume(tmp_path / "dc.nii.gz").array
    assert float((in_memory.array - streamed).abs().max()) < 1e-3 * scale  # the file is stored in float32
    for flags in (["--kspace-consistency", "--scale", "3,3,1"], ["--kspace-consistency", "--model", "edsr_ct_x2"]):
        assert main(["upscale", str(colin_crop), str(tmp_path / "x.nii.gz"), *flags]) == 2
        assert "k-space consistency" in capsys.readouterr().err


def test_upscale_dicom_into_a_new_study_records_the_model_and_its_weights(tmp_path):
    """--new-study: the SR series gets its own study; every file names the model and its weights' SHA-256 and
    references the source image it was made from."""
    import hashlib

    source = pydicom.data.get_testdata_file("CT_small.dcm")
    for flags, name in (([], "same"), (["--new-study"], "new")):
        assert main(["upscale", source, str(tmp_path / name), *flags]) == 0
    original = pydicom.dcmread(source)
    same, new = (pydicom.dcmread(next((tmp_path / name).iterdir())) for name in ("same", "new"))
    assert same.StudyInstanceUID == original.StudyInstanceUID != new.StudyInstanceUID
    weights = medsr.load_model("edsr_ct_x2").path / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert f"edsr_ct_x2 sha256:{digest}" in new.DerivationDescription
    assert new.SourceImageSequence[0].ReferencedSOPInstanceUID == original.SOPInstanceUID


def test_upscale_to_one_enhanced_dicom_file_reads_back_as_the_classic_series(tmp_path, capsys):
    """--enhanced writes one Legacy Converted Enhanced CT file whose voxels and affine are the classic series'."""
    source = pydicom.data.get_testdata_file("CT_small.dcm")
    for flags, name in (([], "classic"), (["--enhanced"], "enhanced")):
        assert main(["upscale", source, str(tmp_path / name), "--precision", "fp32", *flags]) == 0
    files = sorted((tmp_path / "enhanced").iterdir())
    assert len(files) == 1 and pydicom.dcmread(files[0]).NumberOfFrames == 1
    classic, enhanced = read_volume(tmp_path / "classic"), read_volume(tmp_path / "enhanced")
    torch.testing.assert_close(enhanced.array, classic.array, rtol=0, atol=0)
    np.testing.assert_allclose(enhanced.affine, classic.affine, atol=1e-6)
    assert main(["upscale", source, str(tmp_path / "sr.nii.gz"), "--enhanced"]) == 2
    assert "--enhanced is for DICOM output" in capsys.readouterr().err
