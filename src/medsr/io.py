"""Read and write scans: NIfTI (nibabel), DICOM series (see ``dicom.py``) and 2D PNG/TIFF frames.

This module and ``dicom.py`` are the only ones that touch image files. Every error names the file.
Writes are atomic: the data go to a temporary file (a DICOM series: folder) beside the target, which is renamed
only when complete.

Scans too large for memory are read and written slab by slab along k: :func:`open_volume` gives a
:class:`VolumeFile` (geometry now, voxels on demand) and :func:`volume_writer` takes the slabs in k order.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from nibabel.affines import voxel_sizes
from nibabel.arrayproxy import ArrayProxy
from nibabel.openers import Opener

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
    kind = _existing_format(path)
    if kind == "nifti":
        volume = _read_nifti(path)
    elif kind == "image":
        volume = _read_image(path)
    else:
        from medsr.dicom import read_dicom

        volume = read_dicom(path)
    _check_finite(volume.array.numpy(), str(path))
    return volume if modality is None else volume.replace(modality=Modality(modality))


def _existing_format(path: Path) -> str:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    return file_format(path)


def _check_finite(values: np.ndarray, where: str) -> None:
    bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise ValueError(f"{where}: {bad} voxels are NaN or infinite; fix or mask them before super-resolution")


@dataclasses.dataclass(frozen=True)
class VolumeFile:
    """A scan opened for reading slab by slab along k: geometry now, voxels on demand (see :func:`open_volume`).

    The lazy counterpart of a :class:`~medsr.volume.Volume` with one channel, for scans too large for memory.

    Args:
        path: The file or DICOM series folder.
        spatial_shape: (I, J, K) in voxels.
        affine, modality, meta: What :func:`read_volume` would put in the Volume.
        read_slab: ``read_slab(start, stop)`` gives slices ``[start, stop)`` as float32 (I, J, stop - start) in
            physical units, as ``read_volume(path).array[0, :, :, start:stop]``; a NaN/inf voxel or an unreadable
            slice is a ValueError naming the file and slice. Read in increasing k: a .nii.gz file is decompressed
            as one stream, so going back means decompressing from the start again.
    """

    path: Path
    spatial_shape: tuple[int, int, int]
    affine: np.ndarray
    modality: Modality
    meta: Mapping[str, Any]
    read_slab: Callable[[int, int], np.ndarray]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k, as :attr:`Volume.spacing` gives it."""
        return tuple(float(s) for s in voxel_sizes(self.affine))

    def slices(self) -> Iterator[np.ndarray]:
        """Every slice in k order, float32 (I, J)."""
        for k in range(self.spatial_shape[2]):
            yield self.read_slab(k, k + 1)[:, :, 0]


