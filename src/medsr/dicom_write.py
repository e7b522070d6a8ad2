"""Volume -> a new derived DICOM series: geometry from the affine (LPS), intensities back in the source's units,
new UIDs, the source's attributes kept where they still hold, optionally de-identified (``deidentify.py``).

The inverse of ``dicom.py``'s reading: ``_slice_geometry`` runs the affine construction backwards [1].

[1] DICOM PS3.3 C.7.6.2.1.1, "Image Position and Image Orientation".
[2] DICOM PS3.3 C.7.6.1.1.2, "Image Type" (DERIVED\\SECONDARY) and C.7.6.3, "Image Pixel Module".
"""

from __future__ import annotations

import copy
import datetime
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.multival import MultiValue
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pydicom.valuerep import DSfloat

from medsr.deidentify import Deidentifier, deidentify
from medsr.dicom import lps_to_ras
from medsr.intensity import percentiles
from medsr.io import atomic_output
from medsr.volume import Modality, Volume

# Writing. Storage class of a series written without a source header, by modality.
_STORAGE_CLASS = {Modality.CT: CTImageStorage, Modality.MR: MRImageStorage, Modality.OT: SecondaryCaptureImageStorage}
# Type 2 attributes (present, may be empty) of the Patient, General Study, General Series, Frame of Reference and
# General Equipment modules, then the modality's image module (PS3.3 A.3 CT, A.4 MR, A.8 Secondary Capture).
_MINIMAL_HEADER = {
    "SpecificCharacterSet": "ISO_IR 192",  # UTF-8, for the caller's description
    "ImageType": ["DERIVED", "SECONDARY"],
    "PatientName": "",
    "PatientID": "",
    "PatientBirthDate": "",
    "PatientSex": "",
    "StudyDate": "",
    "StudyTime": "",
    "ReferringPhysicianName": "",
    "StudyID": "",
    "AccessionNumber": "",
    "PatientPosition": "",
    "Manufacturer": "",
    "PositionReferenceIndicator": "",
}
_MODALITY_HEADER = {
    Modality.CT: {
        "ImageType": ["DERIVED", "SECONDARY", "AXIAL"],
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
        "RescaleType": "US",  # unspecified units
    },
    Modality.OT: {"ConversionType": "WSD", "RescaleType": "US"},  # WSD: made on a workstation
}
# Attributes of the source that describe its own pixels or instance and would be wrong in the new series.
_SOURCE_ONLY = (
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "SmallestPixelValueInSeries",
    "LargestPixelValueInSeries",
    "ModalityLUTSequence",
    "IconImageSequence",
    "SourceImageSequence",
    "DerivationCodeSequence",
    "ImagesInAcquisition",
    "DataSetTrailingPadding",
)
_MARK = "MEDSR"  # ImplementationVersionName prefix of the files medsr writes: only such a folder is ever replaced


