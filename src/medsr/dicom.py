"""DICOM series -> Volume: sort slices, build the affine from the tags, convert between LPS and RAS.

DICOM places a slice in the patient's LPS frame (x to the patient's Left, y Posterior, z Superior) with
ImagePositionPatient (IPP, centre of the first transmitted pixel), ImageOrientationPatient (IOP, the unit
direction cosines of a row and of a column) and PixelSpacing (row spacing, column spacing) [1]. The affine is built
as in MONAI's ``PydicomReader._get_affine``, then flipped once to RAS+ by ``lps_to_ras``. ``dicom_write.py`` runs
the same construction backwards to write a new, derived series [2], optionally de-identified [3].

An enhanced (multi-frame) image holds a whole series in one file: the same attributes, per frame, in the items of
PerFrameFunctionalGroupsSequence or, when all frames share them, of SharedFunctionalGroupsSequence [4]. Each frame
is read as a classic slice whose header carries its functional groups' attributes.

[1] DICOM PS3.3 C.7.6.2.1.1, "Image Position and Image Orientation".
[2] DICOM PS3.3 C.7.6.1.1.2, "Image Type" (DERIVED\\SECONDARY) and C.7.6.3, "Image Pixel Module".
[3] DICOM PS3.15 Annex E, "Attribute Confidentiality Profiles" (Table E.1-1, Basic Profile).
[4] DICOM PS3.3 C.7.6.16, "Multi-frame Functional Groups Module", and C.7.6.16.2, its functional group macros.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import zlib
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pydicom
import torch
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info, read_partial
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, get_decoder, pixel_array
from pydicom.sr.coding import Code

from medsr.volume import MAX_VOLUME_BYTES, Modality, Volume, crop

_CM_UNITS = 3  # PhysicalUnitsX/YDirection code for centimetres (PS3.3 C.8.5.5.1.15)
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 luminance weights of R, G, B
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # the same, as tags
# Reading limits, checked on the header before any pixel is decoded or inflated: a 0.5 MB file can declare, or (in
# Deflated Explicit VR Little Endian) inflate to, gigabytes. One frame's stored pixels (and a deflated file's): 128 MiB,
# a 16-bit 8,192^2 frame, 3.5 times a 43 x 43 cm radiography detector at 0.1 mm. A multi-frame file is decoded frame by
# frame, its uncompressed pixel data no longer than the file. A whole series read into memory: MAX_VOLUME_BYTES.
MAX_SLICE_BYTES = 2**27
_MAX_HEADER_BYTES = 2**24  # what the attributes of a deflated file may add to its pixels, once inflated
_INFLATE_CHUNK = 2**20
# The functional groups [4] whose attributes a classic slice carries at top level: PixelSpacing and SliceThickness,
# ImageOrientationPatient, ImagePositionPatient, RescaleSlope/Intercept/Type, WindowCenter/Width.
_FRAME_GROUPS = (
    "PixelMeasuresSequence",
    "PlaneOrientationSequence",
    "PlanePositionSequence",
    "PixelValueTransformationSequence",
    "FrameVOILUTSequence",
)


def read_dicom(path: Path) -> Volume:
    """Read one DICOM series (a folder) or one DICOM file into a (1, I, J, K) float32 Volume in RAS+ world space.

    Voxel index i runs along a slice's columns (the row direction), j along its rows and k across slices sorted by
    their position along the slice normal (never by InstanceNumber or file name), so
    ``volume.array[0, c, r, k] == slice_k.pixel_array[r, c] * RescaleSlope + RescaleIntercept`` (HU for CT).

    An enhanced multi-frame file (e.g. Enhanced or Legacy Converted Enhanced CT and MR) is a series of its own: its
    frames are the slices, each with the PixelSpacing, SliceThickness, ImageOrientationPatient, ImagePositionPatient,
    RescaleSlope/Intercept and window of its functional groups (its PerFrameFunctionalGroupsSequence item, else
    SharedFunctionalGroupsSequence), under the same rules. Frames that are not one regular stack (several
    orientations, uneven spacing, two frames at one position: time points, echoes) are refused, and so is a
    multi-frame file without functional groups (nothing places its frames in space).

    A 2D image without ImagePositionPatient/ImageOrientationPatient (X-ray, ultrasound) gets an identity-orientation
    affine: its pixel size comes from PixelSpacing, else, for ultrasound, from the first region of
    SequenceOfUltrasoundRegions measured in cm (PhysicalDeltaX/Y * 10 mm), else from ImagerPixelSpacing (X-ray,
    measured at the detector). The slice step of any single 2D image without a thickness tag is 1 mm.

    A single 2D ultrasound image is cropped to its first region of SequenceOfUltrasoundRegions measured in cm
    (the image plane, not an M-mode or Doppler strip), dropping the on-screen annotation around it; the affine's
    origin moves to the crop's first pixel and ``meta["us_region"]`` records the region as ``(x0, y0, x1, y1)``
    (columns, rows, inclusive) in the frame's pixels.

    Colour and palette images are converted to one luminance channel, with a warning.

    Args:
        path: A folder holding the files of one series (any suffix or none; subfolders are not searched, and
            non-DICOM files such as README, non-image objects such as DICOMDIR are skipped), or one DICOM file.

    Returns:
        Volume of shape (1, Columns, Rows, number of slices); ``meta`` is :attr:`Series.meta`: the first sorted
        slice's header without pixel data, the path read, and what a derived series needs to reference the source.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: No DICOM image, several series, inconsistent or irregular slices (or frames), a multi-frame
            file among other files, a truncated or undecodable file, or an image that cannot be placed in space
            (NaN, infinite or zero sizes, orientation vectors that are not perpendicular unit vectors). Checked on
            the headers, before any pixel is decoded: pixel data that is missing, of another length than Rows,
            Columns, ... declare, or over ``MAX_SLICE_BYTES`` per frame (a deflated file: in all, inflated in
            chunks, not kept), and a series over ``MAX_VOLUME_BYTES`` as float32. The message names the file or
            folder.
    """
    series = open_series(path)
    columns, rows, depth = series.spatial_shape
    if columns * rows * depth * 4 > MAX_VOLUME_BYTES:
        raise ValueError(
            f"{path}: {columns} x {rows} x {depth} voxels need {columns * rows * depth * 4 / 2**30:.3g} GiB as "
            f"float32, over the {MAX_VOLUME_BYTES / 2**30:g} GiB limit of a whole-scan read; read it slice by slice"
        )
    values = np.empty(series.spatial_shape, dtype=np.float32)
    for k, file in enumerate(series.files):  # one file at a time: only the volume stays in memory
        values[:, :, k] = read_slice(file)
    volume = Volume(torch.from_numpy(values)[np.newaxis], series.affine, series.modality, series.meta)  # (1, I, J, K)
    if series.modality is Modality.US and len(series.files) == 1:
        volume = _crop_to_ultrasound_region(volume, series.header, series.files[0])
    return volume


class SourceImage(NamedTuple):
    """One slice of a source series, as a derived series references it (SourceImageSequence): a file, or a frame of
    a multi-frame file."""

    sop_class_uid: str
    sop_instance_uid: str
    instance_number: int | None  # None: absent or not an integer
    frame: int | None = None  # the frame number (from 1) in a multi-frame file; None: a single-frame file


@dataclasses.dataclass(frozen=True)
class Frame:
    """Frame ``number`` (from 1) of a multi-frame file, as one slice of a :class:`Series`.

    Args:
        file: The file.
        number: The frame number, from 1.
        header: The file's header without pixel data, with this frame's functional group attributes at top level
            (see :func:`read_dicom`), as a classic slice's header would hold them.
    """

    file: Path
    number: int
    header: Dataset = dataclasses.field(repr=False, compare=False)

    @property
    def name(self) -> str:
        """How an error names the frame beside another one."""
        return f"frame {self.number}"

    def __str__(self) -> str:
        return f"{self.file}, frame {self.number}"


@dataclasses.dataclass(frozen=True)
class Series:
    """A DICOM series opened without its pixels: what :func:`read_dicom` knows before decoding a slice.

    Args:
        path: The folder (or file) opened.
        files: One file per slice, or (a multi-frame file) one :class:`Frame` per slice, sorted along k (see
            :func:`read_dicom`); :func:`read_slice` decodes one.
        affine: 4x4 voxel (i, j, k) -> RAS+ mm.
        modality: From the Modality tag; ``OT`` when medsr does not know it.
        header: The first sorted slice's header, without pixel data (a multi-frame file: its :attr:`Frame.header`).
        images: The identity of each slice, by k.
    """

    path: Path
    files: list[Path] | list[Frame]
    affine: np.ndarray
    modality: Modality
    header: Dataset
    images: tuple[SourceImage, ...]

    @property
    def meta(self) -> dict[str, Any]:
        """The Volume ``meta`` that :func:`read_dicom` returns, what ``dicom_write`` needs: ``"dicom"`` the header,
        ``"dicom_source"`` the path (never written into), ``"dicom_images"`` the slices by k and ``"dicom_affine"``
        the affine (to reference the source slices behind each new slice and keep their thickness and numbering)."""
        return {
            "dicom": self.header,
            "dicom_source": str(self.path),
            "dicom_images": self.images,
            "dicom_affine": self.affine,
        }

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        """(I, J, K) = (Columns, Rows, number of slices)."""
        return int(self.header.Columns), int(self.header.Rows), len(self.files)


def open_series(path: Path) -> Series:
    """Read the headers of a DICOM series (or file), check them, sort the slices and build the affine.

    The rules and errors are :func:`read_dicom`'s, which is ``open_series`` followed by :func:`read_slice` per file.
    Memory holds the headers only, so a series too large for memory can be read slice by slice.
    """
    path = Path(path)
    if not path.exists():
        if path.is_symlink():
            raise ValueError(f"{path}: a symbolic link that leads nowhere (a missing target, or a loop of links)")
        raise FileNotFoundError(f"{path}: no such DICOM file or folder")
    if not path.is_dir() and not path.is_file():  # a FIFO or device would hang or never end
        raise ValueError(f"{path}: not a regular file or folder")
    with _quiet_value_warnings():
        slices: list[tuple[Path | Frame, Dataset]] = _read_series_headers(path)
        multi_frame = [file for file, ds in slices if _is_multi_frame(ds)]
        if multi_frame and len(slices) > 1:
            raise ValueError(
                f"{path}: the multi-frame file {multi_frame[0].name} is one of {len(slices)} files of a series; "
                "medsr reads a multi-frame file alone: pass the file"
            )
        if multi_frame:
            slices, step = _sort_slices([(frame, frame.header) for frame in _frames(*slices[0])], multi_frame[0])
            affine = lps_to_ras(_patient_affine(slices[0][1], slices[0][0], step))
        elif all("ImagePositionPatient" in ds and "ImageOrientationPatient" in ds for _, ds in slices):
            slices, step = _sort_slices(slices, path)
            affine = lps_to_ras(_patient_affine(slices[0][1], slices[0][0], step))
        elif len(slices) == 1:
            affine = _planar_affine(slices[0][1], slices[0][0])
        else:
            raise ValueError(
                f"{path}: a series of {len(slices)} slices needs ImagePositionPatient and ImageOrientationPatient "
                "in every file to order them in space"
            )
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:  # Volume's own rule
        raise ValueError(
            f"{slices[0][0]}: the geometry attributes (ImageOrientationPatient, PixelSpacing, SliceThickness) give "
            f"voxel axes {np.round(affine[:3, :3], 6).tolist()}, not finite or not spanning 3D space"
        )
    first = slices[0][1]
    if first.get("SamplesPerPixel", 1) > 1 or first.get("PhotometricInterpretation") == "PALETTE COLOR":
        warnings.warn(
            f"{path}: {first.PhotometricInterpretation} image converted to grey (BT.601 luminance)", stacklevel=3
        )
    known = {m.value for m in Modality}
    modality = Modality(first.Modality) if first.get("Modality") in known else Modality.OT
    images = tuple(_source_image(file, ds) for file, ds in slices)
    return Series(path, [file for file, _ in slices], affine, modality, first, images)


def _source_image(file: Path | Frame, ds: Dataset) -> SourceImage:
    """The identity of the slice (file or frame) whose header is ``ds``."""
    sop_class = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
    sop_instance = ds.get("SOPInstanceUID") or ds.file_meta.get("MediaStorageSOPInstanceUID")
    number = ds.get("InstanceNumber")
    return SourceImage(
        str(sop_class or ""),
        str(sop_instance or ""),
        int(number) if isinstance(number, int) else None,
        file.number if isinstance(file, Frame) else None,
    )


def _is_multi_frame(ds: Dataset) -> bool:
    """Whether ``ds`` is the header of a multi-frame image: several frames, or functional groups (even for one)."""
    return int(ds.get("NumberOfFrames") or 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds


def _frames(file: Path, ds: Dataset) -> list[Frame]:
    """The frames of the multi-frame file ``file`` whose header is ``ds``, each with its functional groups'
    attributes (``_FRAME_GROUPS``: its own item of PerFrameFunctionalGroupsSequence, else the shared one) at top
    level of its :attr:`Frame.header`."""
    count = int(ds.get("NumberOfFrames") or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None:
        raise ValueError(
            f"{file}: {count} frames without functional groups (PerFrameFunctionalGroupsSequence): no pixel size, "
            "orientation or position per frame places them in space"
        )
    if len(per_frame) != count:
        raise ValueError(
            f"{file}: NumberOfFrames is {count}, but PerFrameFunctionalGroupsSequence has {len(per_frame)} items; "
            "the file is corrupt"
        )
    shared = (ds.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    frames = []
    for number, own in enumerate(per_frame, 1):
        header = Dataset()
        header.file_meta = ds.file_meta
        for element in ds:
            header.add(element)
        for groups in (shared, own):  # the frame's own group replaces the shared one
            for keyword in _FRAME_GROUPS:
                if groups.get(keyword):
                    header.update(groups[keyword][0])
        frames.append(Frame(file, number, header))
    return frames


def code_item(code: Code) -> Dataset:
    """A code sequence item (PS3.3 8.8, Table 8.8-1a): CodeValue, CodingSchemeDesignator, CodeMeaning."""
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code.value, code.scheme_designator, code.meaning
    return item


def medsr_equipment(purpose: Code, description: str) -> Dataset:
    """An item of ContributingEquipmentSequence (PS3.3 C.12.1) naming this medsr version, for ``purpose`` (CID 7005,
    e.g. DCM 109102 Processing Equipment) and what it did."""
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = [code_item(purpose)]
    item.Manufacturer = item.ManufacturerModelName = "medsr"
    item.SoftwareVersions = version("medsr")
    item.ContributionDescription = description
    return item


def read_slice(file: Path | Frame) -> np.ndarray:
    """One slice of a :class:`Series`, a file or a :class:`Frame` (decoded alone), in physical units (HU for CT),
    shape (Columns, Rows) = (I, J), float64."""
    if isinstance(file, Frame):
        return _pixels(file.header, file).T
    return _pixels(_read(file), file).T


def _crop_to_ultrasound_region(volume: Volume, ds: Dataset, file: Path) -> Volume:
    """Crop a (1, Columns, Rows, 1) ultrasound frame to its first region measured in cm (see read_dicom).

    RegionLocationMinX0/MaxX1 are the region's first and last column (i), MinY0/MaxY1 its first and last row (j),
    inclusive (PS3.3 C.8.5.5.1). Without such a region the volume is returned as is.
    """
    for region in ds.get("SequenceOfUltrasoundRegions", []):
        if region.get("PhysicalUnitsXDirection") != _CM_UNITS or region.get("PhysicalUnitsYDirection") != _CM_UNITS:
            continue  # M-mode and Doppler regions: not the image plane
        corners = [region.get(f"RegionLocation{corner}") for corner in ("MinX0", "MinY0", "MaxX1", "MaxY1")]
        if any(c is None for c in corners):
            return volume
        x0, y0, x1, y1 = (int(c) for c in corners)
        columns, rows = volume.spatial_shape[:2]
        if not (0 <= x0 <= x1 < columns and 0 <= y0 <= y1 < rows):
            raise ValueError(
                f"{file}: ultrasound region columns {x0}..{x1}, rows {y0}..{y1} lies outside the "
                f"{columns} x {rows} image"
            )
        cropped = crop(volume, (x0, y0, 0), (x1 + 1, y1 + 1, 1))
        # A copy: the full frame (annotation included) is not kept alive behind the view.
        return cropped.replace(array=cropped.array.clone(), meta={**volume.meta, "us_region": (x0, y0, x1, y1)})
    return volume


def _read_series_headers(path: Path) -> list[tuple[Path, Dataset]]:
    """Headers (no pixels) of the DICOM image files at ``path``, checked to form one series."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    series: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    for file in files:
        try:
            meta = read_file_meta_info(file)
        except InvalidDicomError:
            if path.is_dir():
                continue  # README, .DS_Store, ...: no 128-byte preamble + "DICM", so not a DICOM file
            raise ValueError(f"{file}: not a DICOM file (no 'DICM' marker after the 128-byte preamble)") from None
        except Exception as err:
            raise ValueError(f"{file}: cannot read DICOM header ({err}); the file may be truncated or corrupt") from err
        deflated = meta.get("TransferSyntaxUID") == pydicom.uid.DeflatedExplicitVRLittleEndian
        if deflated:
            _check_inflated_size(file, meta)
        try:
            ds, pixel_data = _read_header(file, deflated=deflated)
        except Exception as err:
            raise ValueError(f"{file}: cannot read DICOM header ({err}); the file may be truncated or corrupt") from err
        sop_class = ds.file_meta.get("MediaStorageSOPClassUID") or ds.get("SOPClassUID")
        if "Rows" not in ds:
            if sop_class is not None and "Image Storage" in sop_class.name:
                raise ValueError(f"{file}: image header ends before Rows; the file is truncated or corrupt")
            continue  # DICOMDIR, structured reports, presentation states: not images
        _check_pixel_data(file, ds, pixel_data)
        series[str(ds.get("SeriesInstanceUID", ""))].append((file, ds))

    if not series:
        has_subfolders = path.is_dir() and any(p.is_dir() for p in path.iterdir())
        hint = "; it has subfolders: pass one series folder" if has_subfolders else ""
        raise ValueError(f"{path}: no DICOM image files found (expected a DICOM file or a folder of one series){hint}")
    if len(series) > 1:
        listing = "\n".join(
            f"  {uid or '<no SeriesInstanceUID>'} '{group[0][1].get('SeriesDescription', '')}' ({len(group)} files)"
            for uid, group in series.items()
        )
        raise ValueError(f"{path} holds {len(series)} DICOM series; pass a folder with one series:\n{listing}")
    return next(iter(series.values()))


