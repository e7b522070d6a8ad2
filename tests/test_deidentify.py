"""De-identification after PS3.15 Annex E (Table E.1-1, Basic Profile): every attribute of the table, at the top
level and inside sequences, with private, curve and overlay elements beside them."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_has_tag, dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

import medsr
from medsr.deidentify import BASIC_PROFILE, Deidentifier, deidentify
from medsr.io import read_volume, volume_writer, write_volume

# What each code of the table must do here: the one of a combined code that removes most.
EXPECTED = {"X": "X", "X/Z": "X", "X/D": "X", "X/Z/D": "X", "X/Z/U*": "X", "Z": "Z", "Z/D": "Z", "D": "D", "U": "U"}
# What a reader needs to rebuild the image and place it: unchanged by either mode.
IMAGE = (
    "SOPClassUID",
    "Modality",
    "ImageType",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PixelSpacing",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SliceThickness",
    "SpacingBetweenSlices",
    "SliceLocation",
    "RescaleIntercept",
    "RescaleSlope",
    "WindowCenter",
    "WindowWidth",
    "PatientPosition",
    "InstanceNumber",
    "SeriesNumber",
    "SpecificCharacterSet",
    "PixelData",
)
MARKERS = (
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "ContributingEquipmentSequence",
)
LEAKS = ("SECRET", "Secret^", "1.2.3.999.", "20010203", "040506.123456")  # in every value ``identifying`` makes


def identifying(index: int, vr: str) -> object:
    """A valid value of ``vr`` for table row ``index``, showing one of ``LEAKS`` where the VR can."""
    text = f"SECRET{index}"
    values = {
        "AS": "042Y",
        "DA": "20010203",
        "DS": "12.5",
        "DT": "20010203040506.123456",
        "IS": "42",
        "PN": f"Secret^Name{index}",
        "TM": "040506.123456",
        "UI": f"1.2.3.999.{index}",
        "UR": f"http://secret{index}.example",
    }
    if vr in values:
        return values[vr]
    if vr in ("OB", "OW", "UN"):
        return text.encode().ljust(10)
    if vr == "SQ":
        item = Dataset()
        item.CodeMeaning = text
        return [item]
    return text if vr in ("AE", "CS", "LO", "LT", "SH", "ST", "UC", "UT") else 7


def fill(ds: Dataset, *, skip_groups: tuple[int, ...] = ()) -> list[str]:
    """Add every attribute of the table that pydicom knows to ``ds``; return the tags it does not know."""
    unknown = []
    for index, (tag, _, _) in enumerate(BASIC_PROFILE):
        if not dictionary_has_tag(tag):
            unknown.append(str(tag))
        elif tag.group not in skip_groups:
            ds.add_new(tag, dictionary_VR(tag), identifying(index, dictionary_VR(tag)))
    return unknown


def with_extras(ds: Dataset) -> Dataset:
    """``ds`` with the table at the top level, inside ContributingEquipmentSequence (not in the table, so walked)
    and inside a private sequence, plus private, curve and overlay elements."""
    fill(ds)
    nested = Dataset()
    fill(nested)
    nested.add_new(0x60024000, "LT", "SECRET overlay in an item")
    ds.ContributingEquipmentSequence = [nested]
    block = ds.private_block(0x0011, "MEDSR TEST", create=True)
    private_item = Dataset()
    fill(private_item)
    block.add_new(0x01, "SQ", [private_item])
    block.add_new(0x02, "LO", "SECRET private")
    ds.add_new(0x50000005, "US", 1)  # CurveDimensions
    ds.add_new(0x50003000, "OB", b"SECRET")  # CurveData
    ds.add_new(0x60000010, "US", 128)  # OverlayRows
    ds.add_new(0x60003000, "OW", bytes(128 * 128 // 8))  # OverlayData
    ds.add_new(0x60024000, "LT", "SECRET overlay comment")  # OverlayComments
    return ds


def ct_small() -> Dataset:
    return pydicom.dcmread(get_testdata_file("CT_small.dcm"))


def survivors(before: Dataset, after: Dataset, deidentifier: Deidentifier, where: str) -> list[str]:
    """The table's attributes of ``before`` that ``after`` does not show de-identified by their action."""
    found = []
    for tag, code, keyword in BASIC_PROFILE:
        if tag not in before:
            continue
        old, action = before[tag].value, EXPECTED[code]
        new = after[tag].value if tag in after else None
        if before[tag].VR == "UI" and action == "D":
            action = "U"  # a dummy UID is a new one
        if action == "X":
            ok = tag not in after
        elif action == "Z":
            ok = tag in after and after[tag].is_empty
        elif action == "D":
            ok = tag in after and not after[tag].is_empty and new != old
        else:
            ok = tag in after and new == deidentifier.uid(old) != old
        if not ok:
            found.append(f"{where}{keyword} ({code}): {new!r}")
    return found


def walk(ds: Dataset) -> list[pydicom.DataElement]:
    """Every element of ``ds``, in sequence items too."""
    elements = []
    ds.walk(lambda _, element: elements.append(element))
    return elements


