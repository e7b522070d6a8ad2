from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage

from medsr.deidentify import Deidentifier
from medsr.dicom_write import write_series
from medsr.io import file_format, read_volume, write_volume
from medsr.samples import sample_path
from medsr.volume import Modality, Volume, crop, scale_affine, world_coordinates

from .conftest import oblique_affine

LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS, written out independently of medsr.dicom


def headers(folder: Path) -> list[Dataset]:
    """The written files' datasets, in file-name order (which is k order)."""
    return [pydicom.dcmread(file) for file in sorted(folder.iterdir())]


def tolerance(folder: Path, volume: Volume) -> float:
    """Half a rescale step, plus float32 rounding of the values."""
    return float(headers(folder)[0].RescaleSlope) / 2 + 1e-6 * float(volume.array.abs().max())


def rotated(affine: np.ndarray, angle: float = 0.4) -> np.ndarray:
    """``affine`` also rotated about the world x axis: oblique in every plane."""
    rotation = np.eye(4)
    rotation[1:3, 1:3] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    return rotation @ affine


def tilted(affine: np.ndarray) -> np.ndarray:
    """``affine`` with k sheared along j, as a CT gantry tilt does (slices no longer stack along their normal)."""
    result = affine.copy()
    result[:3, 2] += 0.3 * result[:3, 1]
    return result


@pytest.fixture
def mr(phantom) -> Volume:
    """The phantom in MR-like scanner units (0 to about 900), no source header (as if read from NIfTI)."""
    return phantom.replace(array=phantom.array * 750 + 100)


@pytest.mark.parametrize(
    "affine", [rotated(oblique_affine()), tilted(rotated(oblique_affine()))], ids=["oblique", "tilted"]
)
def test_round_trip_through_the_reader(tmp_path, mr, affine):
    volume = mr.replace(affine=affine)
    write_volume(volume, tmp_path / "sr")

    read = read_volume(tmp_path / "sr")

    np.testing.assert_allclose(read.affine, volume.affine, atol=1e-4)
    assert read.modality is Modality.MR
    assert (read.array - volume.array).abs().max() <= tolerance(tmp_path / "sr", volume)
    written = headers(tmp_path / "sr")
    assert [int(ds.InstanceNumber) for ds in written] == list(range(1, 17))
    for k, ds in enumerate(written):  # each slice placed at voxel (0, 0, k), in LPS
        np.testing.assert_allclose(ds.ImagePositionPatient, LPS @ (affine @ [0, 0, k, 1])[:3], atol=1e-6)
        assert (ds.Rows, ds.Columns) == (20, 24)  # (J, I)
    assert len({ds.SOPInstanceUID for ds in written}) == 16
    assert len({ds.SeriesInstanceUID for ds in written}) == 1
    assert all(ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID for ds in written)


def test_negative_determinant_reads_back_with_k_reversed(tmp_path, mr):
    """The reader orders slices along the slice normal: same voxels at the same places, k reversed."""
    volume = mr.replace(affine=rotated(oblique_affine()) @ np.diag([-1.0, 1.0, 1.0, 1.0]))
    write_volume(volume, tmp_path / "sr")
    read = read_volume(tmp_path / "sr")
    np.testing.assert_allclose(
        world_coordinates(read.affine, read.spatial_shape),
        world_coordinates(volume.affine, volume.spatial_shape)[..., ::-1],
        atol=1e-4,
    )
    assert (read.array - volume.array.flip(-1)).abs().max() <= tolerance(tmp_path / "sr", volume)


def test_simpleitk_reads_the_same_geometry_and_values(tmp_path, mr):
    sitk = pytest.importorskip("SimpleITK")
    volume = mr.replace(affine=rotated(oblique_affine(angle=0.7, origin=(12.0, -80.5, 33.25)), -0.5))
    write_volume(volume, tmp_path / "sr")

    image = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / "sr")))

    lps = LPS @ volume.affine[:3, :3]  # ITK's world is LPS
    np.testing.assert_allclose(image.GetSpacing(), volume.spacing, rtol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), LPS @ volume.affine[:3, 3], atol=1e-4)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), lps / volume.spacing, atol=1e-6)
    landmark = (17, 3, 11)  # (i, j, k) = ITK's (x, y, z) index: column, row, slice
    np.testing.assert_allclose(
        image.TransformIndexToPhysicalPoint(landmark), LPS @ (volume.affine @ [*landmark, 1])[:3], atol=1e-4
    )
    values = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # (K, J, I) -> (I, J, K)
    assert np.abs(values - volume.array[0].numpy()).max() <= tolerance(tmp_path / "sr", volume)


@pytest.mark.parametrize(
    ("modality", "storage"), [("CT", CTImageStorage), ("MR", MRImageStorage), ("OT", SecondaryCaptureImageStorage)]
)
def test_without_source_header_a_minimal_series_of_the_modality(tmp_path, mr, modality, storage):
    volume = mr.replace(array=mr.array - 1000, modality=modality)  # CT: -900 to -100 HU
    write_volume(volume, tmp_path / "sr", description="from NIfTI")
    ds = headers(tmp_path / "sr")[0]
    assert ds.SOPClassUID == storage and ds.Modality == modality
    assert list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"]
    assert ds.SeriesDescription == "from NIfTI" and "medsr" in ds.DerivationDescription
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert (ds.BitsAllocated, ds.BitsStored) == (16, 16)
    if modality == "CT":  # HU are stored as integers, as scanners do
        assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
    read = read_volume(tmp_path / "sr")
    assert read.modality == modality
    assert (read.array - volume.array).abs().max() <= tolerance(tmp_path / "sr", volume)


