"""Enhanced (multi-frame) DICOM: read frame by frame from its functional groups, as the classic series of the same
data; written as one Legacy Converted Enhanced CT/MR file. Real images: pydicom's CT_small, MR_small, eCT_Supplemental
and emri_small."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from highdicom.legacy import LegacyConvertedEnhancedCTImage, LegacyConvertedEnhancedMRImage
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid

from medsr import dicom, dicom_write
from medsr.cli import main
from medsr.dicom_write import write_series
from medsr.io import open_volume, read_volume
from medsr.volume import Modality

from .test_dicom_write import upsampled

LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS, written out independently of medsr.dicom


def _oblique() -> np.ndarray:
    """ImageOrientationPatient of a slice rotated about every axis, to 6 decimals as scanners write it."""
    (ca, sa), (cb, sb), (cc, sc) = ((np.cos(t), np.sin(t)) for t in (0.3, -0.5, 0.7))
    rotation = (
        np.array([[cc, -sc, 0], [sc, cc, 0], [0, 0, 1]])
        @ np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
        @ np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])
    )
    return np.round(np.concatenate([rotation[:, 0], rotation[:, 1]]), 6)


OBLIQUE = _oblique()


def classic_series(folder: Path, name: str, n: int = 5, *, iop=None, gap: float = 2.5, rescales=None) -> list[Dataset]:
    """``n`` slices of pydicom's real image ``name`` written to ``folder``: slice k lies ``gap`` mm further along the
    normal of ``iop`` (default: the image's), its pixels shifted by 7 k, with ``rescales[k]`` = (slope, intercept)."""
    template = pydicom.dcmread(get_testdata_file(name))
    iop = np.asarray(template.ImageOrientationPatient if iop is None else iop, dtype=float)
    origin, normal = np.asarray(template.ImagePositionPatient, dtype=float), np.cross(iop[:3], iop[3:])
    series, datasets = generate_uid(), []
    folder.mkdir()
    for k in range(n):
        ds = copy.deepcopy(template)
        ds.SeriesInstanceUID, ds.InstanceNumber = series, k + 1
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImageOrientationPatient = iop.tolist()
        ds.ImagePositionPatient = [round(float(x), 4) for x in origin + k * gap * normal]
        ds.PixelData = (ds.pixel_array + 7 * k).astype(ds.pixel_array.dtype).tobytes()
        if rescales is not None:
            ds.RescaleSlope, ds.RescaleIntercept = rescales[k]
        ds.save_as(folder / f"slice{k}.dcm", enforce_file_format=True)
        datasets.append(ds)
    return datasets


def converted(datasets: list[Dataset], file: Path, order=None, series: str | None = None) -> Path:
    """The classic slices as one Legacy Converted Enhanced image (highdicom) of the series ``series`` (default: a
    new one), frames in ``order`` (not sorted)."""
    image_class = LegacyConvertedEnhancedCTImage if datasets[0].Modality == "CT" else LegacyConvertedEnhancedMRImage
    image = image_class(
        [datasets[k] for k in (order or range(len(datasets)))],
        series_instance_uid=series or generate_uid(),
        series_number=1,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        include_dimension_index=False,
    )
    image.save_as(file, enforce_file_format=True)
    return file


def refusal(file: Path) -> str:
    """The one-line error reading ``file`` gives."""
    with pytest.raises(ValueError) as error:
        read_volume(file)
    message = str(error.value)
    assert len(message.splitlines()) == 1 and str(file) in message, message
    return message


def dciodvfy_errors(file: Path) -> list[str]:
    """dciodvfy's (dicom3tools) errors on ``file``; a skip where it is not installed."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy is not installed (Debian: apt-get install dicom3tools)")
    report = subprocess.run([tool, str(file)], capture_output=True, text=True, check=False)
    return [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.parametrize(
    ("name", "iop", "rescales"),
    [
        ("CT_small.dcm", None, None),
        ("CT_small.dcm", OBLIQUE, [(1, -1024), (0.5, -1000), (2, -1024), (1, -900), (1.5, 0)]),  # per frame
        ("MR_small.dcm", None, None),
        ("MR_small.dcm", OBLIQUE, None),
    ],
    ids=["ct", "ct-oblique-rescale-per-frame", "mr", "mr-oblique"],
)
def test_legacy_converted_reads_as_its_classic_series(tmp_path, name, iop, rescales):
    datasets = classic_series(tmp_path / "classic", name, iop=iop, rescales=rescales)
    file = converted(datasets, tmp_path / "enhanced.dcm", order=[3, 0, 4, 2, 1])  # frames out of order

    classic, enhanced = read_volume(tmp_path / "classic"), read_volume(file)

    np.testing.assert_array_equal(enhanced.array.numpy(), classic.array.numpy())
    np.testing.assert_allclose(enhanced.affine, classic.affine, rtol=0, atol=1e-6)
    assert enhanced.modality is classic.modality
    frames = [image.frame for image in enhanced.meta["dicom_images"]]
    assert frames == [2, 5, 4, 1, 3]  # the frame holding slice k, by k
    assert enhanced.meta["dicom"].PixelSpacing == datasets[0].PixelSpacing  # the functional groups' attributes


def test_frames_are_read_one_at_a_time(tmp_path, monkeypatch):
    """A slab decodes its frames alone: the file is never read whole (io.open_volume streams it)."""
    file = converted(classic_series(tmp_path / "classic", "CT_small.dcm"), tmp_path / "enhanced.dcm")
    whole = read_volume(file).array[0].numpy()
    monkeypatch.setattr(dicom, "_read", lambda *args: pytest.fail("read the whole file"))
    scan = open_volume(file)
    assert scan.spatial_shape == (128, 128, 5)
    np.testing.assert_array_equal(scan.read_slab(1, 4), whole[:, :, 1:4])


def test_enhanced_ct_with_functional_groups():
    """pydicom-data's eCT_Supplemental: an Enhanced CT perfusion map of 2 frames, 10 mm apart, IOP row cosine -x."""
    file = Path(get_testdata_file("eCT_Supplemental.dcm"))
    ds = pydicom.dcmread(file)

    volume = read_volume(file)

    assert volume.modality is Modality.CT and volume.spatial_shape == (512, 512, 2)
    np.testing.assert_allclose(volume.spacing, (0.388672, 0.388672, 10.0), rtol=1e-6)
    by_k = [1, 0]  # frame 2 (z -149) lies first along the normal (0, 0, -1)
    np.testing.assert_array_equal(volume.array[0].numpy(), ds.pixel_array[by_k].transpose(2, 1, 0) - 1024.0)
    np.testing.assert_allclose(volume.affine[:3, 3], LPS @ [99.5, -301.5, -149.0])
    np.testing.assert_allclose(volume.affine[:3, :3], LPS @ np.diag([-0.388672, 0.388672, -10.0]), atol=1e-9)


def test_cli_info_on_an_enhanced_file(capsys):
    file = get_testdata_file("eCT_Supplemental.dcm")
    assert main(["info", file]) == 0
    assert "shape=(512, 512, 2)" in capsys.readouterr().out


def test_emri_small_without_functional_groups_is_refused():
    """pydicom-data's emri_small lost its functional groups: only SpacingBetweenSlices is left, nothing places the
    frames (medsr.samples converts it with 1 mm pixels assumed)."""
    message = refusal(Path(get_testdata_file("emri_small.dcm")))
    assert "10 frames without functional groups" in message


@pytest.fixture
def emri(tmp_path) -> Path:
    """emri_small (Enhanced MR Image Storage) with functional groups put back: 0.9 mm pixels, sagittal, frames 1.2 mm
    apart (its SpacingBetweenSlices) stored from the last position to the first."""
    ds = pydicom.dcmread(get_testdata_file("emri_small.dcm"))
    measures, orientation = Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [0.9, 0.9], 1.2
    orientation.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # normal (row x column) -x: to the patient's right
    shared = Dataset()
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [measures], [orientation]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = []
    for f in range(10):
        position, frame = Dataset(), Dataset()
        position.ImagePositionPatient = [19.2 + 1.2 * f, -20.0, 40.0]
        frame.PlanePositionSequence = [position]
        ds.PerFrameFunctionalGroupsSequence.append(frame)
    ds.save_as(tmp_path / "emri.dcm", enforce_file_format=True)
    return tmp_path / "emri.dcm"


def test_enhanced_mr_with_functional_groups_put_back(emri):
    frames = pydicom.dcmread(emri).pixel_array  # (frame, row, column)

    volume = read_volume(emri)

    assert volume.modality is Modality.MR and volume.spatial_shape == (64, 64, 10)
    np.testing.assert_array_equal(volume.array[0].numpy(), frames[::-1].transpose(2, 1, 0))
    lps = np.array([[0, 0, -1.2], [0.9, 0, 0], [0, -0.9, 0]])  # i along +y, j along -z, k along -x
    np.testing.assert_allclose(volume.affine[:3, :3], LPS @ lps, atol=1e-9)
    np.testing.assert_allclose(volume.affine[:3, 3], LPS @ [30.0, -20.0, 40.0])  # the last frame's position


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({3: {"ImageOrientationPatient": OBLIQUE.tolist()}}, r"ImageOrientationPatient differs between slices \(frame"),
        ({3: {"ImagePositionPatient": [0.0, 0.0, 0.0]}}, r"irregular slice spacing"),
        ({3: "drop"}, r"irregular slice spacing: 2\.5 mm to 5 mm"),
        ({3: "repeat 1"}, r"frame 2 and frame 4 share the position .* not several volumes \(time points, echoes\)"),
    ],
    ids=["orientation", "position", "missing-frame", "time-point"],
)
def test_frames_that_are_not_one_regular_stack_are_refused(tmp_path, change, problem):
    datasets = classic_series(tmp_path / "classic", "CT_small.dcm")
    order = list(range(5))
    for k, what in change.items():
        if what == "drop":
            order.remove(k)
        elif what == "repeat 1":
            datasets[k].ImagePositionPatient = datasets[1].ImagePositionPatient  # two volumes: the same place
        else:
            for keyword, value in what.items():
                setattr(datasets[k], keyword, value)
    file = converted(datasets, tmp_path / "enhanced.dcm", order=order)
    assert re.search(problem, refusal(file))


