"""DICOM series -> Volume: sort slices, build the affine from the tags, convert LPS to RAS (only here).

DICOM places a slice in the patient's LPS frame (x to the patient's Left, y Posterior, z Superior) with
ImagePositionPatient (IPP, centre of the first transmitted pixel), ImageOrientationPatient (IOP, the unit
direction cosines of a row and of a column) and PixelSpacing (row spacing, column spacing) [1]. The affine is built
as in MONAI's ``PydicomReader._get_affine``, then flipped once to RAS+ by ``lps_to_ras``.

[1] DICOM PS3.3 C.7.6.2.1.1, "Image Position and Image Orientation".
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, get_decoder

from medsr.volume import Modality, Volume, crop

_CM_UNITS = 3  # PhysicalUnitsX/YDirection code for centimetres (PS3.3 C.8.5.5.1.15)
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 luminance weights of R, G, B
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def read_dicom(path: Path) -> Volume:
    """Read one DICOM series (a folder) or one DICOM file into a (1, I, J, K) float32 Volume in RAS+ world space.

    Voxel index i runs along a slice's columns (the row direction), j along its rows and k across slices sorted by
    their position along the slice normal (never by InstanceNumber or file name), so
    ``volume.array[0, c, r, k] == slice_k.pixel_array[r, c] * RescaleSlope + RescaleIntercept`` (HU for CT).

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
        Volume of shape (1, Columns, Rows, number of slices); ``meta["dicom"]`` is the first sorted slice's header
        without pixel data and ``meta["dicom_source"]`` the path read.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: No DICOM image, several series, inconsistent or irregular slices, a multi-frame, truncated or
            undecodable file, or an image that cannot be placed in space. The message names the file or folder.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such DICOM file or folder")
    headers = _read_series_headers(path)
    for file, ds in headers:
        if int(ds.get("NumberOfFrames") or 1) > 1:
            raise ValueError(f"{file}: multi-frame DICOM is not supported yet; expected one frame per file")

    if all("ImagePositionPatient" in ds and "ImageOrientationPatient" in ds for _, ds in headers):
        headers, step = _sort_slices(headers, path)
        affine = lps_to_ras(_patient_affine(headers[0][1], headers[0][0], step))
    elif len(headers) == 1:
        affine = _planar_affine(headers[0][1], headers[0][0])
    else:
        raise ValueError(
            f"{path}: a series of {len(headers)} slices needs ImagePositionPatient and ImageOrientationPatient "
            "in every file to order them in space"
        )

    slices = []
    for index, (file, _) in enumerate(headers):
        ds = _read(file)  # one file at a time, so only the decoded volume is held in memory
        slices.append(_pixels(ds, file).T)  # (Columns, Rows): i along columns, j along rows
        if index == 0:
            first = ds
    if first.get("SamplesPerPixel", 1) > 1 or first.get("PhotometricInterpretation") == "PALETTE COLOR":
        warnings.warn(
            f"{path}: {first.PhotometricInterpretation} image converted to grey (BT.601 luminance)", stacklevel=2
        )
    for keyword in _PIXEL_KEYWORDS:
        if keyword in first:
            delattr(first, keyword)  # the header is kept for writing DICOM back, the pixels live in the array

    array = torch.from_numpy(np.stack(slices, axis=-1).astype(np.float32))[np.newaxis]  # (1, I, J, K)
    known = {m.value for m in Modality}
    modality = Modality(first.Modality) if first.get("Modality") in known else Modality.OT
    volume = Volume(array, affine, modality, {"dicom": first, "dicom_source": str(path)})
    if modality is Modality.US and len(headers) == 1:
        volume = _crop_to_ultrasound_region(volume, first, headers[0][0])
    return volume


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
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        except InvalidDicomError:
            if path.is_dir():
                continue  # README, .DS_Store, ...: no 128-byte preamble + "DICM", so not a DICOM file
            raise ValueError(f"{file}: not a DICOM file (no 'DICM' marker after the 128-byte preamble)") from None
        except Exception as err:
            raise ValueError(f"{file}: cannot read DICOM header ({err}); the file may be truncated or corrupt") from err
        sop_class = ds.file_meta.get("MediaStorageSOPClassUID") or ds.get("SOPClassUID")
        if "Rows" not in ds:
            if sop_class is not None and "Image Storage" in sop_class.name:
                raise ValueError(f"{file}: image header ends before Rows; the file is truncated or corrupt")
            continue  # DICOMDIR, structured reports, presentation states: not images
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