def test_super_resolved_ct_slice(tmp_path):
    """A 2x in-plane 'super-resolution' (nearest, so every HU value is known) of a real head CT slice."""
    source_file = sample_path("ct_head_slice")
    source = read_volume(source_file)
    array = source.array.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # (1, 1024, 1024, 1)
    sr = source.replace(array=array, affine=scale_affine(source.affine, (2, 2, 1)))

    write_volume(sr, tmp_path / "sr", description="SR x2 nearest (test)")

    original, (ds,) = pydicom.dcmread(source_file), headers(tmp_path / "sr")
    read = read_volume(tmp_path / "sr")
    assert ds.StudyInstanceUID == original.StudyInstanceUID
    assert ds.SeriesInstanceUID != original.SeriesInstanceUID and ds.SOPInstanceUID != original.SOPInstanceUID
    assert ds.SeriesNumber != original.SeriesNumber and ds.SeriesDescription == "SR x2 nearest (test)"
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    assert (ds.Rows, ds.Columns) == (2 * original.Rows, 2 * original.Columns)
    np.testing.assert_allclose(ds.PixelSpacing, np.asarray(original.PixelSpacing, float) / 2)
    assert "PixelPaddingValue" not in ds  # described the source's stored values
    # HU preserved everywhere, air (about -1000) and brain (0 to 80) included, and the source's window kept
    assert torch.equal(read.array, sr.array)
    assert read.array.min() < -900 and ((read.array > 0) & (read.array < 80)).sum() > 10_000
    assert (ds.WindowCenter, ds.WindowWidth) == (original.WindowCenter, original.WindowWidth)
    centre = [(n - 1) / 2 for n in source.spatial_shape]  # voxel coordinates of the centre of the field of view
    sr_centre = [(n - 1) / 2 for n in read.spatial_shape]
    np.testing.assert_allclose(read.affine @ [*sr_centre, 1], source.affine @ [*centre, 1], atol=1e-4)


def test_mr_slice_keeps_the_source_rescale(tmp_path):
    """The Philips MR sample stores values with slope 3.774114: kept, so values round-trip within half of it."""
    source = crop(read_volume(sample_path("mr_shoulder")), (400, 400, 0), (464, 448, 1))  # oblique, 64 x 48
    sr = source.replace(array=source.array + 0.7)  # not on the source's grid of values
    write_volume(sr, tmp_path / "sr")
    ds = headers(tmp_path / "sr")[0]
    assert float(ds.RescaleSlope) == pytest.approx(3.774114)
    read = read_volume(tmp_path / "sr")
    assert (read.array - sr.array).abs().max() <= 3.774114 / 2 + 1e-3
    np.testing.assert_allclose(read.affine, sr.affine, atol=1e-4)


def test_anonymize_removes_identifiers(tmp_path):
    source = crop(read_volume(sample_path("mr_shoulder")), (400, 400, 0), (416, 416, 1))
    header = source.meta["dicom"].copy()
    header.OperatorsName = "Doe^Jane"
    header.OtherPatientIDs = "HOSP-4711"
    header.add_new(0x00091010, "LO", "private note on the patient")
    header.ReferencedImageSequence = [Dataset()]
    header.ReferencedImageSequence[0].ReferencedSOPClassUID = MRImageStorage
    header.ReferencedImageSequence[0].ReferencedSOPInstanceUID = "1.2.3.4.5.6.7"
    source = source.replace(meta={**source.meta, "dicom": header})

    run = Deidentifier()  # one run: its series share one new study
    write_volume(source, tmp_path / "a", description="SR x2 test", anonymize=run)
    write_volume(source, tmp_path / "b", description="SR x2 test", anonymize=run)

    (a,), (b,) = headers(tmp_path / "a"), headers(tmp_path / "b")
    data = next((tmp_path / "a").iterdir()).read_bytes()
    identifiers = [
        "CompressedSamples^MR2",  # PatientName
        "5MR2",  # PatientID, StudyID
        "19500112",  # PatientBirthDate
        "20040826",  # StudyDate
        "MM07R",  # InstitutionName
        "SHOULDER",  # StudyDescription
        "Doe^Jane",
        "HOSP-4711",
        "private note",
        header.StudyInstanceUID,
        header.FrameOfReferenceUID,
        "1.2.3.4.5.6.7",
    ]
    assert [text for text in identifiers if text.encode() in data] == []
    assert a.PatientName == "" and a.PatientID == "" and "PatientWeight" not in a
    assert a.PatientIdentityRemoved == "YES" and a.DeidentificationMethod
    assert "ReferencedImageSequence" not in a and a.SOPClassUID == MRImageStorage  # X/Z/U*: removed
    # Series of one study de-identified in one run stay in one (new) study and frame of reference.
    assert (a.StudyInstanceUID, a.FrameOfReferenceUID) == (b.StudyInstanceUID, b.FrameOfReferenceUID)
    assert a.SeriesInstanceUID != b.SeriesInstanceUID
    np.testing.assert_allclose(read_volume(tmp_path / "a").affine, source.affine, atol=1e-4)