def test_a_multi_frame_file_among_other_files_is_refused(tmp_path):
    datasets = classic_series(tmp_path / "series", "CT_small.dcm")
    converted(datasets, tmp_path / "series" / "enhanced.dcm", series=datasets[0].SeriesInstanceUID)
    with pytest.raises(ValueError, match=r"the multi-frame file enhanced.dcm is one of 6 files of a series"):
        read_volume(tmp_path / "series")


def test_limits_hold_per_frame_before_decoding(tmp_path, monkeypatch):
    """The per-file limit is per frame; a header declaring a frame over it is refused before a pixel is decoded."""
    file = converted(classic_series(tmp_path / "classic", "CT_small.dcm"), tmp_path / "enhanced.dcm")
    frame_bytes = 128 * 128 * 2
    monkeypatch.setattr(dicom, "MAX_SLICE_BYTES", frame_bytes)  # a fifth of the file's pixel data
    assert read_volume(file).spatial_shape == (128, 128, 5)
    monkeypatch.setattr(dicom, "MAX_SLICE_BYTES", frame_bytes - 1)
    monkeypatch.setattr(dicom, "pixel_array", lambda *args, **kwargs: pytest.fail("decoded"))
    assert f"{frame_bytes:,} bytes of pixel data per frame, over the limit" in refusal(file)
    monkeypatch.setattr(dicom, "MAX_SLICE_BYTES", 2**27)
    monkeypatch.setattr(dicom, "MAX_VOLUME_BYTES", 4 * frame_bytes)  # a whole read: 5 frames as float32
    assert "128 x 128 x 5 voxels need" in refusal(file)