def test_the_table_is_pydicoms_dictionary_and_the_standards_codes():
    assert len(BASIC_PROFILE) == 617  # 2024b, without its 4 pattern rows (private, curves, overlays)
    assert len({tag for tag, _, _ in BASIC_PROFILE}) == 617
    unknown = fill(Dataset())
    assert unknown == [], f"{len(unknown)} tags pydicom does not know: {unknown}"
    assert [(tag, kw) for tag, _, kw in BASIC_PROFILE if keyword_for_tag(tag) != kw] == []
    assert {code for _, code, _ in BASIC_PROFILE} <= set(EXPECTED)
    codes = {kw: code for _, code, kw in BASIC_PROFILE}
    for keyword in ("AdmissionID", "Allergies", "MedicalAlerts", "PregnancyStatus", "ReasonForStudy", "GantryID"):
        assert codes[keyword] == "X", keyword
    assert codes["OriginalAttributesSequence"] == "X" and codes["StudyInstanceUID"] == "U"
    assert codes["InstitutionName"] == "X/Z/D" and codes["PatientID"] == "Z/D" and codes["DetectorID"] == "X/D"


def test_no_table_attribute_survives_at_any_depth():
    before = with_extras(ct_small())
    after, deidentifier = copy.deepcopy(before), Deidentifier()
    deidentify(after, deidentifier)

    nested = before.ContributingEquipmentSequence[0], after.ContributingEquipmentSequence[0]
    left = survivors(before, after, deidentifier, "") + survivors(*nested, deidentifier, "ContributingEquipment > ")
    assert left == [], f"{len(left)} attributes survive: {left}"
    elements = walk(after)
    assert [e.tag for e in elements if e.tag.is_private or e.tag.group >> 8 in (0x50, 0x60)] == []
    originals = {str(e.value) for e in walk(before) if e.VR in ("PN", "DA", "DT", "TM") and not e.is_empty}
    assert [e for e in elements if e.VR in ("PN", "DA", "DT", "TM") and str(e.value) in originals] == []
    texts = [str(e.value) for e in elements if e.VR not in ("SQ", "OB", "OW")]
    assert [text for text in texts if any(leak in text for leak in LEAKS)] == []
    assert "OriginalAttributesSequence" not in after and "ReferencedImageSequence" not in after
    assert after.PatientName == "" and after.PatientID == "" and after.ContentSequence == [Dataset()]
    assert after.PatientIdentityRemoved == "YES" and "PS3.15" in after.DeidentificationMethod
    code = after.DeidentificationMethodCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("113100", "DCM")


def test_image_and_geometry_are_unchanged():
    before = with_extras(ct_small())
    for mode in ("basic", "pixels-only"):
        after = copy.deepcopy(before)
        deidentify(after, Deidentifier(mode))
        assert [kw for kw in IMAGE if after.get(kw) != before.get(kw)] == [], mode
        np.testing.assert_array_equal(after.pixel_array, before.pixel_array)


def series(deidentifier: Deidentifier) -> tuple[list[Dataset], list[Dataset]]:
    """Three slices of one series (as read, file meta included), each referencing the first in a sequence, before
    and after de-identification with ``deidentifier``."""
    slices = []
    for k in range(3):
        ds = ct_small()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.3.999.7.{k}"
        reference = Dataset()
        reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = CTImageStorage, "1.2.3.999.7.0"
        instances = Dataset()
        instances.ReferencedInstanceSequence = [reference]
        ds.ReferencedSeriesSequence = [instances]
        slices.append(ds)
    after = copy.deepcopy(slices)
    for ds in after:
        deidentify(ds, deidentifier)
    return slices, after


def test_uids_map_consistently_within_one_deidentifier_only():
    deidentifier = Deidentifier()
    before, after = series(deidentifier)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({ds[keyword].value for ds in after}) == 1, keyword
        assert after[0][keyword].value != before[0][keyword].value, keyword
    first = after[0].SOPInstanceUID
    assert len({ds.SOPInstanceUID for ds in after}) == 3 and first != before[0].SOPInstanceUID
    for ds in after:
        reference = ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
        assert reference.ReferencedSOPInstanceUID == first  # a nested reference follows the instance it names
        assert reference.ReferencedSOPClassUID == CTImageStorage  # standard UIDs stay
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian and ds.SOPClassUID == CTImageStorage
    assert all(UID(ds.SOPInstanceUID).is_valid for ds in after)

    _, other = series(Deidentifier())  # another run: nothing in common with the first
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID"):
        assert other[0][keyword].value != after[0][keyword].value, keyword
    assert "_salt" not in repr(deidentifier)


def test_pixels_only_keeps_the_image_geometry_and_empty_type_2_attributes():
    before = with_extras(ct_small())
    after = copy.deepcopy(before)
    deidentify(after, Deidentifier("pixels-only"))
    uids = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")
    rest = [e.keyword for e in after if e.keyword not in (*IMAGE, *MARKERS, *uids) and not e.is_empty]
    assert rest == []
    assert [kw for kw in uids if after[kw].value == before[kw].value] == []
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "AccessionNumber"):
        assert after[keyword].is_empty, keyword
    assert [e.keyword for e in after if e.VR == "SQ"] == [
        "DeidentificationMethodCodeSequence",
        "ContributingEquipmentSequence",
    ]
    assert [item.Manufacturer for item in after.ContributingEquipmentSequence] == ["medsr"]  # the source's: gone