def open_volume(path: Path | str, *, modality: Modality | str | None = None) -> VolumeFile:
    """Open a NIfTI file or a DICOM series for reading slab by slab; only headers are read now.

    Memory holds a slab at a time, never the volume: NIfTI slices are read from the file (a .nii.gz through one
    gzip stream kept open, so a pass in k order decompresses the file once), DICOM slices one file each.

    Args:
        path: A .nii/.nii.gz file, or a DICOM series folder or file (as :func:`read_volume` takes them).
        modality: Overrides the modality, as for :func:`read_volume`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: As :func:`read_volume`, for what the headers show (a truncated .nii is caught here, a
            truncated .nii.gz only when its slices are read); PNG/TIFF and ultrasound DICOM, 2D frames that
            :func:`read_volume` reads whole.
    """
    path = Path(path)
    kind = _existing_format(path)
    if kind == "image":
        raise ValueError(f"{path}: PNG/TIFF hold one 2D frame; read it whole with read_volume")
    source = _open_nifti(path) if kind == "nifti" else _open_dicom(path)
    return source if modality is None else dataclasses.replace(source, modality=Modality(modality))


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
        _check_series_name(path)
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
def volume_writer(
    path: Path | str,
    *,
    spatial_shape: tuple[int, int, int],
    affine: np.ndarray,
    modality: Modality | str = Modality.OT,
    meta: Mapping[str, Any] | None = None,
    description: str = "derived by medsr",
    anonymize: bool = False,
) -> Iterator[Callable[[np.ndarray], None]]:
    """:func:`write_volume` for a single-channel volume that arrives slab by slab along k, in bounded memory.

    Yields ``write(slab)``: call it with float32 slabs (I, J, n) in physical units, in k order, K slices in all.
    The result equals ``write_volume`` of the whole volume (a .nii file byte for byte), and so do the rules: the
    target appears only when the block completes (an exception, or fewer than K slices, leaves it as it was), an
    existing NIfTI file is replaced, a DICOM folder only if medsr wrote it.

    NIfTI: the header, then each slab appended (see :func:`_nifti_writer`); .nii.gz is compressed on the way.
    DICOM series: the rescale and window need the whole value range before the first file, so the slabs are
    staged in an uncompressed temporary NIfTI file beside the folder (I * J * K * 4 bytes of disk, deleted after),
    then written by :func:`medsr.dicom.write_series_slices`. The target is checked before the block runs.

    Args:
        spatial_shape: (I, J, K) of the whole volume.
        affine, modality, meta: The Volume fields ``write_volume`` would use (``meta``: the DICOM source header).
        description, anonymize: As for :func:`write_volume`.
    """
    path, modality, meta = Path(path), Modality(modality), meta or {}
    kind = file_format(path)
    if kind == "image":
        raise ValueError(f"{path}: PNG/TIFF hold one 2D frame; write it whole with write_volume")
    if kind == "nifti":
        with _atomic_target(path) as tmp, _nifti_writer(tmp, affine, spatial_shape) as write:
            yield write
        return
    _check_series_name(path)
    from medsr.dicom import check_series_target, write_series_slices

    check_series_target(path, modality, meta, description)
    with _temporary(path.with_name(f"{path.name}.nii")) as staged:
        # Plain reads and writes, not a memory map: mapped pages would count as the process's memory.
        with _nifti_writer(staged, affine, spatial_shape) as write:

            def write_finite(slab: np.ndarray) -> None:
                _check_finite(slab, str(path))  # DICOM stores integers: refuse at once, not after the last slice
                write(slab)

            yield write_finite
        write_series_slices(
            path,
            _open_nifti(staged).slices,
            depth=spatial_shape[2],
            affine=affine,
            modality=modality,
            meta=meta,
            description=description,
            anonymize=anonymize,
        )


def _check_series_name(path: Path) -> None:
    if path.name.lower().endswith(DICOM_SUFFIXES):
        raise ValueError(f"{path}: a DICOM series is written as a folder; name one without a suffix")


