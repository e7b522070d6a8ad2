from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
    generate_uid,
)

from medsr.dicom import SourceImage, read_dicom
from medsr.volume import Modality

ROWS, COLUMNS = 5, 7  # unequal, so a transposed array shows
PIXEL_SPACING = (0.8, 0.6)  # (row spacing, column spacing) in mm
GAP = 2.5  # mm between slices along the normal
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def _rotation() -> np.ndarray:
    """An oblique rotation; its columns are the row cosine, column cosine and slice normal (rounded for DS)."""
    a, b, c = 0.3, -0.5, 0.7
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _write(
    file: Path,
    pixels: np.ndarray,
    *,
    series_uid: str,
    sop_class=CTImageStorage,
    modality: str = "CT",
    photometric: str = "MONOCHROME2",
    bits: int = 16,
    **tags,
) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(file, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesDescription = "test series"
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=bits, generate_instance_uid=False)
    ds.save_as(file, enforce_file_format=True)


def _write_series(folder: Path, n: int = 4, *, order=None, names=None, series_uid=None, rng=None, tilt=0.0, **tags):
    """Write an oblique n-slice CT series; returns the raw pixels (n, Rows, Columns) and IPPs (n, 3) by k.

    ``tilt`` (mm per slice) shifts each slice along its columns, as a CT gantry tilt does.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = rng or np.random.default_rng(0)
    rotation = _rotation()
    iop = np.round(np.concatenate([rotation[:, 0], rotation[:, 1]]), 6)
    normal = np.cross(iop[:3], iop[3:])
    origin = np.array([-120.25, 33.5, 71.0])
    ipps = np.round([origin + k * (GAP * normal + tilt * iop[3:]) for k in range(n)], 5)
    pixels = rng.integers(0, 3000, size=(n, ROWS, COLUMNS), dtype=np.uint16)
    series_uid = series_uid or generate_uid()
    order = list(range(n)) if order is None else order
    names = names or [f"slice_{i:03d}" for i in range(n)]
    for name, k in zip(names, order, strict=True):
        _write(
            folder / name,
            pixels[k],
            series_uid=series_uid,
            ImagePositionPatient=ipps[k].tolist(),
            ImageOrientationPatient=iop.tolist(),
            PixelSpacing=list(PIXEL_SPACING),
            SliceThickness=GAP,
            InstanceNumber=int(rng.integers(1, 1000)),
            **tags,
        )
    return pixels, ipps, iop


@pytest.mark.parametrize("tilt", [0.0, 0.7])
def test_oblique_shuffled_series_geometry_and_values(tmp_path, tilt):
    folder = tmp_path / "series"
    names = ["zz", "b.dcm", "IM0001", "a"]
    pixels, ipps, iop = _write_series(
        folder, 4, order=[2, 0, 3, 1], names=names, tilt=tilt, RescaleSlope=1, RescaleIntercept=-1024
    )
    (folder / "README").write_text("not a DICOM file\n")
    shutil.copy(get_testdata_file("DICOMDIR"), folder / "DICOMDIR")  # a DICOM file, but not an image

    volume = read_dicom(folder)

    assert volume.spatial_shape == (COLUMNS, ROWS, 4)
    assert volume.array.dtype.is_floating_point and volume.array.shape[0] == 1
    assert volume.modality is Modality.CT
    for k in range(4):
        np.testing.assert_array_equal(volume.array[0, :, :, k].numpy(), pixels[k].T.astype(np.float32) - 1024)
        for i, j in [(0, 0), (COLUMNS - 1, 0), (0, ROWS - 1), (COLUMNS - 1, ROWS - 1), (3, 2)]:
            lps = ipps[k] + i * PIXEL_SPACING[1] * iop[:3] + j * PIXEL_SPACING[0] * iop[3:]
            np.testing.assert_allclose(volume.affine @ [i, j, k, 1], [*(LPS_TO_RAS * lps), 1], atol=1e-6)
    np.testing.assert_allclose(volume.spacing[:2], (PIXEL_SPACING[1], PIXEL_SPACING[0]), rtol=1e-5)
    np.testing.assert_allclose(volume.spacing[2], np.hypot(GAP, tilt), rtol=1e-5)
    assert np.linalg.det(volume.affine[:3, :3]) > 0  # k follows the normal, so the grid stays right-handed in LPS
    assert "PixelData" not in volume.meta["dicom"]
    assert volume.meta["dicom"].ImagePositionPatient == pytest.approx(ipps[0].tolist())
    assert volume.meta["dicom_source"] == str(folder)
    # What a derived series references and keeps: each slice's identity by k, and the affine.
    by_k = [pydicom.dcmread(folder / names[[2, 0, 3, 1].index(k)]) for k in range(4)]
    expected = [SourceImage(CTImageStorage, ds.SOPInstanceUID, ds.InstanceNumber) for ds in by_k]
    assert volume.meta["dicom_images"] == tuple(expected)
    np.testing.assert_array_equal(volume.meta["dicom_affine"], volume.affine)


def test_reversed_order_on_disk_gives_same_volume(tmp_path):
    _write_series(tmp_path / "forward", 5, order=[0, 1, 2, 3, 4])
    _write_series(tmp_path / "reversed", 5, order=[4, 3, 2, 1, 0])

    forward, reversed_ = read_dicom(tmp_path / "forward"), read_dicom(tmp_path / "reversed")

    np.testing.assert_array_equal(forward.array.numpy(), reversed_.array.numpy())
    np.testing.assert_allclose(forward.affine, reversed_.affine)


def test_rescale_gives_hounsfield_units(tmp_path):
    pixels, _, _ = _write_series(tmp_path / "ct", 3, RescaleSlope=0.5, RescaleIntercept=-1024)
    volume = read_dicom(tmp_path / "ct")
    np.testing.assert_allclose(volume.array[0].permute(2, 1, 0).numpy(), pixels * 0.5 - 1024)


def test_missing_rescale_keeps_stored_values(tmp_path):
    pixels, _, _ = _write_series(tmp_path / "mr", 3, modality="MR")
    volume = read_dicom(tmp_path / "mr")
    np.testing.assert_array_equal(volume.array[0].permute(2, 1, 0).numpy(), pixels)
    assert volume.modality is Modality.MR


def test_unknown_modality_is_other(tmp_path):
    _write_series(tmp_path / "pet", 3, modality="PT")
    assert read_dicom(tmp_path / "pet").modality is Modality.OT


def test_single_slice_of_a_series_steps_along_the_normal(tmp_path):
    _, ipps, iop = _write_series(tmp_path / "s", 1)
    volume = read_dicom(tmp_path / "s" / "slice_000")
    assert volume.spatial_shape == (COLUMNS, ROWS, 1)
    np.testing.assert_allclose(volume.affine[:3, 2], LPS_TO_RAS * np.cross(iop[:3], iop[3:]) * GAP, atol=1e-9)
    np.testing.assert_allclose(volume.affine[:3, 3], LPS_TO_RAS * ipps[0])


def test_two_series_are_refused(tmp_path):
    uid_a, uid_b = generate_uid(), generate_uid()
    _write_series(tmp_path, 3, series_uid=uid_a, names=["a1", "a2", "a3"])
    _write_series(tmp_path, 2, series_uid=uid_b, names=["b1", "b2"])
    with pytest.raises(ValueError, match="2 DICOM series") as error:
        read_dicom(tmp_path)
    assert f"{uid_a} 'test series' (3 files)" in str(error.value)
    assert f"{uid_b} 'test series' (2 files)" in str(error.value)


def test_missing_slice_is_irregular_spacing(tmp_path):
    _write_series(tmp_path, 5)
    (tmp_path / "slice_002").unlink()
    with pytest.raises(ValueError, match=r"irregular slice spacing: 2\.5 mm to 5 mm; missing slices\?"):
        read_dicom(tmp_path)


def test_duplicate_position_is_refused(tmp_path):
    _write_series(tmp_path, 3, order=[0, 1, 1], names=["a", "b", "c"])
    with pytest.raises(ValueError, match="share the position"):
        read_dicom(tmp_path)


def test_inconsistent_pixel_spacing_is_refused(tmp_path):
    _write_series(tmp_path, 3)
    ds = pydicom.dcmread(tmp_path / "slice_001")
    ds.PixelSpacing = [0.8, 0.7]
    ds.save_as(tmp_path / "slice_001")
    with pytest.raises(ValueError, match="PixelSpacing differs between slices"):
        read_dicom(tmp_path)


def test_series_without_positions_is_refused(tmp_path):
    for k in range(2):
        _write(tmp_path / f"s{k}", np.zeros((ROWS, COLUMNS), np.uint16), series_uid="1.2.3", PixelSpacing=[1, 1])
    with pytest.raises(ValueError, match="needs ImagePositionPatient and ImageOrientationPatient"):
        read_dicom(tmp_path)


def test_truncated_file_is_named(tmp_path):
    _write_series(tmp_path, 3)
    file = tmp_path / "slice_001"
    file.write_bytes(file.read_bytes()[:-20])
    with pytest.raises(ValueError, match=re.escape(str(file))):
        read_dicom(tmp_path)


def test_truncated_header_is_named(tmp_path):
    _write_series(tmp_path, 3)
    file = tmp_path / "slice_001"
    file.write_bytes(file.read_bytes()[:300])
    with pytest.raises(ValueError, match=re.escape(str(file)) + ".*truncated"):
        read_dicom(tmp_path)


def test_empty_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no DICOM image files"):
        read_dicom(tmp_path)
    (tmp_path / "README").write_text("hello")
    with pytest.raises(ValueError, match="no DICOM image files"):
        read_dicom(tmp_path)


def test_dicomdir_alone_is_not_an_image():
    with pytest.raises(ValueError, match="no DICOM image files"):
        read_dicom(Path(get_testdata_file("DICOMDIR")))


def test_missing_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_dicom(tmp_path / "nowhere")


def test_non_dicom_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a DICOM file"):
        read_dicom(tmp_path / "notes.txt")


def test_pydicom_ct_small_as_single_file():
    file = Path(get_testdata_file("CT_small.dcm"))
    ds = pydicom.dcmread(file)

    volume = read_dicom(file)

    assert volume.modality is Modality.CT
    assert volume.spatial_shape == (128, 128, 1)
    expected = ds.pixel_array.T * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(volume.array[0, :, :, 0].numpy(), expected)
    np.testing.assert_allclose(volume.affine[:3, 3], LPS_TO_RAS * np.asarray(ds.ImagePositionPatient, float))
    np.testing.assert_allclose(volume.spacing, (0.661468, 0.661468, 5.0), rtol=1e-6)


@pytest.mark.parametrize("keyword", ["PixelSpacing", "ImagerPixelSpacing"])
def test_xray_without_patient_geometry_uses_pixel_spacing(tmp_path, keyword):
    file = tmp_path / "chest.dcm"
    pixels = np.arange(ROWS * COLUMNS, dtype=np.uint16).reshape(ROWS, COLUMNS)
    tags = {keyword: [0.2, 0.15]}
    _write(file, pixels, series_uid="1.2.3", sop_class=DigitalXRayImageStorageForPresentation, modality="DX", **tags)

    volume = read_dicom(file)

    np.testing.assert_allclose(volume.affine, np.diag([-0.15, -0.2, 1.0, 1.0]))  # unrotated DICOM frame, in RAS
    assert volume.modality is Modality.DX
    np.testing.assert_array_equal(volume.array[0, :, :, 0].numpy(), pixels.T)


def test_ultrasound_spacing_from_regions_in_cm(tmp_path):
    region = pydicom.Dataset()
    region.PhysicalUnitsXDirection = 3  # cm
    region.PhysicalUnitsYDirection = 3
    region.PhysicalDeltaX = 0.01
    region.PhysicalDeltaY = 0.02
    file = tmp_path / "us.dcm"
    pixels = np.zeros((ROWS, COLUMNS), np.uint16)
    _write(
        file,
        pixels,
        series_uid="1.2.3",
        sop_class=UltrasoundImageStorage,
        modality="US",
        SequenceOfUltrasoundRegions=[region],
    )

    volume = read_dicom(file)

    np.testing.assert_allclose(volume.spacing, (0.1, 0.2, 1.0))
    assert volume.modality is Modality.US


def test_image_without_any_geometry_is_refused(tmp_path):
    file = tmp_path / "photo.dcm"
    _write(file, np.zeros((ROWS, COLUMNS), np.uint16), series_uid="1.2.3", modality="OT")
    with pytest.raises(ValueError, match="cannot place it in space"):
        read_dicom(file)


def test_colour_is_converted_to_luminance_with_a_warning(tmp_path):
    rgb = np.zeros((ROWS, COLUMNS, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 100, 50, 200
    file = tmp_path / "sc.dcm"
    _write(
        file,
        rgb,
        series_uid="1.2.3",
        sop_class=SecondaryCaptureImageStorage,
        modality="OT",
        photometric="RGB",
        bits=8,
        PixelSpacing=[1, 1],
    )

    with pytest.warns(UserWarning, match="grey"):
        volume = read_dicom(file)

    assert volume.array.shape == (1, COLUMNS, ROWS, 1)
    np.testing.assert_allclose(volume.array.numpy(), 0.299 * 100 + 0.587 * 50 + 0.114 * 200, rtol=1e-6)


def test_multi_frame_without_functional_groups_is_refused(tmp_path):
    """Frames are placed by their functional groups (see test_dicom_enhanced.py); a cine without them cannot be."""
    file = tmp_path / "cine.dcm"
    _write(file, np.zeros((2, ROWS, COLUMNS), np.uint16), series_uid="1.2.3", PixelSpacing=[1, 1])
    with pytest.raises(ValueError, match=re.escape(str(file)) + ": 2 frames without functional groups"):
        read_dicom(file)


def test_undecodable_pixel_data_names_the_file_and_the_syntax(tmp_path):
    """A compressed syntax no installed plugin decodes (HTJ2K here) is a clear error, not a traceback."""
    assert not get_decoder(HTJ2KLossless).is_available
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    ds.PixelData = encapsulate([b"\x00" * 64])
    file = tmp_path / "htj2k.dcm"
    ds.save_as(file, enforce_file_format=True)
    with pytest.raises(ValueError, match=r"(?s)htj2k.dcm.*(HTJ2K|High-Throughput)"):
        read_dicom(file)


def test_a_radiograph_without_pixel_size_is_read_in_pixels(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient"):
        delattr(ds, keyword)
    ds.Modality, ds.PixelSpacing = "CR", [0, 0]  # RG1_UNCR in pydicom-data stores exactly this
    file = tmp_path / "xray.dcm"
    ds.save_as(file)
    with pytest.warns(UserWarning, match="1 mm pixels"):
        volume = read_dicom(file)
    np.testing.assert_allclose(volume.spacing[:2], (1.0, 1.0))
