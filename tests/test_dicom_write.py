from __future__ import annotations

import copy
import itertools
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage, generate_uid

import medsr
from medsr.deidentify import Deidentifier
from medsr.dicom_write import write_series
from medsr.io import file_format, read_volume, write_volume
from medsr.samples import sample_path
from medsr.selfsup import slice_acquisition
from medsr.volume import Modality, Volume, crop, scale_affine, world_coordinates

from .conftest import oblique_affine

LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS, written out independently of medsr.dicom


def headers(folder: Path) -> list[Dataset]:
    """The written files' datasets, in file-name order (which is k order)."""
    return [pydicom.dcmread(file) for file in sorted(folder.iterdir())]


def tolerance(folder: Path, volume: Volume) -> float:
    """Half a rescale step, plus float32 rounding of the values."""
    return float(headers(folder)[0].get("RescaleSlope", 1)) / 2 + 1e-6 * float(volume.array.abs().max())


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
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY", *{"CT": ["AXIAL"], "MR": ["OTHER"]}.get(modality, [])]
    assert ds.Manufacturer == "medsr" and ds.SoftwareVersions == medsr.__version__
    assert ds.StudyID.startswith("medsr-") and ds.StudyDate == ds.SeriesDate != ""  # made now
    assert ds.Laterality == "" and "SourceImageSequence" not in ds  # unknown; nothing to reference
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


def test_mr_is_stored_without_a_modality_lut(tmp_path):
    """The Philips MR sample stores values with slope 3.774114; the MR IOD has no Modality LUT, so the new series
    stores the values themselves as integers, and reads back within half a unit."""
    source = crop(read_volume(sample_path("mr_shoulder")), (400, 400, 0), (464, 448, 1))  # oblique, 64 x 48
    sr = source.replace(array=source.array + 0.7)  # not on the source's grid of values
    write_volume(sr, tmp_path / "sr")
    ds = headers(tmp_path / "sr")[0]
    assert [kw for kw in ("RescaleSlope", "RescaleIntercept", "RescaleType") if kw in ds] == []
    np.testing.assert_array_equal(ds.pixel_array.T, np.rint(sr.array[0, :, :, 0].numpy()))
    read = read_volume(tmp_path / "sr")
    assert (read.array - sr.array).abs().max() <= 0.5 + 1e-3
    np.testing.assert_allclose(read.affine, sr.affine, atol=1e-4)


@pytest.mark.parametrize(("top", "gain"), [(1.0, 1000.0), (40.0, 1.0), (171.0, 1.0), (2e5, 0.1)])
def test_mr_values_out_of_integer_reach_get_a_named_power_of_ten(tmp_path, top, gain):
    """An MR slice of 0-171 or 0-40 is stored as is; 0-1 would keep 2 levels and 0-200,000 does not fit 16 bits."""
    colin = crop(read_volume(sample_path("colin27"), modality="MR"), (0, 0, 90), (181, 217, 91))  # air to white
    volume = colin.replace(array=colin.array * (top / colin.array.max()))
    if gain == 1:
        write_volume(volume, tmp_path / "sr")
    else:
        with pytest.warns(UserWarning, match=f"MR values stored x{gain:g}"):
            write_volume(volume, tmp_path / "sr")
    ds = headers(tmp_path / "sr")[0]
    assert "RescaleSlope" not in ds and ds.PixelRepresentation == 0
    assert (f"stored x{gain:g} " in ds.DerivationDescription) == (gain != 1)
    read = read_volume(tmp_path / "sr")
    assert (read.array - volume.array * gain).abs().max() <= 0.5 + 1e-3
    assert float(ds.WindowWidth) > 0.5 * gain * float(volume.array.max() - volume.array.min())  # in stored units


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


# What a derived series says about its source: thickness, numbering, references, derivation, study


