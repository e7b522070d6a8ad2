"""Volume -> a new derived DICOM series: geometry from the affine (LPS), intensities back in the source's units,
new UIDs, the source's attributes kept where they still hold, a derivation record that references the source
images, optionally in a new study and de-identified (``deidentify.py``).

The inverse of ``dicom.py``'s reading: ``_slice_geometry`` runs the affine construction backwards [1].

[1] DICOM PS3.3 C.7.6.2.1.1, "Image Position and Image Orientation".
[2] DICOM PS3.3 C.7.6.1.1.2, "Image Type" (DERIVED\\SECONDARY; value 3 for CT C.8.2.1.1.1, MR C.8.3.1.1.1) and
    C.7.6.3, "Image Pixel Module".
[3] DICOM PS3.3 A.4 (MR Image IOD: no Modality LUT, so stored values are the values) and C.11.1.
[4] DICOM PS3.3 C.7.6.1 (General Image: SourceImageSequence, DerivationDescription, DerivationCodeSequence, CID 7202
    and 7203), C.12.1 (SOP Common: ContributingEquipmentSequence, CID 7005), C.12.2 (Common Instance Reference).
[5] DICOM PS3.3 C.7.6.16 and C.7.6.17 (Multi-frame Functional Groups and Dimension), A.70 and A.71 (Legacy
    Converted Enhanced CT and MR Image IODs), C.8.15.3.1 (SourceImageEvidenceSequence, in the Enhanced CT Image
    module and the MR Image and Spectroscopy Instance macro).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import math
import secrets
import warnings
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pydicom.valuerep import DSfloat

from medsr.deidentify import Deidentifier, deidentify
from medsr.dicom import SourceImage, code_item, lps_to_ras, medsr_equipment
from medsr.intensity import percentiles
from medsr.io import atomic_output
from medsr.volume import MAX_VOLUME_BYTES, Modality, Volume

# Writing. Storage class of a series written without a source header, by modality.
_STORAGE_CLASS = {Modality.CT: CTImageStorage, Modality.MR: MRImageStorage, Modality.OT: SecondaryCaptureImageStorage}
# Type 2 attributes (present, may be empty) of the Patient, General Study, General Series, Frame of Reference and
# General Equipment modules, then the modality's image module (PS3.3 A.3 CT, A.4 MR, A.8 Secondary Capture).
_MINIMAL_HEADER = {
    "SpecificCharacterSet": "ISO_IR 192",  # UTF-8, for the caller's description
    "PatientName": "",
    "PatientID": "",
    "PatientBirthDate": "",
    "PatientSex": "",
    "ReferringPhysicianName": "",
    "PatientPosition": "",
    "Manufacturer": "medsr",  # the equipment that made these instances (PS3.3 C.7.5.1)
    "SoftwareVersions": version("medsr"),
    "PositionReferenceIndicator": "",
}
_MODALITY_HEADER = {
    Modality.CT: {
        "KVP": "",
        "AcquisitionNumber": "",
        "RescaleType": "HU",
    },
    # ScanningSequence RM (research mode) and SequenceVariant NONE: the acquisition is unknown (PS3.3 C.8.3.1)
    Modality.MR: {
        "ScanningSequence": "RM",
        "SequenceVariant": "NONE",
        "ScanOptions": "",
        "MRAcquisitionType": "",
        "RepetitionTime": "",
        "EchoTime": "",
        "EchoTrainLength": "",
    },
    # WSD: made on a workstation; PatientOrientation is Type 2C in an image without IOP/IPP in its IOD
    Modality.OT: {"ConversionType": "WSD", "RescaleType": "US", "PatientOrientation": ""},
}
# ImageType value 3 when the source has none: the defined terms for a cross-section (CT) and a derived MR image [2].
_IMAGE_TYPE_3 = {Modality.CT: "AXIAL", Modality.MR: "OTHER"}
# What an instance references: its source images, and all it references by series (Common Instance Reference) [4].
_REFERENCES = ("SourceImageSequence", "ReferencedSeriesSequence", "StudiesContainingOtherReferencedInstancesSequence")
# Attributes of the source that describe its own pixels or instance and would be wrong in the new series.
_SOURCE_ONLY = (
    "InstanceCreationDate",
    "InstanceCreationTime",
    "InstanceCreatorUID",
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "SmallestPixelValueInSeries",
    "LargestPixelValueInSeries",
    "ModalityLUTSequence",
    "IconImageSequence",
    *_REFERENCES,
    "DerivationCodeSequence",
    "RealWorldValueMappingSequence",  # maps the source's stored values
    "ImagesInAcquisition",
    "DataSetTrailingPadding",
    # an enhanced source's multi-frame attributes [5]: a frame's functional groups are at top level (dicom.Frame)
    "NumberOfFrames",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
    "DimensionOrganizationSequence",
    "DimensionIndexSequence",
    "DimensionOrganizationType",
    "ConcatenationUID",
    "ConcatenationFrameOffsetNumber",
    "InConcatenationNumber",
    "InConcatenationTotalNumber",
    "RepresentativeFrameNumber",
    "SOPInstanceUIDOfConcatenationSource",
)
# The classic storage class of a slice of an enhanced CT or MR source, whose header is copied.
_CLASSIC_CLASS = {
    EnhancedCTImageStorage: CTImageStorage,
    LegacyConvertedEnhancedCTImageStorage: CTImageStorage,
    EnhancedMRImageStorage: MRImageStorage,
    LegacyConvertedEnhancedMRImageStorage: MRImageStorage,
}
# MR values spanning fewer integers than this (normalised images, z-scores, maps in small units) are scaled by the
# power of ten that makes them span at least _MR_LEVELS: rounding would cost them more than 3% of their range.
_MR_FEW_LEVELS, _MR_LEVELS = 32, 1000
_MARK = "MEDSR"  # ImplementationVersionName prefix of the files medsr writes: only such a folder is ever replaced
_ENHANCED_NAME = "0001.dcm"  # the one file of an enhanced series: InstanceNumber 1, named as a classic slice is


def write_series(
    volume: Volume,
    folder: Path,
    *,
    description: str,
    anonymize: bool | Deidentifier = False,
    model: str | None = None,
    new_study: bool = False,
    enhanced: bool = False,
) -> list[Path]:
    """Write ``volume`` as a new derived DICOM series, one file per slice k (or one enhanced multi-frame file), into
    the folder ``folder``.

    The inverse of :func:`read_dicom`: reading ``folder`` back gives the same affine (to DS precision, about 1e-10
    mm) and the same array to within half a stored step (see Intensities). Slice k holds
    ``volume.array[0, :, :, k].T`` (Rows = J, Columns = I), placed by IOP = the unit directions of i and j and
    IPP = the world position of voxel (0, 0, k), both in LPS; its file is named by its InstanceNumber. The reader
    orders slices along the slice normal (IOP row x column), so a volume whose affine has a negative determinant
    reads back with k reversed: the same voxels at the same world positions.

    Header: ``volume.meta["dicom"]`` (the source's first slice, see :func:`read_dicom`) is copied without private
    tags and without what described the source's pixels or references; it keeps FrameOfReferenceUID (the same
    patient space) and, unless ``new_study``, StudyInstanceUID. Without a source header (a NIfTI or PNG input) a
    minimal header is built: CT and MR get their storage class, anything else (OT) Secondary Capture, with empty
    patient attributes, Manufacturer "medsr", in a new study (as ``new_study`` makes). The header of an enhanced CT or
    MR source (a frame's, see :func:`read_dicom`) is copied without the multi-frame attributes, with the classic
    storage class and the CT or MR attributes the minimal header has where it lacks them (an Enhanced MR header has
    no ScanningSequence). Either way the series gets a new SeriesInstanceUID, one new SOPInstanceUID per file,
    SeriesNumber + 1000, SeriesDescription = ``description``, the source's window (else the 0.5-99.5 percentile
    range), an empty Laterality unless the source has it, ImageLaterality or FrameLaterality (Type 2C: unknown) and
    geometry from the affine: PixelSpacing, SpacingBetweenSlices = the distance between slice
    planes, SliceLocation = IPP along the slice normal.

    What the slices of a DICOM source (``meta["dicom_images"]`` and ``meta["dicom_affine"]``) become:

    - SliceThickness: the source's where the new slices lie in the source's slice planes (in-plane SR: a 5 mm slice
      every 20 mm stays 5 mm); otherwise (through-plane SR, or no source) the distance between the new planes:
      contiguous slices, as a through-plane model estimates them.
    - InstanceNumber: 1 to K, running along the source's InstanceNumber order (decreasing with k if the source's
      decreased along its slice normal), else with k.
    - Derivation record [4]: ImageType DERIVED\\SECONDARY\\value 3 (the source's, else AXIAL for CT, OTHER for MR),
      DerivationDescription (``description``, the medsr version and ``model``), DerivationCodeSequence DCM 113085
      "Spatial resampling" (CID 7203 has no super-resolution code), a ContributingEquipmentSequence item for medsr
      (DCM 109102 "Processing Equipment", Manufacturer medsr, SoftwareVersions). Each file references the source
      slices it lies across: SourceImageSequence (purpose DCM 121322 "Source image for image processing
      operation"), and the same instances in ReferencedSeriesSequence, or, with ``new_study``, in
      StudiesContainingOtherReferencedInstancesSequence under the source's StudyInstanceUID.

    Intensities: stored as 16-bit integers, uncompressed (Explicit VR Little Endian). CT and OT (Secondary Capture)
    with ``value = stored * RescaleSlope + RescaleIntercept``; see :func:`_rescale` for the rule. MR has no Modality
    LUT [3], so none is written: ``stored = round(value * gain)``, the gain 1 (the source's units) unless the values
    would not fit 16 bits or, from a source without integer steps, span fewer than 32 integers (then it makes them
    span 1000), see :func:`_mr_gain`: a power of ten, named in DerivationDescription and a warning, and a source
    window is replaced by the percentile window.

    Enhanced (``enhanced``, CT and MR): the same slices, converted by highdicom into one Legacy Converted Enhanced
    CT or MR Image [5] of the same series, ``folder/0001.dcm``: each slice is a frame, its own attributes in the
    functional groups (position, references), the shared ones in SharedFunctionalGroupsSequence. The slices are
    never stored, so the file references the source images, not them (no ConversionSourceAttributesSequence), and
    lists them in SourceImageEvidenceSequence. It is built in memory: at most ``MAX_VOLUME_BYTES`` as float32, as
    much as a whole-scan read.

    De-identification (``anonymize``): the shared header goes through :func:`medsr.deidentify.deidentify`, PS3.15
    Annex E's Basic Profile (Table E.1-1) or its pixels-only mode, before the new series' attributes above are set.
    Study and Frame of Reference UIDs get new UIDs from the Deidentifier's secret map: series written with one
    Deidentifier share a new study and frame of reference; ``True`` makes a new Deidentifier (basic mode) per call,
    so nothing links two calls or the originals. The source slices are then not referenced (their UIDs would
    identify them), and dates and times stay empty. Text burned into the pixels is not looked for; ``description``
    and ``model`` are written as given, so they must not identify the patient.

    Most callers want :func:`medsr.io.read_volume`'s counterpart ``write_volume``, which dispatches here.

    Args:
        volume: (1, I, J, K) float32 in physical units (HU for CT), MR, CT or OT, with a RAS+ affine.
        folder: The new series' folder. Written atomically: the files go to a temporary folder beside it, renamed
            to ``folder`` when complete. An existing ``folder`` is replaced only if it is empty or holds only files
            medsr wrote (a previous output), never the source series, nor a folder inside it or holding it.
        description: SeriesDescription, e.g. "SR x2 edsr_baseline" (at most 64 characters).
        anonymize: ``True`` or a :class:`medsr.deidentify.Deidentifier` to de-identify the header (see above).
        model: The model that made the volume, as DerivationDescription records it: its name and a checksum of its
            weights, e.g. "edsr_mr_x2 sha256:3f1c...".
        new_study: Put the series in a new study (new StudyInstanceUID, StudyID, StudyDate/Time now, empty
            AccessionNumber) instead of the source's; the patient and frame of reference stay.
        enhanced: Write one enhanced multi-frame file instead of one file per slice (see above).

    Returns:
        The written files, by k (enhanced: the one file).

    Raises:
        ValueError: Several channels, NaN/inf voxels, a modality without patient geometry (US, CR, DX), a source
            header without ImageOrientationPatient, a multi-frame source other than enhanced CT or MR, a sheared
            grid, a too long description, ``folder`` is (in) the source series, or ``enhanced`` for another modality
            than CT and MR or a volume over the limit. The message names the folder.
        FileExistsError: ``folder`` exists and holds something medsr did not write.
        FileNotFoundError: The parent folder of ``folder`` does not exist.
    """
    folder = Path(folder)
    channels = volume.array.shape[0]
    if channels != 1:
        raise ValueError(
            f"{folder}: a DICOM {volume.modality.value} series holds one value per voxel; got {channels} channels "
            "(RGB is not written); write .nii.gz instead"
        )
    check_series_target(folder, volume.modality, volume.meta, description, enhanced=enhanced)
    values = volume.array[0].detach().float().cpu().numpy()  # (I, J, K)
    return write_series_slices(
        folder,
        lambda: (values[:, :, k] for k in range(values.shape[2])),
        depth=values.shape[2],
        affine=volume.affine,
        modality=volume.modality,
        meta=volume.meta,
        description=description,
        anonymize=anonymize,
        model=model,
        new_study=new_study,
        enhanced=enhanced,
    )


def write_series_slices(
    folder: Path,
    slices: Callable[[], Iterable[np.ndarray]],
    *,
    depth: int,
    affine: np.ndarray,
    modality: Modality,
    meta: Mapping[str, Any],
    description: str,
    anonymize: bool | Deidentifier,
    model: str | None = None,
    new_study: bool = False,
    enhanced: bool = False,
) -> list[Path]:
    """:func:`write_series` for a volume given slice by slice, in memory bounded by a slice (``enhanced``: by the
    volume, see :func:`write_series`), to a target that :func:`check_series_target` accepted.

    ``slices()`` yields the ``depth`` slices (I, J) in k order, in physical units (float32), the same values every
    call. It is called three times: two passes for the value range and the window (exact percentiles, see
    :func:`medsr.intensity.percentiles`), then one to write the files.
    """
    deidentifier = Deidentifier() if anonymize is True else anonymize or None  # one per series: one UID map
    header = _series_header(modality, meta, description, deidentifier, model=model, new_study=new_study)
    iop, pixel_spacing, positions, normal = _slice_geometry(affine, depth, folder)
    header.ImageOrientationPatient = [DSfloat(c, auto_format=True) for c in iop]
    header.PixelSpacing = [DSfloat(s, auto_format=True) for s in pixel_spacing]
    # The distance between slice planes; a single slice is read back with this step along the normal.
    plane_distance = abs(normal @ lps_to_ras(affine)[:3, 2])
    header.SpacingBetweenSlices = DSfloat(plane_distance, auto_format=True)
    source = _SourceSlices.of(meta, affine)  # None: no source slices to keep or reference
    same_planes = source is not None and source.same_planes()
    thickness = float(header.get("SliceThickness") or 0) if same_planes else 0.0  # 0 or absent: unknown
    header.SliceThickness = DSfloat(thickness if thickness > 0 else plane_distance, auto_format=True)
    try:
        low, window_low, window_high, high = percentiles(slices, (0, 0.5, 99.5, 100))
    except ValueError as error:  # NaN or infinite voxels
        raise ValueError(f"{folder}: {error}; DICOM stores integers, fix or mask them first") from None
    slope, intercept, dtype = _set_intensities(header, modality, meta, (low, high), (window_low, window_high), folder)
    photometric = "MONOCHROME1" if header.get("PhotometricInterpretation") == "MONOCHROME1" else "MONOCHROME2"

    header.file_meta = FileMetaDataset()
    header.file_meta.MediaStorageSOPClassUID = header.SOPClassUID
    header.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    header.file_meta.ImplementationVersionName = f"{_MARK}_{version('medsr')}"[:16]  # SH: 16 characters
    numbers = source.instance_numbers(depth) if source is not None else range(1, depth + 1)
    width = max(4, len(str(depth)))
    names = [f"{number:0{width}d}.dcm" for number in numbers]
    references = source is not None and deidentifier is None  # de-identified: the source's UIDs would identify it
    frames = []  # enhanced: the slices, converted into one file at the end
    with atomic_output(folder, folder=True) as tmp:  # an existing folder: checked replaceable by the caller
        for k, (name, number, position, values) in enumerate(zip(names, numbers, positions, slices(), strict=True)):
            if enhanced and 4 * values.size * depth > MAX_VOLUME_BYTES:
                raise ValueError(
                    f"{folder}: an enhanced file of {values.shape[0]} x {values.shape[1]} x {depth} voxels is built "
                    f"in memory, over the {MAX_VOLUME_BYTES / 2**30:g} GiB limit of a whole scan as float32; write "
                    "classic slices instead"
                )
            header.SOPInstanceUID = header.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            header.InstanceNumber = number
            header.ImagePositionPatient = [DSfloat(x, auto_format=True) for x in position]
            header.SliceLocation = DSfloat(normal @ position, auto_format=True)
            if references:
                _reference(header, source.under(k, values.shape), meta["dicom"], new_study=new_study)
            stored = _stored(values.T, slope, intercept, dtype)  # (Rows, Columns)
            header.set_pixel_data(stored, photometric, 16, generate_instance_uid=False)
            if enhanced:
                frames.append(copy.deepcopy(header))
            else:
                header.save_as(tmp / name, enforce_file_format=True)
        if enhanced:
            enhanced_image = _legacy_converted(frames, modality, meta.get("dicom"), references=references)
            enhanced_image.save_as(tmp / _ENHANCED_NAME, enforce_file_format=True)
    return [folder / _ENHANCED_NAME] if enhanced else [folder / name for name in names]


def _legacy_converted(
    frames: list[Dataset], modality: Modality, source: Dataset | None, *, references: bool
) -> Dataset:
    """The classic slices ``frames`` of one new series as one Legacy Converted Enhanced CT or MR Image of that series
    (highdicom) [5]; ``source`` heads the source series (None: none), whose images the slices reference if
    ``references``."""
    from highdicom.legacy import LegacyConvertedEnhancedCTImage, LegacyConvertedEnhancedMRImage  # a second to import

    first = frames[0]
    image_class = LegacyConvertedEnhancedCTImage if modality is Modality.CT else LegacyConvertedEnhancedMRImage
    with warnings.catch_warnings():  # it copies an empty AcquisitionNumber (IS, Type 2) to FrameAcquisitionNumber (US)
        warnings.filterwarnings("ignore", "A value of type 'str' cannot be assigned to a tag with VR US", UserWarning)
        image = image_class(
            frames,
            series_instance_uid=first.SeriesInstanceUID,
            series_number=first.SeriesNumber,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            series_description=first.SeriesDescription,
        )
    # highdicom gives a single frame 1 mm; the slices' distance between planes is what a reader steps along the normal
    image.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SpacingBetweenSlices = first.SpacingBetweenSlices
    # The slices are never stored: no reference to them, as the source of a frame or an instance of the series.
    for item in image.PerFrameFunctionalGroupsSequence:
        del item.ConversionSourceAttributesSequence
        if "UnassignedPerFrameConvertedAttributesSequence" not in item:  # one item: all shared, as one slice's are
            item.UnassignedPerFrameConvertedAttributesSequence = [Dataset()]
    series = [
        item for item in image.get("ReferencedSeriesSequence", []) if item.SeriesInstanceUID != first.SeriesInstanceUID
    ]
    if series:
        image.ReferencedSeriesSequence = series
    else:
        del image.ReferencedSeriesSequence
    if "Laterality" in first:  # General Series (Type 2C); highdicom leaves it among the unassigned attributes
        image.Laterality = first.Laterality
    if references:
        image.SourceImageEvidenceSequence = [_evidence(frames, source)]
    # The slices' content date and time (highdicom takes the acquisition's); de-identified, they have none, and these
    # Type 1 ones get PS3.15's dummy values (action D), without highdicom's InstanceCreationDate/Time (now).
    image.ContentDate, image.ContentTime = first.get("ContentDate") or "19000101", first.get("ContentTime") or "000000"
    if not first.get("ContentDate"):
        del image.InstanceCreationDate, image.InstanceCreationTime
    if "ContrastBolusAgentSequence" in image:  # the source's; the Enhanced Contrast/Bolus module [5] needs their use
        shared = (source.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
        if "ContrastBolusUsageSequence" in shared:  # an enhanced source's, the same for all its frames
            image.SharedFunctionalGroupsSequence[0].ContrastBolusUsageSequence = copy.deepcopy(
                shared.ContrastBolusUsageSequence
            )
        else:
            del image.ContrastBolusAgentSequence
    image.file_meta.ImplementationVersionName = first.file_meta.ImplementationVersionName
    return image


def _evidence(frames: list[Dataset], source: Dataset) -> Dataset:
    """An item of SourceImageEvidenceSequence [5]: the images of the series ``source`` heads that the
    SourceImageSequence of ``frames`` references, by study and series (PS3.3 C.17.2.1, Hierarchical SOP Instance
    Reference Macro)."""
    referenced = dict.fromkeys(
        (item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID)
        for ds in frames
        for item in ds.get("SourceImageSequence", [])
    )
    series = Dataset()
    series.SeriesInstanceUID = source.SeriesInstanceUID
    series.ReferencedSOPSequence = []
    for sop_class, sop_instance in referenced:
        instance = Dataset()
        instance.ReferencedSOPClassUID, instance.ReferencedSOPInstanceUID = sop_class, sop_instance
        series.ReferencedSOPSequence.append(instance)
    study = Dataset()
    study.StudyInstanceUID, study.ReferencedSeriesSequence = source.StudyInstanceUID, [series]
    return study


def check_series_target(
    folder: Path, modality: Modality, meta: Mapping[str, Any], description: str, *, enhanced: bool = False
) -> None:
    """Refuse, before writing anything, what :func:`write_series` cannot write faithfully or must not touch
    (``modality``, ``meta`` and ``enhanced`` as in the volume to write and the call)."""
    if modality in (Modality.US, Modality.CR, Modality.DX):
        raise ValueError(
            f"{folder}: writing {modality.value} DICOM is not supported: its geometry is not a slice in the "
            "patient frame (ultrasound regions, projection radiographs); write .tif or .nii.gz instead"
        )
    if enhanced and modality not in (Modality.CT, Modality.MR):
        raise ValueError(
            f"{folder}: enhanced DICOM is written for CT and MR (Legacy Converted Enhanced CT/MR Image), not "
            f"{modality.value}; write classic slices instead"
        )
    source = meta.get("dicom")
    if source is not None and "ImageOrientationPatient" not in source:
        raise ValueError(
            f"{folder}: the source header has no ImageOrientationPatient, so the image has no place in the patient "
            "frame to write back; write .tif or .nii.gz instead"
        )
    sop_class = source.get("SOPClassUID") if source is not None else None
    if source is not None and "PerFrameFunctionalGroupsSequence" in source and sop_class not in _CLASSIC_CLASS:
        raise ValueError(
            f"{folder}: the source is a multi-frame {sop_class.name if sop_class else 'image'}; medsr derives DICOM "
            "series from enhanced CT and MR only; write .nii.gz instead"
        )
    if not 0 < len(description) <= 64:
        raise ValueError(f"{folder}: description must have 1 to 64 characters (SeriesDescription), got {description!r}")
    source_path = meta.get("dicom_source")
    if source_path is not None:
        source_path, target = Path(source_path).resolve(), folder.resolve()
        if target == source_path or target.is_relative_to(source_path) or source_path.is_relative_to(target):
            raise ValueError(
                f"{folder}: the source series is {source_path}; medsr never writes into its input, nor replaces it"
            )
    if not folder.parent.is_dir():
        raise FileNotFoundError(f"{folder}: folder {folder.parent} does not exist")
    if folder.exists() and not _written_by_medsr(folder):
        what = "holds files medsr did not write" if folder.is_dir() else "is a file"
        raise FileExistsError(
            f"{folder}: exists and {what}; medsr replaces only an empty folder or a series it wrote. Choose a new "
            "folder for the DICOM series"
        )


def _written_by_medsr(folder: Path) -> bool:
    """Whether ``folder`` is a folder that is empty or holds only DICOM files whose file meta says medsr wrote them."""
    if not folder.is_dir():
        return False
    for entry in folder.iterdir():
        try:
            mark = str(read_file_meta_info(entry).get("ImplementationVersionName", ""))
        except Exception:  # a folder, an unreadable or non-DICOM file: not something medsr wrote
            return False
        if not mark.startswith(_MARK):
            return False
    return True


def _series_header(
    modality: Modality,
    meta: Mapping[str, Any],
    description: str,
    deidentifier: Deidentifier | None,
    *,
    model: str | None,
    new_study: bool,
) -> Dataset:
    """The attributes all slices of the new series share (geometry, pixels, instance attributes and references to
    the source slices come later)."""
    source = meta.get("dicom")
    ds = Dataset()
    if source is None:
        for keyword, value in {**_MINIMAL_HEADER, **_MODALITY_HEADER[modality]}.items():
            setattr(ds, keyword, value)
        ds.SOPClassUID = _STORAGE_CLASS[modality]
        ds.Modality = modality.value
    else:
        for element in source:
            # group length (gggg,0000) would be stale; overlays (60xx) are sized to the source's pixels
            stale = element.tag.element == 0 or 0x6000 <= element.tag.group <= 0x60FF
            if not stale and element.keyword not in _SOURCE_ONLY:
                ds.add(element)
        ds = copy.deepcopy(ds)
        ds.remove_private_tags()  # may hold identifiers and vendor scaling that no longer applies
        if ds.get("SOPClassUID") in _CLASSIC_CLASS:  # an enhanced source: some attributes are elsewhere, or absent
            ds.SOPClassUID = _CLASSIC_CLASS[ds.SOPClassUID]
            for keyword, value in _MODALITY_HEADER[modality].items():
                if keyword not in ds:
                    setattr(ds, keyword, value)
    ds.ImageType = _image_type(ds.get("ImageType"), modality)
    if deidentifier is not None:
        deidentify(ds, deidentifier)  # leaves dates and times empty
    else:
        now = datetime.datetime.now()
        ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    if new_study or source is None:
        ds.StudyInstanceUID = generate_uid()
        ds.StudyID = f"medsr-{secrets.token_hex(5)}"  # SH: 16 characters
        ds.StudyDate, ds.StudyTime = ds.get("SeriesDate", ""), ds.get("SeriesTime", "")
        ds.AccessionNumber = ""  # the source's order
    if ds.get("PatientIdentityRemoved") == "YES" and "DeidentificationMethodCodeSequence" not in ds:
        ds.DeidentificationMethod = ds.get("DeidentificationMethod") or "not recorded in the source"  # Type 1C
    ds.FrameOfReferenceUID = ds.get("FrameOfReferenceUID") or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1000 + int(ds.get("SeriesNumber") or 0)  # a common convention for derived series
    ds.SeriesDescription = description
    if not any(keyword in ds for keyword in ("Laterality", "ImageLaterality", "FrameLaterality")):
        ds.Laterality = ""  # Type 2C: unknown whether the part is paired (dciodvfy asks for it)
    ds.DerivationDescription = f"{description} (medsr {version('medsr')}{f', model {model}' if model else ''})"
    ds.DerivationCodeSequence = [code_item(codes.DCM.SpatialResampling)]
    equipment = medsr_equipment(codes.DCM.ProcessingEquipment, f"super-resolution: {description}")
    ds.ContributingEquipmentSequence = [*ds.get("ContributingEquipmentSequence", []), equipment]
    return ds


def _image_type(source: Any, modality: Modality) -> list[str]:
    """DERIVED\\SECONDARY, then the source's values 3 on (e.g. AXIAL: still true of the image), value 3 defaulting to
    the one the CT and MR image modules require [2]."""
    rest = [str(value) for value in source][2:] if isinstance(source, MultiValue) else []
    values = ["DERIVED", "SECONDARY", (rest[0] if rest else "") or _IMAGE_TYPE_3.get(modality, ""), *rest[1:]]
    return values if any(values[2:]) else values[:2]


@dataclasses.dataclass(frozen=True)
class _SourceSlices:
    """The source series' slices seen from the new volume: the source slice coordinate of the new voxel (i, j, k)
    is ``source_k @ (i, j, k, 1)`` (row k of source voxel <- new voxel)."""

    images: tuple[SourceImage, ...]
    source_k: np.ndarray  # (4,)

    @classmethod
    def of(cls, meta: Mapping[str, Any], affine: np.ndarray) -> _SourceSlices | None:
        """From ``meta`` of a volume read from a DICOM series (:attr:`medsr.dicom.Series.meta`), else None."""
        header, images, source_affine = meta.get("dicom"), meta.get("dicom_images"), meta.get("dicom_affine")
        uids = header is not None and "StudyInstanceUID" in header and "SeriesInstanceUID" in header
        if not uids or not images or source_affine is None:  # a volume read from DICOM has all of them
            return None
        return cls(tuple(images), (np.linalg.inv(source_affine) @ affine)[2])

    def same_planes(self) -> bool:
        """Whether every new slice lies in a source slice plane: the source slice coordinate does not change
        along i or j, and is a whole number that changes with k."""
        whole = np.allclose(self.source_k[2:], np.round(self.source_k[2:]), atol=1e-4)
        return bool(np.allclose(self.source_k[:2], 0, atol=1e-4) and whole and round(self.source_k[2]) != 0)

    def instance_numbers(self, depth: int) -> list[int]:
        """1 to ``depth`` along k, or from ``depth`` down if the source's InstanceNumber (a multi-frame source: its
        frame number) runs against the new k."""
        first, last = (
            image.instance_number if image.frame is None else image.frame for image in (self.images[0], self.images[-1])
        )
        against = first is not None and last is not None and (last - first) * self.source_k[2] < 0
        return list(range(depth, 0, -1)) if against else list(range(1, depth + 1))

    def under(self, k: int, shape: tuple[int, int]) -> tuple[SourceImage, ...]:
        """The source slices that new slice k, of (I, J) voxels, lies across or between."""
        extent = self.source_k[:2] * (np.asarray(shape) - 1)  # how far the source slice coordinate moves along i, j
        start = self.source_k[2] * k + self.source_k[3]
        low, high = start + np.minimum(extent, 0).sum(), start + np.maximum(extent, 0).sum()
        first, last = max(0, math.floor(low + 1e-6)), min(len(self.images) - 1, math.ceil(high - 1e-6))
        return self.images[first : last + 1]


def _reference(ds: Dataset, images: tuple[SourceImage, ...], source: Dataset, *, new_study: bool) -> None:
    """Make ``ds`` reference ``images`` of the series ``source`` heads [4]: SourceImageSequence, and the same
    instances in ReferencedSeriesSequence (same study) or StudiesContainingOtherReferencedInstancesSequence."""
    for keyword in _REFERENCES:
        ds.pop(keyword, None)  # the previous slice's
    if not images:
        return
    ds.SourceImageSequence = [_referenced(image, purpose=True) for image in images]
    series = Dataset()
    series.SeriesInstanceUID = source.SeriesInstanceUID
    instances = dict.fromkeys(image._replace(frame=None) for image in images)  # the frames of one file: one instance
    series.ReferencedInstanceSequence = [_referenced(image) for image in instances]
    if new_study:
        study = Dataset()
        study.StudyInstanceUID, study.ReferencedSeriesSequence = source.StudyInstanceUID, [series]
        ds.StudiesContainingOtherReferencedInstancesSequence = [study]
    else:
        ds.ReferencedSeriesSequence = [series]


def _referenced(image: SourceImage, *, purpose: bool = False) -> Dataset:
    """A reference to ``image`` (SOP class and instance, and frame of a multi-frame file), with purpose DCM 121322
    (CID 7202) if ``purpose``."""
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = image.sop_class_uid, image.sop_instance_uid
    if image.frame is not None:
        item.ReferencedFrameNumber = image.frame
    if purpose:
        item.PurposeOfReferenceCodeSequence = [code_item(codes.DCM.SourceImageForImageProcessingOperation)]
    return item


def _slice_geometry(
    affine: np.ndarray, slices: int, folder: Path
) -> tuple[np.ndarray, tuple[float, float], np.ndarray, np.ndarray]:
    """``_patient_affine`` backwards: (IOP (6,), PixelSpacing (row, column) mm, IPP of each slice (K, 3) in LPS mm,
    unit slice normal (3,) in LPS)."""
    lps = lps_to_ras(affine)  # the flip is its own inverse
    column_spacing, row_spacing = np.linalg.norm(lps[:3, :2], axis=0)  # steps along i (a row) and j (a column)
    row_cosine, column_cosine = lps[:3, 0] / column_spacing, lps[:3, 1] / row_spacing
    if abs(row_cosine @ column_cosine) > 1e-4:  # scanners round IOP to about 6 decimals
        angle = np.degrees(np.arccos(np.clip(row_cosine @ column_cosine, -1, 1)))
        raise ValueError(
            f"{folder}: voxel axes i and j meet at {angle:.4f} degrees; a DICOM slice needs perpendicular rows and "
            "columns, write .nii.gz instead"
        )
    positions = lps[:3, 3] + np.arange(slices)[:, np.newaxis] * lps[:3, 2]  # (K, 3)
    normal = np.cross(row_cosine, column_cosine)
    return np.concatenate([row_cosine, column_cosine]), (row_spacing, column_spacing), positions, normal


def _set_intensities(
    header: Dataset,
    modality: Modality,
    meta: Mapping[str, Any],
    value_range: tuple[float, float],
    window: tuple[float, float],
    folder: Path,
) -> tuple[float, float, type]:
    """How values in ``value_range`` are stored, ``value = stored * slope + intercept`` as (slope, intercept, integer
    type), written into ``header``: CT and OT through RescaleSlope/Intercept (:func:`_rescale`), MR without a
    Modality LUT (:func:`_mr_gain`). The window is the source's, else ``window`` (the 0.5 and 99.5 percentiles), in
    the units the Modality LUT gives (MR: the stored values)."""
    low, high = value_range
    preferred = _preferred_rescale(modality, meta, header)
    gain = 1.0
    if modality is Modality.MR:
        gain, dtype = _mr_gain(low, high, float(preferred[0]) if preferred else None)
        slope, intercept = 1 / gain, 0.0
        for keyword in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
            header.pop(keyword, None)
        if gain != 1:
            note = f"MR values stored x{gain:g} to keep them as 16-bit integers"
            warnings.warn(f"{folder}: {note} (range {low:.4g} to {high:.4g})", stacklevel=4)
            header.DerivationDescription += f"; {note}"
            for keyword in ("WindowCenter", "WindowWidth", "WindowCenterWidthExplanation"):
                header.pop(keyword, None)  # in the source's units
    else:
        slope, intercept, dtype = _rescale(low, high, preferred)
        header.RescaleSlope, header.RescaleIntercept = slope, intercept
    if "WindowCenter" not in header:  # a source's window is in physical units: the new rescale leaves it valid
        header.WindowCenter = DSfloat(gain * (window[0] + window[1]) / 2, auto_format=True)
        header.WindowWidth = DSfloat(max(gain * (window[1] - window[0]), 1.0), auto_format=True)  # >= 1 (C.11.2.1.2)
    return float(slope), float(intercept), dtype


def _preferred_rescale(modality: Modality, meta: Mapping[str, Any], header: Dataset) -> tuple[DSfloat, DSfloat] | None:
    """The source's (RescaleSlope, RescaleIntercept), else (1, -1024) for CT in HU, else None (no preference)."""
    if meta.get("dicom") is not None:
        slope = float(header.get("RescaleSlope") or 1.0)  # as read_dicom reads it: absent or 0 means 1
        return DSfloat(slope, auto_format=True), DSfloat(float(header.get("RescaleIntercept") or 0.0), auto_format=True)
    if modality is Modality.CT:
        return DSfloat(1), DSfloat(-1024)
    return None


def _rescale(low: float, high: float, preferred: tuple[DSfloat, DSfloat] | None) -> tuple[DSfloat, DSfloat, type]:
    """(RescaleSlope, RescaleIntercept, stored integer type) to store values in ``[low, high]`` as 16-bit integers.

    ``value = stored * slope + intercept``, with ``stored`` the nearest integer, so a value comes back within
    ``slope / 2``. The preferred slope and intercept (the source's: the same units and steps) are kept when the
    stored values fit uint16 (all >= 0) or int16; otherwise, and without a preference, the data range [min, max]
    is spread over the 65536 uint16 levels. So nothing is clipped beyond the rounding.
    """
    if preferred is not None:
        slope, intercept = preferred
        stored = sorted(round((v - intercept) / slope) for v in (low, high))  # the map is monotonic
        for dtype in (np.uint16, np.int16):
            if np.iinfo(dtype).min <= stored[0] and stored[1] <= np.iinfo(dtype).max:
                return slope, intercept, dtype
    slope = DSfloat((high - low) / 65535.0, auto_format=True) if high > low else DSfloat(1)
    return slope, DSfloat(low, auto_format=True), np.uint16


def _mr_gain(low: float, high: float, source_step: float | None) -> tuple[float, type]:
    """(gain, stored integer type) of MR values in ``[low, high]`` stored as ``round(value * gain)`` without a
    Modality LUT [3]: gain 1 (the source's units) if the source stored steps of at least 1 (``source_step``, a
    DICOM source's RescaleSlope) or the values span ``_MR_FEW_LEVELS`` integers, else the power of ten that makes
    them span ``_MR_LEVELS``; at most the one that fits 16 bits."""
    dtype = np.int16 if low < 0 else np.uint16
    coarse = source_step is not None and source_step >= 1 or high - low >= _MR_FEW_LEVELS or high <= low
    exponent = 0 if coarse else math.ceil(math.log10(_MR_LEVELS / (high - low)))
    peak = max(abs(low), abs(high))
    if peak > 0:
        exponent = min(exponent, math.floor(math.log10(np.iinfo(dtype).max / peak)))
    return 10.0**exponent, dtype


def _stored(values: np.ndarray, slope: float, intercept: float, dtype: type) -> np.ndarray:
    """Nearest stored integers of physical ``values`` (any shape). The clip only absorbs the DS rounding of the
    slope and intercept (16 characters) at the ends of the range :func:`_rescale` chose."""
    info = np.iinfo(dtype)
    return np.clip(np.rint((values.astype(np.float64) - intercept) / slope), info.min, info.max).astype(dtype)