def test_more_frames_declared_than_described_is_corrupt(tmp_path):
    file = converted(classic_series(tmp_path / "classic", "CT_small.dcm"), tmp_path / "enhanced.dcm")
    ds = pydicom.dcmread(file)
    ds.NumberOfFrames, ds.PixelData = 4, ds.PixelData[: 4 * 128 * 128 * 2]
    ds.save_as(file)
    assert "NumberOfFrames is 4, but PerFrameFunctionalGroupsSequence has 5 items" in refusal(file)


# Writing: classic slices by default, one Legacy Converted Enhanced file with enhanced=True


@pytest.fixture
def ct_source(tmp_path) -> Path:
    """An oblique 5-slice CT series of CT_small, rescaled differently per slice."""
    rescales = [(1, -1024), (0.5, -1000), (2, -1024), (1, -900), (1.5, 0)]
    classic_series(tmp_path / "source", "CT_small.dcm", iop=OBLIQUE, rescales=rescales)
    return tmp_path / "source"


@pytest.mark.parametrize("source", ["classic", "enhanced"])
def test_enhanced_output_reads_as_the_classic_output(tmp_path, ct_source, source):
    if source == "enhanced":
        ct_source = converted([pydicom.dcmread(f) for f in sorted(ct_source.iterdir())], tmp_path / "source.dcm")
    read = read_volume(ct_source)
    volume = upsampled(read, (2, 2, 1))

    classic = write_series(volume, tmp_path / "classic", description="SR test")
    [file] = write_series(volume, tmp_path / "enhanced", description="SR test", enhanced=True)

    assert len(classic) == 5 and file == tmp_path / "enhanced" / "0001.dcm"
    ours, theirs = read_volume(tmp_path / "enhanced"), read_volume(tmp_path / "classic")
    np.testing.assert_array_equal(ours.array.numpy(), theirs.array.numpy())
    np.testing.assert_allclose(ours.affine, theirs.affine, rtol=0, atol=1e-6)
    ds = pydicom.dcmread(file)
    assert ds.SOPClassUID.name == "Legacy Converted Enhanced CT Image Storage" and ds.NumberOfFrames == 5
    assert ds.SeriesDescription == "SR test"
    # The source images are referenced (frames of an enhanced source by number); the slices, never stored, are not.
    [evidence] = ds.SourceImageEvidenceSequence
    [series] = evidence.ReferencedSeriesSequence
    assert {item.ReferencedSOPInstanceUID for item in series.ReferencedSOPSequence} == {
        image.sop_instance_uid for image in read.meta["dicom_images"]
    }
    assert [item.SeriesInstanceUID for item in ds.ReferencedSeriesSequence] == [read.meta["dicom"].SeriesInstanceUID]
    for frame in ds.PerFrameFunctionalGroupsSequence:
        assert "ConversionSourceAttributesSequence" not in frame
        [reference] = frame.DerivationImageSequence[0].SourceImageSequence
        assert ("ReferencedFrameNumber" in reference) == (source == "enhanced")
    assert dciodvfy_errors(file) == []
    assert dciodvfy_errors(classic[0]) == []
    write_series(volume, tmp_path / "enhanced", description="SR again", enhanced=True)  # medsr's: replaced