def _read_header(file: Path, *, deflated: bool) -> tuple[Dataset, tuple[int, int | None] | None]:
    """The header of a DICOM file without its pixels, and its pixel data element's (length, end in the file), None
    if it has none. The end is None where the file does not say it: a deflated data set, or an undefined length."""
    found = []
    with file.open("rb") as stream:

        def at_pixel_data(tag: int, vr: str | None, length: int) -> bool:
            if tag not in _PIXEL_TAGS:
                return False
            undefined = length == 0xFFFFFFFF
            found.append((length, None if deflated or undefined else stream.tell() + length))  # at the value now
            return True

        ds = read_partial(stream, at_pixel_data)  # as dcmread(stop_before_pixels=True), which hides the element
    return ds, found[0] if found else None


def _check_inflated_size(file: Path, meta: Dataset) -> None:
    """Refuse a deflated data set that is corrupt, truncated or inflates past the limit, checked in chunks that are
    not kept: pydicom inflates a deflated file whole at once, even to read its header."""
    limit = MAX_SLICE_BYTES + _MAX_HEADER_BYTES
    group_length = meta.get("FileMetaInformationGroupLength")
    if group_length is None:
        raise ValueError(f"{file}: a deflated DICOM file without FileMetaInformationGroupLength; the file is corrupt")
    inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
    try:
        with file.open("rb") as stream:
            stream.seek(128 + 4 + 12 + int(group_length))  # preamble, "DICM", group length element, file meta
            while not inflater.eof and (data := stream.read(_INFLATE_CHUNK)):
                while True:
                    out = len(inflater.decompress(data, _INFLATE_CHUNK))
                    total, data = total + out, inflater.unconsumed_tail
                    if total > limit:
                        raise ValueError(
                            f"{file}: the deflated data set inflates to more than {limit:,} bytes, over the limit of "
                            f"{MAX_SLICE_BYTES:,} bytes of pixels per file"
                        )
                    if inflater.eof or (not data and out < _INFLATE_CHUNK):
                        break
    except zlib.error as error:
        raise ValueError(f"{file}: corrupt deflated data set ({error})") from None
    if not inflater.eof:
        raise ValueError(f"{file}: the deflated data set is truncated")