def test_a_folder_name_without_suffix_is_dicom(tmp_path):
    assert file_format(tmp_path / "sr_series") == "dicom"
    assert file_format(tmp_path / "scan.nii.gz") == "nifti"


# Errors and the folder contract


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_existing_target_that_medsr_did_not_write_is_refused(tmp_path, mr):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README").write_text("keep me")
    (tmp_path / "original").mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "original")
    (tmp_path / "file").write_text("keep me")
    for name, what in [("notes", "holds files medsr did not write"), ("original", "holds"), ("file", "is a file")]:
        with pytest.raises(FileExistsError, match=re.escape(f"{tmp_path / name}: exists and {what}")):
            write_volume(mr, tmp_path / name)
    assert entries(tmp_path) == ["file", "notes", "original"]
    assert entries(tmp_path / "notes") == ["README"] and entries(tmp_path / "original") == ["CT_small.dcm"]


def test_a_previous_output_is_replaced_atomically(tmp_path, mr):
    write_volume(mr, tmp_path / "sr")
    write_volume(crop(mr, (0, 0, 0), (24, 20, 3)), tmp_path / "sr")
    assert entries(tmp_path) == ["sr"]
    assert read_volume(tmp_path / "sr").spatial_shape == (24, 20, 3)


def test_failed_write_leaves_the_previous_output(tmp_path, mr, monkeypatch):
    write_volume(crop(mr, (0, 0, 0), (24, 20, 3)), tmp_path / "sr")
    before = {name: (tmp_path / "sr" / name).read_bytes() for name in entries(tmp_path / "sr")}
    save_as, calls = Dataset.save_as, []

    def full_disk(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        save_as(self, *args, **kwargs)

    monkeypatch.setattr(Dataset, "save_as", full_disk)
    for target in ("sr", "new"):
        calls.clear()
        with pytest.raises(OSError, match="disk full"):
            write_volume(mr, tmp_path / target)
    assert entries(tmp_path) == ["sr"]  # no temporary folder, no half series
    assert {name: (tmp_path / "sr" / name).read_bytes() for name in entries(tmp_path / "sr")} == before


def test_never_writes_into_the_input_series(tmp_path, mr):
    write_volume(mr, tmp_path / "source")  # a series medsr wrote: replaceable, but not while it is the input
    source = read_volume(tmp_path / "source")
    for target in (tmp_path / "source", tmp_path / "source" / "sr"):
        with pytest.raises(ValueError, match=re.escape(f"{target}: the source series is")):
            write_volume(source, target)
    assert len(entries(tmp_path / "source")) == 16
    single = read_volume(tmp_path / "source" / "0001.dcm")  # nor replace the folder holding an input file
    with pytest.raises(ValueError, match="never writes into its input"):
        write_volume(single, tmp_path / "source")


def test_nan_is_refused(tmp_path, mr):
    array = mr.array.clone()
    array[0, 3, 4, 5] = float("nan")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'sr'}: 1 voxels are NaN or infinite")):
        write_volume(mr.replace(array=array), tmp_path / "sr")
    assert entries(tmp_path) == []


def test_multi_channel_mr_is_refused(tmp_path, mr):
    rgb = mr.replace(array=mr.array.repeat(3, 1, 1, 1))
    with pytest.raises(ValueError, match=r"DICOM MR series holds one value per voxel; got 3 channels"):
        write_series(rgb, tmp_path / "sr", description="rgb")
    with pytest.raises(ValueError, match="got 3 channels"):
        write_volume(rgb, tmp_path / "sr")
    assert entries(tmp_path) == []


@pytest.mark.parametrize("modality", ["US", "CR", "DX"])
def test_ultrasound_and_radiographs_are_refused(tmp_path, mr, modality):
    with pytest.raises(ValueError, match=f"writing {modality} DICOM is not supported"):
        write_volume(crop(mr, (0, 0, 0), (24, 20, 1)).replace(modality=modality), tmp_path / "sr")
    assert entries(tmp_path) == []


def test_file_name_long_description_and_sheared_grid_are_refused(tmp_path, mr):
    with pytest.raises(ValueError, match="written as a folder"):
        write_volume(mr, tmp_path / "sr.dcm")
    with pytest.raises(ValueError, match="1 to 64 characters"):
        write_volume(mr, tmp_path / "sr", description="x" * 65)
    sheared = mr.affine.copy()
    sheared[:3, 1] += 0.2 * sheared[:3, 0]  # rows no longer perpendicular to columns: IOP cannot say that
    with pytest.raises(ValueError, match="voxel axes i and j meet at"):
        write_volume(mr.replace(affine=sheared), tmp_path / "sr")
    assert entries(tmp_path) == []