def source_series(folder: Path, name: str = "CT_small.dcm", *, spacing=20.0, thickness=5.0, descending=True) -> Path:
    """A 4-slice series made of pydicom's test file ``name``: slice k is ``spacing`` mm further along the normal,
    ``thickness`` mm thick and numbered 4 - k (``descending``) or k + 1; its pixels shifted by k."""
    template = pydicom.dcmread(get_testdata_file(name))
    iop = np.asarray(template.ImageOrientationPatient, dtype=float)
    origin, normal = np.asarray(template.ImagePositionPatient, dtype=float), np.cross(iop[:3], iop[3:])
    folder.mkdir()
    series = generate_uid()
    for k in range(4):
        ds = copy.deepcopy(template)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [round(float(x), 4) for x in origin + k * spacing * normal]
        ds.SliceThickness, ds.SpacingBetweenSlices = thickness, spacing
        ds.InstanceNumber = 4 - k if descending else k + 1
        ds.PixelData = (ds.pixel_array + k).astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(folder / f"slice{k}.dcm", enforce_file_format=True)
    return folder


def upsampled(volume: Volume, factors: tuple[int, int, int]) -> Volume:
    """A nearest-neighbour 'super-resolution' by integer ``factors`` per axis, on the grid ``scale_affine`` gives."""
    array = volume.array
    for axis, factor in enumerate(factors):
        array = array.repeat_interleave(factor, dim=axis + 1)
    return volume.replace(array=array, affine=scale_affine(volume.affine, factors))


def source_uids(folder: Path) -> list[str]:
    """The SOPInstanceUIDs of a series on disk, along its slice normal (the reader's k)."""
    datasets = headers(folder)
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    return [ds.SOPInstanceUID for ds in sorted(datasets, key=lambda ds: normal @ np.asarray(ds.ImagePositionPatient))]


@pytest.mark.parametrize(("factors", "thickness"), [((2, 2, 1), 5.0), ((1, 1, 4), 5.0), ((1, 1, 2), 10.0)])
def test_slice_thickness_is_the_sources_in_plane_and_the_spacing_through_plane(tmp_path, factors, thickness):
    """5 mm slices every 20 mm: in-plane SR keeps 5 mm; through-plane SR gives contiguous slices (x4: 5 mm apart)."""
    source = read_volume(source_series(tmp_path / "source"))
    write_volume(upsampled(source, factors), tmp_path / "sr")
    spacing = 20.0 / factors[2]
    assert {(float(ds.SliceThickness), float(ds.SpacingBetweenSlices)) for ds in headers(tmp_path / "sr")} == {
        (thickness, spacing)
    }
    again = read_volume(tmp_path / "sr")
    write_volume(again, tmp_path / "again")  # a derived series of a derived series keeps it too
    assert {float(ds.SliceThickness) for ds in headers(tmp_path / "again")} == {thickness}
    if factors[2] == 1:  # what selfsr learns the slice profile from
        assert slice_acquisition(again).thickness == thickness


@pytest.mark.parametrize("descending", [True, False])
@pytest.mark.parametrize("factors", [(2, 2, 1), (1, 1, 2)])
def test_instance_numbers_run_as_the_sources(tmp_path, descending, factors):
    source = read_volume(source_series(tmp_path / "source", descending=descending))
    write_volume(upsampled(source, factors), tmp_path / "sr")
    depth = 4 * factors[2]
    expected = list(range(depth, 0, -1)) if descending else list(range(1, depth + 1))
    written = headers(tmp_path / "sr")  # by file name
    assert [int(ds.InstanceNumber) for ds in written] == list(range(1, depth + 1))
    assert [f"{int(ds.InstanceNumber):04d}.dcm" for ds in written] == sorted(
        p.name for p in (tmp_path / "sr").iterdir()
    )
    normal = np.cross(*np.reshape(np.asarray(written[0].ImageOrientationPatient, dtype=float), (2, 3)))
    by_position = sorted(written, key=lambda ds: normal @ np.asarray(ds.ImagePositionPatient, dtype=float))
    assert [int(ds.InstanceNumber) for ds in by_position] == expected
    write_volume(read_volume(tmp_path / "sr"), tmp_path / "again")  # and again
    again = sorted(
        headers(tmp_path / "again"), key=lambda ds: normal @ np.asarray(ds.ImagePositionPatient, dtype=float)
    )
    assert [int(ds.InstanceNumber) for ds in again] == expected