def _check_pixel_data(file: Path, ds: Dataset, pixel_data: tuple[int, int | None] | None) -> None:
    """Refuse, from the header, pixel data that is absent, over MAX_SLICE_BYTES per frame, cut short, or
    (uncompressed) of another length than Rows x Columns x NumberOfFrames x SamplesPerPixel x BitsAllocated declare."""
    sizes = {}
    for keyword, default in (("Rows", 0), ("Columns", 0), ("NumberOfFrames", 1), ("SamplesPerPixel", 1)):
        value = ds.get(keyword)
        try:
            sizes[keyword] = int(default if value in (None, "") else value) or default  # 0 frames: 1, as pydicom
        except (TypeError, ValueError):
            sizes[keyword] = 0
    bits = ds.get("BitsAllocated")
    sizes["BitsAllocated"] = bits if isinstance(bits, int) else 0
    bad = [f"{keyword} {ds.get(keyword)}" for keyword, value in sizes.items() if value < 1]
    if bad:
        raise ValueError(f"{file}: the image header declares {', '.join(bad)}; the file is corrupt")
    frames = sizes.pop("NumberOfFrames")
    per_frame = (math.prod(sizes.values()) + 7) // 8
    if per_frame > MAX_SLICE_BYTES:
        shape = " x ".join(f"{value} {keyword}" for keyword, value in sizes.items())
        raise ValueError(
            f"{file}: declares {shape} = {per_frame:,} bytes of pixel data per frame, over the limit of "
            f"{MAX_SLICE_BYTES:,} bytes per frame"
        )
    declared = (math.prod(sizes.values()) * frames + 7) // 8
    if pixel_data is None:
        raise ValueError(f"{file}: no pixel data; the file may be truncated or corrupt")
    length, end = pixel_data
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is not None and syntax.is_encapsulated or length == 0xFFFFFFFF:
        return  # compressed frames: their decoder checks them
    if ds.get("PhotometricInterpretation") == "YBR_FULL_422":
        declared = declared // 3 * 2  # two samples per pixel stored (PS3.5 8.2.1)
    if length not in (declared, declared + declared % 2):  # an odd length is padded to even
        raise ValueError(
            f"{file}: the pixel data holds {length:,} bytes, but Rows, Columns, NumberOfFrames, SamplesPerPixel and "
            f"BitsAllocated declare {declared:,}; the file is corrupt"
        )
    if end is not None and end > file.stat().st_size:
        size = file.stat().st_size
        raise ValueError(f"{file}: truncated: the pixel data ends at byte {end:,}, the file has {size:,} bytes")


