"""Read and write scans: NIfTI (nibabel), DICOM series (see ``dicom.py``) and 2D PNG/TIFF frames.

This module and ``dicom.py`` are the only ones that touch image files. Every error names the file.
Writes are atomic: the data go to a temporary file (a DICOM series: folder) beside the target, which is renamed
only when complete.
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medsr.volume import Modality, Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


def file_format(path: Path) -> str:
    """'nifti', 'image' (PNG/TIFF) or 'dicom', from the path alone.

    DICOM is a .dcm/.dicom/.ima file, an existing folder, or a name without a suffix: a series folder to write, or a
    suffix-less DICOM file as scanners export them (IM0001).
    """
    name = Path(path).name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        suffix = Path(path).name[-len(".nii.gz") :] if name.endswith(".gz") else Path(path).name[-len(".nii") :]
        if suffix not in (suffix.lower(), suffix.upper()):  # nibabel lower-cases mixed case and misses the file
            raise ValueError(f"{path}: mixed-case NIfTI suffix {suffix!r}; use {suffix.lower()!r}")
        return "nifti"
    if name.endswith(IMAGE_SUFFIXES):
        return "image"
    if name.endswith(DICOM_SUFFIXES) or Path(path).is_dir() or not Path(path).suffix:
        return "dicom"
    known = ", ".join(NIFTI_SUFFIXES + IMAGE_SUFFIXES + DICOM_SUFFIXES)
    raise ValueError(f"{path}: unknown file type; expected a DICOM series folder (no suffix) or one of {known}")


def is_dicom_file(path: Path) -> bool:
    """A DICOM suffix, or the 'DICM' marker after the 128-byte preamble (DICOM PS3.10 7.1) of a suffix-less file."""
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES + IMAGE_SUFFIXES + DICOM_SUFFIXES):
        return name.endswith(DICOM_SUFFIXES)
    with path.open("rb") as stream:
        return stream.read(132)[128:] == b"DICM"


def read_volume(path: Path | str, *, modality: Modality | str | None = None) -> Volume:
    """Read a scan into a float32 ``(1, I, J, K)`` Volume in physical units with a RAS+ affine.

    Args:
        path: A NIfTI file, a DICOM series folder or file, or a PNG/TIFF image (2D, K == 1).
        modality: Overrides the modality. NIfTI and PNG/TIFF carry none, so they read as ``OT`` without it.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is corrupt or truncated, is not 2D/3D, or holds NaN/inf voxels.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    kind = file_format(path)
    if kind == "nifti":
        volume = _read_nifti(path)
    elif kind == "image":
        volume = _read_image(path)
    else:
        from medsr.dicom import read_dicom

        volume = read_dicom(path)
    bad = int((~torch.isfinite(volume.array)).sum())
    if bad:
        raise ValueError(f"{path}: {bad} voxels are NaN or infinite; fix or mask them before super-resolution")
    return volume if modality is None else volume.replace(modality=Modality(modality))


def write_volume(
    volume: Volume, path: Path | str, *, description: str = "derived by medsr", anonymize: bool = False
) -> None:
    """Write ``volume`` to ``path`` atomically, in the format its suffix names; an existing file is replaced.

    NIfTI gets float32 data and the affine as both sform and qform. PNG/TIFF need a 2D single-channel volume;
    values are rounded and clipped to the source image's integer type (``meta['pixel_dtype']``); volumes from
    other formats (e.g. DICOM in HU) have none and can only go to float TIFF, never silently clipped.

    A DICOM target is a folder (a name without a suffix, or an existing folder) that receives a new derived series,
    one file per slice (see :func:`medsr.dicom.write_series`). It is never the input series, and an existing
    folder is replaced only if empty or written by medsr.

    Args:
        description: DICOM only: the SeriesDescription, saying what made the series (e.g. "SR x2 edsr_baseline").
        anonymize: DICOM only: de-identify the header. NIfTI and PNG/TIFF carry no patient identifiers.
    """
    path = Path(path)
    if volume.array.shape[0] != 1:
        raise ValueError(f"{path}: can only write single-channel volumes, got {volume.array.shape[0]} channels")
    kind = file_format(path)
    if kind == "dicom":
        if path.name.lower().endswith(DICOM_SUFFIXES):
            raise ValueError(f"{path}: a DICOM series is written as a folder; name one without a suffix")
        from medsr.dicom import write_series

        write_series(volume, path, description=description, anonymize=anonymize)
        return
    if kind == "image":
        _check_image(volume, path)
    with _atomic_target(path) as tmp:
        if kind == "nifti":
            _write_nifti(volume, tmp)
        else:
            _write_image(volume, tmp)


@contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so writers pick the format); rename it when done."""
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: folder {path.parent} does not exist")
    tmp = path.with_name(f".{uuid.uuid4().hex[:8]}.tmp.{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_nifti(path: Path) -> Volume:
    try:
        image = nib.load(path)
        array = np.asarray(image.dataobj, dtype=np.float32)  # applies scl_slope/scl_inter
    except Exception as error:  # nibabel raises many types for corrupt/truncated files
        raise ValueError(f"{path}: cannot read as NIfTI ({type(error).__name__}: {error})") from error
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = array[..., np.newaxis]
    if array.ndim != 3:
        raise ValueError(f"{path}: expected a 2D or 3D image, got shape {array.shape}; split 4D series first")
    return Volume(torch.from_numpy(array)[np.newaxis], image.affine, Modality.OT)


def _write_nifti(volume: Volume, path: Path) -> None:
    image = nib.Nifti1Image(volume.array[0].detach().cpu().numpy().astype(np.float32), volume.affine)
    image.header.set_xyzt_units("mm")
    columns = volume.affine[:3, :3] / np.linalg.norm(volume.affine[:3, :3], axis=0)
    orthogonal = np.allclose(columns.T @ columns, np.eye(3), atol=1e-6)
    # The qform cannot hold a shear (e.g. a gantry-tilted CT): then only the sform carries the geometry.
    image.set_qform(volume.affine, code=1 if orthogonal else 0)  # 1 = scanner-based coordinates
    image.set_sform(volume.affine, code=1)
    nib.save(image, path)


def _read_image(path: Path) -> Volume:
    """A PNG/TIFF frame as (1, columns, rows, 1): i runs along columns, j along rows, as for a DICOM slice.

    These formats carry no patient geometry: 1 mm pixels, placed like an unrotated DICOM image (LPS identity).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            if getattr(image, "n_frames", 1) > 1:
                raise ValueError(f"{path}: holds {image.n_frames} frames; medsr reads single-frame images only")
            if image.mode not in ("L", "I;16", "I;16B", "I", "F"):
                warnings.warn(f"{path}: {image.mode} image converted to grey (luminance)", stacklevel=3)
                image = image.convert("L")
            pixels = np.asarray(image)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"{path}: cannot read as an image ({error})") from error
    if pixels.ndim != 2:
        raise ValueError(f"{path}: expected a 2D grey image, got shape {pixels.shape}")
    array = torch.from_numpy(pixels.T.astype(np.float32).copy())[None, :, :, None]
    from medsr.dicom import lps_to_ras

    # No patient frame: placed like an unrotated DICOM image (i towards L, j towards P; row 0 shows on top).
    return Volume(array, lps_to_ras(np.eye(4)), Modality.OT, meta={"pixel_dtype": str(pixels.dtype)})


def _check_image(volume: Volume, path: Path) -> None:
    """PNG/TIFF hold one 2D frame; PNG holds integers only."""
    if volume.spatial_shape[2] != 1:
        raise ValueError(f"{path}: PNG/TIFF hold 2D images; got shape {volume.spatial_shape}, write .nii.gz instead")
    dtype = np.dtype(volume.meta.get("pixel_dtype", "float32"))
    if dtype.kind == "f" and path.name.lower().endswith(".png"):
        raise ValueError(
            f"{path}: PNG holds integers only and this image has no integer source type (values "
            f"would be clipped); write .tif or .nii.gz instead"
        )


def _write_image(volume: Volume, path: Path) -> None:
    from PIL import Image

    dtype = np.dtype(volume.meta.get("pixel_dtype", "float32"))
    values = volume.array[0, :, :, 0].detach().cpu().numpy().T
    if dtype.kind == "f":
        pixels = values.astype(dtype)
    else:
        info = np.iinfo(dtype)
        pixels = np.clip(np.rint(values), info.min, info.max).astype(dtype)
    Image.fromarray(pixels).save(path)