def test_derivation_record_references_the_source_slices(tmp_path):
    source_folder = source_series(tmp_path / "source")
    source, uids = read_volume(source_folder), source_uids(source_folder)
    original = pydicom.dcmread(next(source_folder.iterdir()))
    files = write_series(upsampled(source, (1, 1, 2)), tmp_path / "sr", description="SR test", model="m sha256:ab12")

    # New slice k lies at source slice coordinate k / 2 - 1/4 (voxel centres): across or between these.
    for k, (file, under) in enumerate(
        zip(files, [[0], [0, 1], [0, 1], [1, 2], [1, 2], [2, 3], [2, 3], [3]], strict=True)
    ):
        ds = pydicom.dcmread(file)
        referenced = [item.ReferencedSOPInstanceUID for item in ds.SourceImageSequence]
        assert referenced == [uids[index] for index in under], k
        assert {item.ReferencedSOPClassUID for item in ds.SourceImageSequence} == {CTImageStorage}
        purpose = {item.PurposeOfReferenceCodeSequence[0].CodeValue for item in ds.SourceImageSequence}
        assert purpose == {"121322"}  # Source image for image processing operation (CID 7202)
        (series,) = ds.ReferencedSeriesSequence
        assert series.SeriesInstanceUID == original.SeriesInstanceUID
        assert [item.ReferencedSOPInstanceUID for item in series.ReferencedInstanceSequence] == referenced
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    assert ds.StudyInstanceUID == original.StudyInstanceUID and ds.SeriesInstanceUID != original.SeriesInstanceUID
    assert [(c.CodeValue, c.CodingSchemeDesignator) for c in ds.DerivationCodeSequence] == [("113085", "DCM")]
    assert "m sha256:ab12" in ds.DerivationDescription and medsr.__version__ in ds.DerivationDescription
    (equipment,) = ds.ContributingEquipmentSequence
    assert (equipment.Manufacturer, equipment.SoftwareVersions) == ("medsr", medsr.__version__)
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"  # Processing Equipment (CID 7005)
    assert ds.Manufacturer == original.Manufacturer  # the acquisition's equipment stays
    assert "InstanceCreatorUID" not in ds and "ReferencedSeriesSequence" not in original


def test_new_study_keeps_the_patient_and_references_the_source_study(tmp_path):
    source_folder = source_series(tmp_path / "source")
    source, uids = read_volume(source_folder), source_uids(source_folder)
    original = pydicom.dcmread(next(source_folder.iterdir()))
    write_series(upsampled(source, (2, 2, 1)), tmp_path / "sr", description="SR test", new_study=True)

    written = headers(tmp_path / "sr")
    assert len({ds.StudyInstanceUID for ds in written}) == 1
    ds = written[0]
    assert ds.StudyInstanceUID != original.StudyInstanceUID and ds.StudyID.startswith("medsr-")
    assert ds.StudyDate == ds.SeriesDate != "" and ds.AccessionNumber == ""  # made now, ordered by nobody
    assert (ds.PatientID, ds.FrameOfReferenceUID) == (original.PatientID, original.FrameOfReferenceUID)
    assert "ReferencedSeriesSequence" not in ds
    (study,) = ds.StudiesContainingOtherReferencedInstancesSequence
    assert study.StudyInstanceUID == original.StudyInstanceUID
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == original.SeriesInstanceUID
    referenced = {d.SourceImageSequence[0].ReferencedSOPInstanceUID for d in written}
    assert referenced == set(uids)  # in-plane: each slice its own source slice


def test_a_source_de_identified_without_a_method_gets_one(tmp_path):
    """The CQ500 head CT says PatientIdentityRemoved YES without the Type 1C method attributes."""
    source = crop(read_volume(sample_path("ct_head_slice")), (200, 200, 0), (232, 224, 1))
    assert source.meta["dicom"].PatientIdentityRemoved == "YES"
    write_volume(source, tmp_path / "sr")
    (ds,) = headers(tmp_path / "sr")
    assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethod == "not recorded in the source"