@contextmanager
def _quiet_value_warnings() -> Iterator[None]:
    """Silence pydicom's warnings on malformed values (a DS 'NaN'): the checks refuse a bad one in one clear error."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Invalid value for VR", category=UserWarning)
        yield


def _numbers(ds: Dataset, keyword: str, file: Path | Frame, count: int) -> np.ndarray:
    """The ``count`` numbers of a geometry attribute, all finite, else a ValueError naming the file."""
    value = "unreadable"
    try:
        value = ds.get(keyword)
        numbers = np.asarray(list(value) if isinstance(value, MultiValue | list) else [value], dtype=np.float64)
        value = numbers.tolist()
    except (TypeError, ValueError, OverflowError):
        numbers = np.empty(0)
    if numbers.shape != (count,) or not np.isfinite(numbers).all():
        raise ValueError(f"{file}: {keyword} {value} is not {count} finite numbers: cannot place the image in space")
    return numbers


def _sort_slices(
    headers: list[tuple[Path | Frame, Dataset]], path: Path
) -> tuple[list[tuple[Path | Frame, Dataset]], np.ndarray]:
    """Slices (files or frames) sorted along the slice normal, after checking they form a regular grid, and the LPS
    step (mm) of k."""
    first = headers[0][1]
    for file, ds in headers:
        _numbers(ds, "ImagePositionPatient", file, 3)
        orientation = _numbers(ds, "ImageOrientationPatient", file, 6)
        row, column = orientation[:3], orientation[3:]
        if max(abs(np.linalg.norm(row) - 1), abs(np.linalg.norm(column) - 1), abs(row @ column)) > 1e-2:
            raise ValueError(
                f"{file}: ImageOrientationPatient {orientation.tolist()} is not two perpendicular unit vectors; the "
                "image cannot be placed in space"
            )
    for keyword in ("Rows", "Columns", "PixelSpacing", "ImageOrientationPatient"):
        reference = _values(first, keyword, headers[0][0])
        for file, ds in headers:
            value = _values(ds, keyword, file)
            # NaN counts as equal here: the geometry checks refuse it, naming the attribute
            if value.shape != reference.shape or not np.allclose(value, reference, 1e-4, 1e-4, equal_nan=True):
                raise ValueError(
                    f"{path}: {keyword} differs between slices ({file.name}: {value.tolist()} vs "
                    f"{headers[0][0].name}: {reference.tolist()}); expected one regular grid"
                )
    orientation = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(orientation[:3], orientation[3:])  # row cosine x column cosine
    positions = np.array([np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=np.float64)) for _, ds in headers])
    order = np.argsort(positions, kind="stable")
    headers, positions = [headers[i] for i in order], positions[order]
    if len(headers) == 1:
        thickness = [_values(first, keyword, headers[0][0]) for keyword in ("SpacingBetweenSlices", "SliceThickness")]
        usable = [float(t[0]) for t in thickness if t.shape == (1,) and np.isfinite(t[0]) and t[0] != 0]
        return headers, normal * (usable[0] if usable else 1.0)  # 0, absent or unreadable: unknown

    gaps = np.diff(positions)  # mm along the normal
    same = np.flatnonzero(gaps < 1e-3)
    if same.size:
        a, b = headers[same[0]][0].name, headers[same[0] + 1][0].name
        raise ValueError(
            f"{path}: {a} and {b} share the position {positions[same[0]]:.3f} mm along the normal; expected one "
            "stack of slices, not several volumes (time points, echoes)"
        )
    if gaps.max() - gaps.min() > 1e-2 * gaps.mean():
        raise ValueError(
            f"{path}: irregular slice spacing: {gaps.min():.3g} mm to {gaps.max():.3g} mm; missing slices?"
        )
    first_ipp, last_ipp = (
        np.asarray(ds.ImagePositionPatient, dtype=np.float64) for ds in (headers[0][1], headers[-1][1])
    )
    return headers, (last_ipp - first_ipp) / (len(headers) - 1)  # also follows a gantry tilt


def _values(ds: Dataset, keyword: str, file: Path | Frame) -> np.ndarray:
    """An attribute's numbers as a 1D float64 array (empty when absent), or a ValueError naming the file."""
    try:
        value = ds.get(keyword)
        return np.atleast_1d(np.asarray(list(value) if isinstance(value, MultiValue) else value or [], np.float64))
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{file}: {keyword} is not a list of numbers; the file is corrupt") from None