@contextmanager
def _temporary(path: Path) -> Iterator[Path]:
    """Yield a new temporary path beside ``path`` (ending as it does, so writers pick the format); delete it after."""
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: folder {path.parent} does not exist")
    tmp = path.with_name(f".{uuid.uuid4().hex[:8]}.tmp.{path.name}")
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` when the block completes."""
    with _temporary(path) as tmp:
        yield tmp
        os.replace(tmp, path)


def _read_nifti(path: Path) -> Volume:
    try:
        image = nib.load(path)
        array = np.asarray(image.dataobj, dtype=np.float32)  # applies scl_slope/scl_inter
    except Exception as error:  # nibabel raises many types for corrupt/truncated files
        raise ValueError(f"{path}: cannot read as NIfTI ({type(error).__name__}: {error})") from error
    array = array.reshape(_nifti_spatial_shape(path, array.shape))
    return Volume(torch.from_numpy(array)[np.newaxis], image.affine, Modality.OT)


def _nifti_spatial_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(I, J, K) of a NIfTI image of ``shape``: a 2D image has K == 1, a 4D one with one frame is 3D."""
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) == 2:
        shape = (*shape, 1)
    if len(shape) != 3:
        raise ValueError(f"{path}: expected a 2D or 3D image, got shape {shape}; split 4D series first")
    return tuple(int(n) for n in shape)


def _write_nifti(volume: Volume, path: Path) -> None:
    header = _nifti_header(volume.affine, volume.spatial_shape)
    nib.save(nib.Nifti1Image(volume.array[0].detach().cpu().numpy().astype(np.float32), None, header), path)


def _nifti_header(affine: np.ndarray, spatial_shape: tuple[int, int, int]) -> nib.Nifti1Header:
    """Header of a float32 NIfTI-1 image in mm with ``affine`` as both sform and qform (when it can hold it)."""
    header = nib.Nifti1Header()
    header.set_data_shape(spatial_shape)
    header.set_data_dtype(np.float32)
    header.set_xyzt_units("mm")
    columns = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    orthogonal = np.allclose(columns.T @ columns, np.eye(3), atol=1e-6)
    # The qform cannot hold a shear (e.g. a gantry-tilted CT): then only the sform carries the geometry.
    header.set_qform(affine, code=1 if orthogonal else 0)  # 1 = scanner-based coordinates
    header.set_sform(affine, code=1)
    return header


@contextmanager
def _nifti_writer(
    path: Path, affine: np.ndarray, spatial_shape: tuple[int, int, int]
) -> Iterator[Callable[[np.ndarray], None]]:
    """Write a float32 NIfTI-1 file (gzip-compressed for .nii.gz, as nibabel compresses) slab by slab along k.

    Yields ``write(slab)`` for float32 slabs (I, J, n) in k order. The header goes first; the voxels follow in
    Fortran order (i fastest), in which each k-slice is one contiguous run, so slabs are simply appended. A .nii
    file gets the bytes :func:`_write_nifti` (``nib.save``) writes for the whole array.

    Raises:
        ValueError: a slab of the wrong shape, or fewer than K slices when the block completes.
    """
    written = 0
    with Opener(path, "wb") as stream:

        def write(slab: np.ndarray) -> None:
            nonlocal written
            if slab.ndim != 3 or slab.shape[:2] != spatial_shape[:2] or written + slab.shape[2] > spatial_shape[2]:
                raise ValueError(f"{path}: slab of shape {slab.shape} after {written} slices of {spatial_shape}")
            stream.write(np.asarray(slab, dtype=np.float32).tobytes(order="F"))
            written += slab.shape[2]

        _nifti_header(affine, spatial_shape).write_to(stream)  # 348 bytes + 4 for "no extensions": voxels at 352
        yield write
    if written != spatial_shape[2]:
        raise ValueError(f"{path}: got {written} of {spatial_shape[2]} slices")


def _open_nifti(path: Path) -> VolumeFile:
    try:
        image = nib.load(path)
        proxy = image.dataobj
    except Exception as error:  # nibabel raises many types for corrupt files
        raise ValueError(f"{path}: cannot read as NIfTI ({type(error).__name__}: {error})") from error
    shape = _nifti_spatial_shape(path, image.shape)
    # A proxy of the (I, J, K) shape that keeps its file (for .nii.gz: its gzip stream) open between slices; read in
    # k order, a .nii.gz is then decompressed once, where a new stream per slice costs O(K^2).
    proxy = ArrayProxy(
        path, (shape, proxy.dtype, proxy.offset, proxy.slope, proxy.inter), mmap=False, keep_file_open=True
    )
    size = proxy.offset + np.prod(shape) * proxy.dtype.itemsize
    if not path.name.lower().endswith(".gz") and path.stat().st_size < size:
        raise ValueError(f"{path}: truncated: {path.stat().st_size} bytes, the header says {size}")

    def read_slab(start: int, stop: int) -> np.ndarray:
        try:
            values = np.array(proxy[:, :, start:stop], dtype=np.float32)  # applies scl_slope/scl_inter; writable
        except Exception as error:
            raise ValueError(
                f"{path}: cannot read slices {start} to {stop - 1} ({type(error).__name__}: {error}); the file may "
                "be truncated or corrupt"
            ) from error
        for k in range(start, stop):
            _check_finite(values[:, :, k - start], f"{path}, slice {k}")
        return values

    return VolumeFile(path, shape, image.affine, Modality.OT, {}, read_slab)


def _open_dicom(path: Path) -> VolumeFile:
    from medsr.dicom import open_series, read_slice

    series = open_series(path)
    if series.modality is Modality.US:
        raise ValueError(f"{path}: ultrasound DICOM is a 2D frame cropped to its image region; use read_volume")

    def read_slab(start: int, stop: int) -> np.ndarray:
        slices = [read_slice(file).astype(np.float32) for file in series.files[start:stop]]
        for k, values in enumerate(slices, start):
            _check_finite(values, f"{series.files[k]} (slice {k})")
        return np.stack(slices, axis=-1)

    return VolumeFile(path, series.spatial_shape, series.affine, series.modality, series.meta, read_slab)


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