# The series read by other tools: dciodvfy (dicom3tools), dcm2niix and SimpleITK


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, tuple[Volume, Path]]:
    """Derived series of a DICOM CT series (4 slices), the DICOM CT and MR samples (one slice each, the MR with a
    non-identity rescale), NIfTI MR and NIfTI CT, and the CT series de-identified (pixels-only): name -> (the
    volume written, its folder)."""
    folder = tmp_path_factory.mktemp("outputs")
    volumes = {
        "dicom_ct_series": upsampled(read_volume(source_series(folder / "source")), (2, 2, 1)),
        "dicom_ct": crop(read_volume(sample_path("ct_head_slice")), (200, 200, 0), (264, 248, 1)),
        "dicom_mr": crop(read_volume(sample_path("mr_shoulder")), (400, 400, 0), (464, 448, 1)),
        "nifti_mr": crop(read_volume(sample_path("colin27"), modality="MR"), (10, 40, 80), (74, 104, 83)),
        "nifti_ct": crop(read_volume(sample_path("cranium_ct"), modality="CT"), (96, 96, 50), (160, 144, 53)),
    }
    written = {}
    for name, volume in volumes.items():
        write_volume(volume, folder / name, description=f"SR test {name}")
        written[name] = volume, folder / name
    anonymized = volumes["dicom_ct_series"]
    write_volume(anonymized, folder / "anonymized", anonymize=Deidentifier("pixels-only"))
    written["anonymized"] = anonymized, folder / "anonymized"
    return written


CASES = ("dicom_ct_series", "dicom_ct", "dicom_mr", "nifti_mr", "nifti_ct", "anonymized")


def tool(name: str) -> str:
    """The path of an external program, or a skip that says how to install it."""
    package = {"dciodvfy": "dicom3tools", "dcm2niix": "dcm2niix"}[name]
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian: apt-get install {package})")
    return path


@pytest.mark.parametrize("case", CASES)
def test_dciodvfy_finds_no_error(outputs, case):
    dciodvfy = tool("dciodvfy")
    _, folder = outputs[case]
    for file in sorted(folder.iterdir())[:2]:
        result = subprocess.run([dciodvfy, str(file)], capture_output=True, text=True, check=False)
        report = result.stdout + result.stderr
        assert re.search(r"^(CT|MR|SC)Image$", report, re.MULTILINE), report  # the IOD it checked against
        assert [line for line in report.splitlines() if line.startswith("Error")] == []


@pytest.mark.parametrize("case", CASES)
def test_dcm2niix_reads_the_geometry_of_medsrs_nifti(tmp_path, outputs, case):
    dcm2niix = tool("dcm2niix")
    volume, folder = outputs[case]
    command = [dcm2niix, "-z", "n", "-b", "n", "-o", str(tmp_path), "-f", "converted", str(folder)]
    subprocess.run(command, capture_output=True, check=True)
    write_volume(volume, tmp_path / "medsr.nii")
    # Each tool stores the voxels in its own axis order; in the closest canonical (RAS) order they must agree.
    theirs, ours = (nib.as_closest_canonical(nib.load(tmp_path / name)) for name in ("converted.nii", "medsr.nii"))
    assert theirs.shape == ours.shape
    np.testing.assert_allclose(theirs.affine, ours.affine, atol=1e-4)
    assert np.abs(theirs.get_fdata() - ours.get_fdata()).max() <= tolerance(folder, volume)


@pytest.mark.parametrize("case", CASES)
def test_simpleitk_reads_the_geometry(outputs, case):
    sitk = pytest.importorskip("SimpleITK")
    volume, folder = outputs[case]
    image = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    assert image.GetSize() == volume.spatial_shape
    # The corners of the grid in LPS (ITK's world), whichever corner each tool starts from.
    theirs = np.array([image.TransformIndexToPhysicalPoint(c) for c in corners(image.GetSize())])
    ours = np.array([LPS @ (volume.affine @ [*c, 1])[:3] for c in corners(volume.spatial_shape)])
    distances = np.linalg.norm(theirs[:, np.newaxis] - ours[np.newaxis], axis=-1)
    assert distances.min(axis=1).max() < 1e-3 and distances.min(axis=0).max() < 1e-3


def corners(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The voxel indices of a grid's corners."""
    return list(itertools.product(*[(0, n - 1) for n in shape]))


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