def _patient_affine(ds: Dataset, file: Path | Frame, step: np.ndarray) -> np.ndarray:
    """4x4 voxel (i, j, k) -> LPS mm affine of a slice stack whose first sorted slice is ``ds``."""
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    row_spacing, column_spacing = _in_plane_spacing(ds, file)
    affine = np.eye(4)
    affine[:3, 0] = orientation[:3] * column_spacing  # IOP[:3]: direction of a row (i); PixelSpacing[1]: its step
    affine[:3, 1] = orientation[3:] * row_spacing  # IOP[3:]: direction of a column (j); PixelSpacing[0]: its step
    affine[:3, 2] = step  # IPP of the last sorted slice minus the first, per slice
    affine[:3, 3] = np.asarray(ds.ImagePositionPatient, dtype=np.float64)  # IPP: centre of voxel (0, 0, 0)
    return affine


def lps_to_ras(affine: np.ndarray) -> np.ndarray:
    """DICOM's patient frame is LPS; NIfTI/nibabel's is RAS+: negate the world x and y axes (the one place).

    The flip is its own inverse, so the same function maps a RAS+ affine back to LPS.
    """
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def _planar_affine(ds: Dataset, file: Path | Frame) -> np.ndarray:
    """Affine of a 2D image without a patient frame: placed as an unrotated DICOM image (column index towards L,
    row index towards P: ImageOrientationPatient [1, 0, 0, 0, 1, 0]) at the origin; displays show row 0 on top."""
    row_spacing, column_spacing = _in_plane_spacing(ds, file)
    return lps_to_ras(np.diag([column_spacing, row_spacing, float(ds.get("SliceThickness") or 1.0), 1.0]))