def write_series(
    volume: Volume, folder: Path, *, description: str, anonymize: bool | Deidentifier = False
) -> list[Path]:
    """Write ``volume`` as a new derived DICOM series, one file per slice k, into the folder ``folder``.

    The inverse of :func:`read_dicom`: reading ``folder`` back gives the same affine (to DS precision, about 1e-10
    mm) and the same array to within half a RescaleSlope. Slice k is file ``k + 1`` (InstanceNumber k + 1) and holds
    ``volume.array[0, :, :, k].T`` (Rows = J, Columns = I), placed by IOP = the unit directions of i and j and
    IPP = the world position of voxel (0, 0, k), both in LPS. The reader orders slices along the slice normal
    (IOP row x column), so a volume whose affine has a negative determinant reads back with k reversed: the same
    voxels at the same world positions.

    Header: ``volume.meta["dicom"]`` (the source's first slice, see :func:`read_dicom`) is copied without private
    tags and without what described the source's pixels; it keeps StudyInstanceUID and FrameOfReferenceUID (the
    same patient space). Without a source header (a NIfTI or PNG input) a minimal header is built: CT and MR get
    their storage class, anything else (OT) Secondary Capture, with empty patient and study attributes and a new
    StudyInstanceUID. Either way the series gets a new SeriesInstanceUID, one new SOPInstanceUID per file,
    SeriesNumber + 1000, ImageType DERIVED\\SECONDARY, SeriesDescription = ``description``, a DerivationDescription
    naming medsr, the source's window (else the 0.5-99.5 percentile range) and geometry from the affine:
    PixelSpacing, SliceThickness = SpacingBetweenSlices = the distance between slice planes, SliceLocation = IPP
    along the slice normal.

    Intensities: stored as 16-bit integers, uncompressed (Explicit VR Little Endian), with
    ``value = stored * RescaleSlope + RescaleIntercept``; see :func:`_rescale` for the rule.

    De-identification (``anonymize``): the shared header goes through :func:`medsr.deidentify.deidentify`, PS3.15
    Annex E's Basic Profile (Table E.1-1) or its pixels-only mode, before the new series' attributes above are set.
    Study and Frame of Reference UIDs get new UIDs from the Deidentifier's secret map: series written with one
    Deidentifier share a new study and frame of reference; ``True`` makes a new Deidentifier (basic mode) per call,
    so nothing links two calls or the originals. Text burned into the pixels is not looked for; ``description`` is
    written as given, so it must not identify the patient.

    Most callers want :func:`medsr.io.read_volume`'s counterpart ``write_volume``, which dispatches here.

    Args:
        volume: (1, I, J, K) float32 in physical units (HU for CT), MR, CT or OT, with a RAS+ affine.
        folder: The new series' folder. Written atomically: the files go to a temporary folder beside it, renamed
            to ``folder`` when complete. An existing ``folder`` is replaced only if it is empty or holds only files
            medsr wrote (a previous output), never the source series, nor a folder inside it or holding it.
        description: SeriesDescription, e.g. "SR x2 edsr_baseline" (at most 64 characters).
        anonymize: ``True`` or a :class:`medsr.deidentify.Deidentifier` to de-identify the header (see above).

    Returns:
        The written files, by k.

    Raises:
        ValueError: Several channels, NaN/inf voxels, a modality without patient geometry (US, CR, DX), a source
            header without ImageOrientationPatient, a sheared grid, a too long description, or ``folder`` is (in)
            the source series. The message names the folder.
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
    check_series_target(folder, volume.modality, volume.meta, description)
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
) -> list[Path]:
    """:func:`write_series` for a volume given slice by slice, in memory bounded by a slice, to a target that
    :func:`check_series_target` accepted.

    ``slices()`` yields the ``depth`` slices (I, J) in k order, in physical units (float32), the same values every
    call. It is called three times: two passes for the value range and the window (exact percentiles, see
    :func:`medsr.intensity.percentiles`), then one to write the files.
    """
    deidentifier = Deidentifier() if anonymize is True else anonymize or None  # one per series: one UID map
    header = _series_header(modality, meta, description=description, deidentifier=deidentifier)
    iop, pixel_spacing, positions, normal = _slice_geometry(affine, depth, folder)
    header.ImageOrientationPatient = [DSfloat(c, auto_format=True) for c in iop]
    header.PixelSpacing = [DSfloat(s, auto_format=True) for s in pixel_spacing]
    # The distance between slice planes; a single slice is read back with this step along the normal.
    plane_distance = abs(normal @ lps_to_ras(affine)[:3, 2])
    header.SliceThickness = header.SpacingBetweenSlices = DSfloat(plane_distance, auto_format=True)
    try:
        low, window_low, window_high, high = percentiles(slices, (0, 0.5, 99.5, 100))
    except ValueError as error:  # NaN or infinite voxels
        raise ValueError(f"{folder}: {error}; DICOM stores integers, fix or mask them first") from None
    slope, intercept, dtype = _rescale(low, high, _preferred_rescale(modality, meta, header))
    header.RescaleSlope, header.RescaleIntercept = slope, intercept
    if "WindowCenter" not in header:  # a source's window is in physical units: the new rescale leaves it valid
        header.WindowCenter = DSfloat((window_low + window_high) / 2, auto_format=True)
        header.WindowWidth = DSfloat(max(window_high - window_low, 1.0), auto_format=True)  # >= 1 (PS3.3 C.11.2.1.2)
    photometric = "MONOCHROME1" if header.get("PhotometricInterpretation") == "MONOCHROME1" else "MONOCHROME2"

    header.file_meta = FileMetaDataset()
    header.file_meta.MediaStorageSOPClassUID = header.SOPClassUID
    header.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    header.file_meta.ImplementationVersionName = f"{_MARK}_{version('medsr')}"[:16]  # SH: 16 characters
    width = max(4, len(str(depth)))
    names = [f"{k + 1:0{width}d}.dcm" for k in range(depth)]
    with atomic_output(folder, folder=True) as tmp:  # an existing folder: checked replaceable by the caller
        for k, (name, position, values) in enumerate(zip(names, positions, slices(), strict=True)):
            header.SOPInstanceUID = header.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            header.InstanceNumber = k + 1
            header.ImagePositionPatient = [DSfloat(x, auto_format=True) for x in position]
            header.SliceLocation = DSfloat(normal @ position, auto_format=True)
            stored = _stored(values.T, float(slope), float(intercept), dtype)  # (Rows, Columns)
            header.set_pixel_data(stored, photometric, 16, generate_instance_uid=False)
            header.save_as(tmp / name, enforce_file_format=True)
    return [folder / name for name in names]


def check_series_target(folder: Path, modality: Modality, meta: Mapping[str, Any], description: str) -> None:
    """Refuse, before writing anything, what :func:`write_series` cannot write faithfully or must not touch
    (``modality`` and ``meta`` as in the volume to write)."""
    if modality in (Modality.US, Modality.CR, Modality.DX):
        raise ValueError(
            f"{folder}: writing {modality.value} DICOM is not supported: its geometry is not a slice in the "
            "patient frame (ultrasound regions, projection radiographs); write .tif or .nii.gz instead"
        )
    source = meta.get("dicom")
    if source is not None and "ImageOrientationPatient" not in source:
        raise ValueError(
            f"{folder}: the source header has no ImageOrientationPatient, so the image has no place in the patient "
            "frame to write back; write .tif or .nii.gz instead"
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
    modality: Modality, meta: Mapping[str, Any], *, description: str, deidentifier: Deidentifier | None
) -> Dataset:
    """The attributes all slices of the new series share (geometry, pixels and instance attributes come later)."""
    source = meta.get("dicom")
    if source is None:
        ds = Dataset()
        for keyword, value in {**_MINIMAL_HEADER, **_MODALITY_HEADER[modality]}.items():
            setattr(ds, keyword, value)
        ds.SOPClassUID = _STORAGE_CLASS[modality]
        ds.Modality = modality.value
        ds.StudyInstanceUID = generate_uid()
    else:
        ds = Dataset()
        for element in source:
            # group length (gggg,0000) would be stale; overlays (60xx) are sized to the source's pixels
            if element.tag.element != 0 and not 0x6000 <= element.tag.group <= 0x60FF:
                ds.add(element)
        ds = copy.deepcopy(ds)
        ds.remove_private_tags()  # may hold identifiers and vendor scaling that no longer applies
        for keyword in _SOURCE_ONLY:
            ds.pop(keyword, None)
        image_type = source.get("ImageType")
        extra = list(image_type)[2:] if isinstance(image_type, MultiValue) else []
        ds.ImageType = ["DERIVED", "SECONDARY", *extra]  # value 3 on, e.g. AXIAL, still describes the image
    if deidentifier is not None:
        deidentify(ds, deidentifier)
    else:
        now = datetime.datetime.now()
        ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.FrameOfReferenceUID = ds.get("FrameOfReferenceUID") or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1000 + int(ds.get("SeriesNumber") or 0)  # a common convention for derived series
    ds.SeriesDescription = description
    ds.DerivationDescription = f"{description} (medsr {version('medsr')})"
    return ds


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


def _stored(values: np.ndarray, slope: float, intercept: float, dtype: type) -> np.ndarray:
    """Nearest stored integers of physical ``values`` (any shape). The clip only absorbs the DS rounding of the
    slope and intercept (16 characters) at the ends of the range :func:`_rescale` chose."""
    info = np.iinfo(dtype)
    return np.clip(np.rint((values.astype(np.float64) - intercept) / slope), info.min, info.max).astype(dtype)