@pytest.mark.parametrize("anonymize", [False, True])
def test_enhanced_mr_output_without_source_header(tmp_path, phantom, anonymize):
    volume = phantom.replace(array=phantom.array * 750 + 100)  # MR units, as if read from NIfTI
    write_series(volume, tmp_path / "classic", description="SR test", anonymize=anonymize)
    [file] = write_series(volume, tmp_path / "enhanced", description="SR test", anonymize=anonymize, enhanced=True)
    ours, theirs = read_volume(tmp_path / "enhanced"), read_volume(tmp_path / "classic")
    np.testing.assert_array_equal(ours.array.numpy(), theirs.array.numpy())
    np.testing.assert_allclose(ours.affine, theirs.affine, rtol=0, atol=1e-6)
    ds = pydicom.dcmread(file)
    assert ds.SOPClassUID.name == "Legacy Converted Enhanced MR Image Storage"
    if anonymize:  # no dates: PS3.15's dummy in the Type 1 ones, highdicom's creation date dropped
        assert (ds.ContentDate, ds.ContentTime) == ("19000101", "000000") and "InstanceCreationDate" not in ds
    assert dciodvfy_errors(file) == []


def test_series_derived_from_an_enhanced_mr(tmp_path, emri):
    """Classic slices of a derived series reference their frames of the source, are of the classic MR class and
    carry the Type 1 attributes the Enhanced MR header keeps elsewhere. emri_small lost more than its functional
    groups (no Manufacturer, a VelocityEncodingDirection 0\\0\\0): the derived series add no error to its own."""
    volume = read_volume(emri)
    files = write_series(volume, tmp_path / "classic", description="SR test")
    [file] = write_series(volume, tmp_path / "enhanced", description="SR test", enhanced=True)
    ds = pydicom.dcmread(files[0])
    assert ds.SOPClassUID.name == "MR Image Storage" and "NumberOfFrames" not in ds
    assert "PerFrameFunctionalGroupsSequence" not in ds and ds.ScanningSequence == "RM"
    [reference] = ds.SourceImageSequence
    assert (reference.ReferencedSOPInstanceUID, reference.ReferencedFrameNumber) == (
        volume.meta["dicom"].SOPInstanceUID,
        10,
    )
    np.testing.assert_array_equal(read_volume(tmp_path / "classic").array.numpy(), volume.array.numpy())
    np.testing.assert_array_equal(read_volume(tmp_path / "enhanced").array.numpy(), volume.array.numpy())
    source_errors = set(dciodvfy_errors(emri))
    assert set(dciodvfy_errors(files[0])) <= source_errors
    assert set(dciodvfy_errors(file)) <= source_errors