def _in_plane_spacing(ds: Dataset, file: Path | Frame) -> tuple[float, float]:
    """(row spacing, column spacing) in mm: the distance between rows (along j) and between columns (along i).

    A size that is not positive and finite (some files store 0: unknown) is passed over for the next source."""
    spacing = _positive_pair(ds, "PixelSpacing", file)
    if spacing:
        return spacing
    if ds.get("Modality") == "US":
        for region in ds.get("SequenceOfUltrasoundRegions", []):
            # M-mode and Doppler regions have time or velocity axes; the first region in cm is the image plane
            if region.get("PhysicalUnitsXDirection") == _CM_UNITS == region.get("PhysicalUnitsYDirection"):
                deltas = _values(region, "PhysicalDeltaY", file), _values(region, "PhysicalDeltaX", file)
                if all(d.shape == (1,) and np.isfinite(d[0]) and d[0] > 0 for d in deltas):
                    return float(deltas[0][0]) * 10.0, float(deltas[1][0]) * 10.0
    spacing = _positive_pair(ds, "ImagerPixelSpacing", file)
    if spacing:
        return spacing
    if ds.get("Modality") in ("CR", "DX", "MG", "RF", "XA"):
        # A radiograph is a projection, not a place in patient space: without a pixel size, work in pixels.
        warnings.warn(f"{file}: radiograph without a pixel size; using 1 mm pixels (sizes are in pixels)", stacklevel=4)
        return 1.0, 1.0
    if "PixelSpacing" in ds:
        raise ValueError(
            f"{file}: PixelSpacing {_values(ds, 'PixelSpacing', file).tolist()} is not two positive finite sizes "
            "(mm): cannot place the image in space"
        )
    raise ValueError(
        f"{file} has no ImagePositionPatient/ImageOrientationPatient and no PixelSpacing: cannot place it in space"
    )