@pytest.mark.parametrize(
    ("mode", "options"), [("basic", []), ("pixels-only", ["113103", "113104", "113105"])], ids=["basic", "pixels"]
)
def test_the_method_and_equipment_are_recorded_after_an_earlier_de_identification(mode, options):
    """PS3.15 E.1.1: the profile (113100) and the options a mode amounts to (CID 7050: Clean Graphics, Structured
    Content, Descriptors), after the steps before it; medsr as De-identifying Equipment (109104, CID 7005)."""
    ds = ct_small()
    ds.PatientIdentityRemoved, ds.DeidentificationMethod = "YES", "site tool 2.1"
    earlier = Dataset()
    earlier.CodeValue, earlier.CodingSchemeDesignator, earlier.CodeMeaning = "113109", "DCM", "Retain Device Identity"
    ds.DeidentificationMethodCodeSequence = [earlier]
    deidentify(ds, Deidentifier(mode))
    assert ds.PatientIdentityRemoved == "YES"
    assert list(ds.DeidentificationMethod)[0] == "site tool 2.1" and len(ds.DeidentificationMethod) == 2
    codes = [(c.CodeValue, c.CodingSchemeDesignator) for c in ds.DeidentificationMethodCodeSequence]
    assert codes == [("113109", "DCM"), ("113100", "DCM"), *((code, "DCM") for code in options)]
    equipment = ds.ContributingEquipmentSequence[-1]
    assert (equipment.Manufacturer, equipment.SoftwareVersions) == ("medsr", medsr.__version__)
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109104"


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="pixels-only"):
        Deidentifier("strict")


def identified_source(folder: Path) -> Path:
    """A one-slice DICOM series on disk carrying every table attribute (top level and nested) and a private tag."""
    ds = ct_small()
    fill(ds, skip_groups=(0x0000, 0x0002))  # command and file meta groups live outside a stored data set
    nested = Dataset()
    fill(nested, skip_groups=(0x0000, 0x0002))
    ds.ContributingEquipmentSequence = [nested]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]  # ImageType is not in the table: keep it sensible
    folder.mkdir()
    ds.save_as(folder / "1.dcm", enforce_file_format=True)
    return folder


def test_written_series_carry_no_identifier(tmp_path):
    source = read_volume(identified_source(tmp_path / "source"))
    original = source.meta["dicom"]
    run = Deidentifier()
    write_volume(source, tmp_path / "a", description="SR x2 test", anonymize=run)
    with volume_writer(
        tmp_path / "b",
        spatial_shape=source.spatial_shape,
        affine=source.affine,
        modality=source.modality,
        meta=source.meta,
        description="SR x2 map",
        anonymize=run,
    ) as write:
        write(source.array[0].numpy())
    write_volume(source, tmp_path / "c", description="SR x2 test", anonymize=True)
    write_volume(source, tmp_path / "d", description="SR x2 test", anonymize=Deidentifier("pixels-only"))

    (a,), (b,), (c,), (d,) = ([pydicom.dcmread(f) for f in sorted((tmp_path / n).iterdir())] for n in "abcd")
    for name in "abcd":
        data = next((tmp_path / name).iterdir()).read_bytes()
        identifiers = [*LEAKS, "CompressedSamples", original.StudyInstanceUID, original.SOPInstanceUID, "CLUNIE"]
        assert [text for text in identifiers if text.encode() in data] == [], name
    assert (a.StudyInstanceUID, a.FrameOfReferenceUID) == (b.StudyInstanceUID, b.FrameOfReferenceUID)  # one run
    assert a.SeriesInstanceUID != b.SeriesInstanceUID
    assert c.StudyInstanceUID not in (a.StudyInstanceUID, original.StudyInstanceUID)  # its own run
    assert a.PatientIdentityRemoved == c.PatientIdentityRemoved == d.PatientIdentityRemoved == "YES"
    assert "InstitutionAddress" not in a and "InstitutionAddress" not in a.ContributingEquipmentSequence[0]
    assert [e.keyword for e in d if e.VR == "SQ"] == [
        "DerivationCodeSequence",
        "DeidentificationMethodCodeSequence",
        "ContributingEquipmentSequence",
    ]
    purposes = [item.PurposeOfReferenceCodeSequence[0].CodeValue for item in d.ContributingEquipmentSequence]
    assert purposes == ["109104", "109102"]  # De-identifying, then Processing Equipment
    # The source's UIDs would identify it: no references to the source slices or series.
    for ds in (a, b, c, d):
        assert "SourceImageSequence" not in ds and "ReferencedSeriesSequence" not in ds
    for name in "abcd":
        read = read_volume(tmp_path / name)
        np.testing.assert_allclose(read.affine, source.affine, atol=1e-4)
        np.testing.assert_allclose(read.array.numpy(), source.array.numpy(), atol=0.5)