def _sort_slices(headers: list[tuple[Path, Dataset]], path: Path) -> tuple[list[tuple[Path, Dataset]], np.ndarray]:
    """Slices sorted along the slice normal, after checking they form a regular grid, and the LPS step (mm) of k."""
    first = headers[0][1]
    for keyword in ("Rows", "Columns", "PixelSpacing", "ImageOrientationPatient"):
        reference = np.asarray(first.get(keyword) or [], dtype=np.float64)
        for file, ds in headers:
            value = np.asarray(ds.get(keyword) or [], dtype=np.float64)
            if value.shape != reference.shape or not np.allclose(value, reference, rtol=1e-4, atol=1e-4):
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
        thickness = first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0
        return headers, normal * float(thickness)

    gaps = np.diff(positions)  # mm along the normal
    same = np.flatnonzero(gaps < 1e-3)
    if same.size:
        a, b = headers[same[0]][0].name, headers[same[0] + 1][0].name
        raise ValueError(f"{path}: slices {a} and {b} share the position {positions[same[0]]:.3f} mm along the normal")
    if gaps.max() - gaps.min() > 1e-2 * gaps.mean():
        raise ValueError(
            f"{path}: irregular slice spacing: {gaps.min():.3g} mm to {gaps.max():.3g} mm; missing slices?"
        )
    first_ipp, last_ipp = (
        np.asarray(ds.ImagePositionPatient, dtype=np.float64) for ds in (headers[0][1], headers[-1][1])
    )
    return headers, (last_ipp - first_ipp) / (len(headers) - 1)  # also follows a gantry tilt


def _patient_affine(ds: Dataset, file: Path, step: np.ndarray) -> np.ndarray:
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
    """DICOM's patient frame is LPS; NIfTI/nibabel's is RAS+: negate the world x and y axes (the one place)."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def _planar_affine(ds: Dataset, file: Path) -> np.ndarray:
    """Affine of a 2D image without a patient frame: placed as an unrotated DICOM image (column index towards L,
    row index towards P: ImageOrientationPatient [1, 0, 0, 0, 1, 0]) at the origin; displays show row 0 on top."""
    row_spacing, column_spacing = _in_plane_spacing(ds, file)
    return lps_to_ras(np.diag([column_spacing, row_spacing, float(ds.get("SliceThickness") or 1.0), 1.0]))


def _in_plane_spacing(ds: Dataset, file: Path) -> tuple[float, float]:
    """(row spacing, column spacing) in mm: the distance between rows (along j) and between columns (along i)."""
    if ds.get("PixelSpacing") and min(float(s) for s in ds.PixelSpacing) > 0:  # some files store 0: unknown
        return float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])
    if ds.get("Modality") == "US":
        for region in ds.get("SequenceOfUltrasoundRegions", []):
            # M-mode and Doppler regions have time or velocity axes; the first region in cm is the image plane
            if region.get("PhysicalUnitsXDirection") == _CM_UNITS == region.get("PhysicalUnitsYDirection"):
                return float(region.PhysicalDeltaY) * 10.0, float(region.PhysicalDeltaX) * 10.0
    if ds.get("ImagerPixelSpacing"):
        return float(ds.ImagerPixelSpacing[0]), float(ds.ImagerPixelSpacing[1])
    if ds.get("Modality") in ("CR", "DX", "MG", "RF", "XA"):
        # A radiograph is a projection, not a place in patient space: without a pixel size, work in pixels.
        warnings.warn(f"{file}: radiograph without a pixel size; using 1 mm pixels (sizes are in pixels)", stacklevel=4)
        return 1.0, 1.0
    raise ValueError(
        f"{file} has no ImagePositionPatient/ImageOrientationPatient and no PixelSpacing: cannot place it in space"
    )


def _read(file: Path) -> Dataset:
    try:
        return pydicom.dcmread(file)
    except Exception as err:
        raise ValueError(f"{file}: cannot read DICOM file ({err}); the file may be truncated or corrupt") from err


def _pixels(ds: Dataset, file: Path) -> np.ndarray:
    """One slice in physical units, shape (Rows, Columns), float64; colour is reduced to luminance."""
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
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        raise ValueError(f"{file}: no pixel data; the file may be truncated or corrupt")
    try:
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