def _positive_pair(ds: Dataset, keyword: str, file: Path | Frame) -> tuple[float, float] | None:
    """A pixel size attribute's (rows, columns) in mm if both are positive and finite, else None."""
    pair = _values(ds, keyword, file)
    if pair.shape != (2,) or not (np.isfinite(pair).all() and (pair > 0).all()):
        return None
    return float(pair[0]), float(pair[1])


def _read(file: Path) -> Dataset:
    try:
        return pydicom.dcmread(file)  # a deflated file's inflated size was checked with its header
    except Exception as err:
        raise ValueError(f"{file}: cannot read DICOM file ({err}); the file may be truncated or corrupt") from err


def _pixels(ds: Dataset, file: Path | Frame) -> np.ndarray:
    """One slice in physical units, shape (Rows, Columns), float64; colour is reduced to luminance. ``ds`` is the
    file read whole, or a frame's header (its pixels are then read from the file, that frame alone)."""
    with _quiet_value_warnings():
        return _decoded(ds, file)


def _decoded(ds: Dataset, file: Path | Frame) -> np.ndarray:
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is not None and syntax.is_compressed:
        try:
            missing = [] if get_decoder(syntax).is_available else get_decoder(syntax).missing_dependencies
        except NotImplementedError:
            missing = ["none is known to pydicom for this transfer syntax"]
        if missing:
            raise ValueError(
                f"{file}: cannot decode pixel data in transfer syntax {syntax.name} ({syntax}); install one of "
                f"these decoders: {'; '.join(missing)}"
            )
    if not isinstance(file, Frame) and not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        raise ValueError(f"{file}: no pixel data; the file may be truncated or corrupt")
    try:
        if isinstance(file, Frame):  # pydicom reads a deflated data set whole (its inflated size was checked)
            deflated = syntax == pydicom.uid.DeflatedExplicitVRLittleEndian
            pixels = pixel_array(_read(file.file) if deflated else file.file, index=file.number - 1)
        else:
            pixels = ds.pixel_array  # YBR colour comes back as RGB
    except Exception as err:
        raise ValueError(f"{file}: cannot decode pixel data ({err}); the file may be truncated or corrupt") from err

    if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)  # (Rows, Columns, 3)
    if pixels.ndim == 3:
        return pixels.astype(np.float64) @ _LUMA
    slope = float(ds.get("RescaleSlope") or 1.0)  # (0028,1053): stored value -> physical unit (HU for CT)
    intercept = float(ds.get("RescaleIntercept") or 0.0)  # (0028,1052)
    return pixels.astype(np.float64) * slope + intercept