def test_series_derived_from_an_enhanced_ct(tmp_path):
    """eCT_Supplemental, both ways: its contrast agents keep their use (the shared functional group) in the enhanced
    file; the classic slices are CT Image Storage."""
    volume = read_volume(get_testdata_file("eCT_Supplemental.dcm"))
    [first, _] = write_series(volume, tmp_path / "classic", description="SR test")
    [file] = write_series(volume, tmp_path / "enhanced", description="SR test", enhanced=True)
    assert pydicom.dcmread(first).SOPClassUID == CTImageStorage
    shared = pydicom.dcmread(file).SharedFunctionalGroupsSequence[0]
    assert shared.ContrastBolusUsageSequence[0].ContrastBolusAgentAdministered == "YES"
    for folder in ("classic", "enhanced"):
        np.testing.assert_array_equal(read_volume(tmp_path / folder).array.numpy(), volume.array.numpy())
    assert dciodvfy_errors(first) == []
    assert dciodvfy_errors(file) == []


def test_enhanced_output_refusals(tmp_path, phantom, ct_source, monkeypatch):
    """Enhanced output is for CT and MR, built in memory within the whole-scan limit; nothing is written otherwise."""
    with pytest.raises(ValueError, match=r"enhanced DICOM is written for CT and MR .* not OT"):
        write_series(phantom.replace(modality=Modality.OT), tmp_path / "ot", description="SR", enhanced=True)
    volume = read_volume(ct_source)
    monkeypatch.setattr(dicom_write, "MAX_VOLUME_BYTES", 4 * 128 * 128 * 5 - 1)
    with pytest.raises(ValueError, match=r"128 x 128 x 5 voxels is built in memory, over the .* limit"):
        write_series(volume, tmp_path / "big", description="SR", enhanced=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]
    assert write_series(volume, tmp_path / "classic", description="SR")  # classic slices: no such limit


def test_a_multi_frame_source_other_than_ct_or_mr_is_not_written(tmp_path, emri):
    volume = read_volume(emri)
    volume.meta["dicom"].SOPClassUID = "1.2.840.10008.5.1.4.1.1.130"  # Enhanced PET Image Storage
    with pytest.raises(ValueError, match=r"the source is a multi-frame Enhanced PET Image Storage"):
        write_series(volume, tmp_path / "out", description="SR")
