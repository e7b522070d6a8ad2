"""Read and write scans: NIfTI (nibabel), DICOM series (see ``dicom.py``) and 2D PNG/TIFF frames.

This module and ``dicom.py`` are the only ones that touch image files. Every error names the file.
Writes are atomic: the data go to a temporary file (a DICOM series: folder) beside the target, which is renamed
only when complete.

Scans too large for memory are read and written slab by slab along k: :func:`open_volume` gives a
:class:`VolumeFile` (geometry now, voxels on demand) and :func:`volume_writer` takes the slabs in k order.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import logging
import math
import os
import secrets
import shutil
import signal
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
import torch
from nibabel.affines import voxel_sizes
from nibabel.arrayproxy import ArrayProxy
from nibabel.openers import Opener
from nibabel.volumeutils import apply_read_scaling

from medsr.volume import MAX_VOLUME_BYTES, Modality, Volume

if TYPE_CHECKING:
    from medsr.deidentify import Deidentifier

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
NIFTI_DTYPES = ("input", "float32")  # NIfTI voxel types write_volume offers: the source NIfTI's, or float32
# Source NIfTI types written back as they were; others (float, 64-bit integers) are written as float32.
_INTEGER_TYPES = tuple(np.dtype(t) for t in ("uint8", "int8", "uint16", "int16", "uint32", "int32"))
_WRITE_CHUNK = 2**22  # voxels converted to the stored type at a time when a volume in memory is written


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
    if not path.is_file():  # a FIFO would block the read; a broken symlink or a folder is no DICOM file
        return False
    try:
        with path.open("rb") as stream:
            return stream.read(132)[128:] == b"DICM"
    except OSError:
        return False


def read_volume(path: Path | str, *, modality: Modality | str | None = None) -> Volume:
    """Read a scan into a float32 ``(1, I, J, K)`` Volume in physical units with a RAS+ affine.

    Args:
        path: A NIfTI file, a DICOM series folder or file, or a PNG/TIFF image (2D, K == 1).
        modality: Overrides the modality. NIfTI and PNG/TIFF carry none, so they read as ``OT`` without it.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is corrupt or truncated (a .nii.gz: its gzip CRC and length are checked), empty, not a
            regular file, not 2D/3D, holds complex or colour NIfTI voxels or NaN/inf voxels, has a geometry that
            cannot place the voxels (NaN, infinite or zero voxel sizes, a singular affine), or declares more than
            ``MAX_VOLUME_BYTES`` of float32 (``MAX_IMAGE_PIXELS`` for PNG/TIFF, ``dicom.MAX_SLICE_BYTES`` per DICOM
            file). Checked on the headers before any voxel is read; the message names the file and the problem.
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
    """The format of an existing ``path``; a NIfTI or PNG/TIFF path must be a non-empty regular file."""
    if not path.exists():
        if path.is_symlink():
            raise ValueError(f"{path}: a symbolic link that leads nowhere (a missing target, or a loop of links)")
        raise FileNotFoundError(f"{path}: no such file or folder")
    kind = file_format(path)
    if kind != "dicom":
        if not path.is_file():  # a folder; a FIFO or device would hang or never end
            what = "a folder" if path.is_dir() else "not a regular file"
            raise ValueError(f"{path}: is {what}; expected a {'NIfTI' if kind == 'nifti' else 'PNG/TIFF'} file")
        if path.stat().st_size == 0:
            raise ValueError(f"{path}: empty file (0 bytes)")
    return kind


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

    def read(self) -> Volume:
        """The whole scan in memory: what :func:`read_volume` gives, without reading the headers again."""
        if 4 * math.prod(self.spatial_shape) > MAX_VOLUME_BYTES:
            raise ValueError(f"{self.path}: {self.spatial_shape} voxels do not fit in memory; stream it instead")
        array = torch.from_numpy(self.read_slab(0, self.spatial_shape[2]))[None]
        return Volume(array, self.affine, self.modality, dict(self.meta))


def open_volume(path: Path | str, *, modality: Modality | str | None = None) -> VolumeFile:
    """Open a NIfTI file or a DICOM series for reading slab by slab; only headers are read now.

    Memory holds a slab at a time, never the volume: NIfTI slices are read from the file (a .nii.gz through one
    gzip stream kept open, so a pass in k order decompresses the file once), DICOM slices one file each.

    Args:
        path: A .nii/.nii.gz file, or a DICOM series folder or file (as :func:`read_volume` takes them).
        modality: Overrides the modality, as for :func:`read_volume`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: As :func:`read_volume` (there is no whole-scan limit), for what the headers show and, for a
            .nii.gz, for its whole gzip stream, decompressed once now without keeping it (a corrupt or truncated
            file fails before any slab is used); NaN/inf voxels when their slab is read. PNG/TIFF and ultrasound
            DICOM, 2D frames that :func:`read_volume` reads whole.
    """
    path = Path(path)
    kind = _existing_format(path)
    if kind == "image":
        raise ValueError(f"{path}: PNG/TIFF hold one 2D frame; read it whole with read_volume")
    source = _open_nifti(path) if kind == "nifti" else _open_dicom(path)
    return source if modality is None else dataclasses.replace(source, modality=Modality(modality))


def open_scan(path: Path | str, *, modality: Modality | str | None = None) -> Volume | VolumeFile:
    """A scan opened lazily where its format can be read slab by slab (NIfTI, DICOM series), else read whole
    (PNG/TIFF; ultrasound DICOM, a 2D frame :func:`read_volume` crops to its image region). Headers are read once.
    """
    path = Path(path)
    kind = _existing_format(path)
    if kind == "image":
        return read_volume(path, modality=modality)
    if kind == "nifti":
        source = _open_nifti(path)
    else:
        from medsr.dicom import open_series

        series = open_series(path)
        if series.modality is Modality.US:
            return read_volume(path, modality=modality)
        source = _series_file(series)
    return source if modality is None else dataclasses.replace(source, modality=Modality(modality))


def write_volume(
    volume: Volume,
    path: Path | str,
    *,
    description: str = "derived by medsr",
    anonymize: bool | Deidentifier = False,
    dtype: str = "float32",
    display_range: tuple[float, float] | None = None,
    model: str | None = None,
    new_study: bool = False,
    enhanced: bool = False,
) -> None:
    """Write ``volume`` to ``path`` atomically, in the format its suffix names; an existing file is replaced.

    NIfTI gets the affine as both sform and qform, float32 voxels or the source NIfTI's integer type and scaling
    (``dtype``), ``description`` as descrip and ``display_range`` as cal_min/cal_max. PNG/TIFF need a 2D
    single-channel volume; values are rounded and clipped to the source image's integer type
    (``meta['pixel_dtype']``); volumes from other formats (e.g. DICOM in HU) have none and can only go to float
    TIFF, never silently clipped.

    A DICOM target is a folder (a name without a suffix, or an existing folder) that receives a new derived series,
    one file per slice (see :func:`medsr.dicom_write.write_series`). It is never the input series, and an existing
    folder is replaced only if empty or written by medsr.

    Args:
        description: What made the volume (e.g. "medsr SR x2x2x1 edsr_mr_x2"): the DICOM SeriesDescription, the
            NIfTI descrip (its first 80 bytes).
        anonymize: DICOM only: de-identify the header, ``True`` (PS3.15 Basic Profile) or with a
            :class:`medsr.deidentify.Deidentifier` (see :func:`medsr.dicom_write.write_series`). NIfTI and PNG/TIFF
            carry no patient identifiers.
        dtype: NIfTI only: 'float32', or 'input': the integer type and scl_slope/scl_inter of the NIfTI the volume
            was read from (``meta['nifti']``), float32 where that stored floats or there was none (DICOM, PNG/TIFF).
            Integers store round((x - scl_inter) / scl_slope) clipped to the type's range: super-resolution
            overshoot beyond it (e.g. below 0 in uint8) is clipped.
        display_range: NIfTI only: (cal_min, cal_max), the values a viewer maps to black and white (e.g. the
            intensity window); None: (0, 0), none.
        model, new_study, enhanced: DICOM only: the model (name and checksum) recorded in the derivation, whether
            the series goes into a new study, and whether it is one enhanced multi-frame file instead of one file
            per slice (see :func:`medsr.dicom_write.write_series`).

    >>> import tempfile, torch
    >>> path = Path(tempfile.mkdtemp()) / "sr.nii.gz"
    >>> write_volume(Volume(torch.zeros(1, 4, 4, 2), np.eye(4)), path, display_range=(0.0, 100.0))
    >>> import nibabel; header = nibabel.load(path).header
    >>> header.get_data_dtype(), header["descrip"], float(header["cal_max"])
    (dtype('<f4'), array(b'derived by medsr', dtype='|S80'), 100.0)
    """
    path = Path(path)
    if volume.array.shape[0] != 1:
        raise ValueError(f"{path}: can only write single-channel volumes, got {volume.array.shape[0]} channels")
    kind = file_format(path)
    if kind == "dicom":
        _check_series_name(path)
        from medsr.dicom_write import write_series

        write_series(
            volume,
            path,
            description=description,
            anonymize=anonymize,
            model=model,
            new_study=new_study,
            enhanced=enhanced,
        )
        return
    if kind == "image":
        _check_image(volume, path)
        with atomic_output(path) as tmp:
            _write_image(volume, tmp)
        return
    header = _nifti_header(
        volume.affine,
        volume.spatial_shape,
        meta=volume.meta,
        dtype=dtype,
        description=description,
        display_range=display_range,
    )
    values = volume.array[0].detach().cpu().numpy()
    step = max(1, _WRITE_CHUNK // (values.shape[0] * values.shape[1]))  # slices converted at a time
    with atomic_output(path) as tmp, _nifti_writer(tmp, header) as write:
        for start in range(0, values.shape[2], step):
            write(values[:, :, start : start + step])


@contextmanager
def volume_writer(
    path: Path | str,
    *,
    spatial_shape: tuple[int, int, int],
    affine: np.ndarray,
    modality: Modality | str = Modality.OT,
    meta: Mapping[str, Any] | None = None,
    description: str = "derived by medsr",
    anonymize: bool | Deidentifier = False,
    dtype: str = "float32",
    display_range: tuple[float, float] | None = None,
    model: str | None = None,
    new_study: bool = False,
    enhanced: bool = False,
) -> Iterator[Callable[[np.ndarray], None]]:
    """:func:`write_volume` for a single-channel volume that arrives slab by slab along k, in bounded memory.

    Yields ``write(slab)``: call it with float32 slabs (I, J, n) in physical units, in k order, K slices in all.
    The result equals ``write_volume`` of the whole volume (a .nii file byte for byte), and so do the rules: the
    target appears only when the block completes (an exception, or fewer than K slices, leaves it as it was), an
    existing NIfTI file is replaced, a DICOM folder only if medsr wrote it.

    NIfTI: the header (the voxel type and scaling come from ``meta``, known up front), then each slab appended
    (see :func:`_nifti_writer`); .nii.gz is compressed on the way.
    DICOM series: the rescale and window need the whole value range before the first file, so the slabs are
    staged in an uncompressed temporary NIfTI file beside the folder (I * J * K * 4 bytes of disk, deleted after),
    then written by :func:`medsr.dicom_write.write_series_slices`. The target is checked before the block runs.

    Args:
        spatial_shape: (I, J, K) of the whole volume.
        affine, modality, meta: The Volume fields ``write_volume`` would use (``meta``: the DICOM source header,
            the source NIfTI's storage).
        description, anonymize, dtype, display_range, model, new_study, enhanced: As for :func:`write_volume`.
    """
    path, modality, meta = Path(path), Modality(modality), meta or {}
    kind = file_format(path)
    if kind == "image":
        raise ValueError(f"{path}: PNG/TIFF hold one 2D frame; write it whole with write_volume")
    if kind == "nifti":
        header = _nifti_header(
            affine, spatial_shape, meta=meta, dtype=dtype, description=description, display_range=display_range
        )
        with atomic_output(path) as tmp, _nifti_writer(tmp, header) as write:
            yield write
        return
    _check_series_name(path)
    from medsr.dicom_write import check_series_target, write_series_slices

    check_series_target(path, modality, meta, description, enhanced=enhanced)
    with temporary_path(path.with_name(f"{path.name}.nii")) as staged:
        # Plain reads and writes, not a memory map: mapped pages would count as the process's memory.
        with _nifti_writer(staged, _nifti_header(affine, spatial_shape)) as write:

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
            model=model,
            new_study=new_study,
            enhanced=enhanced,
        )


def _check_series_name(path: Path) -> None:
    if path.name.lower().endswith(DICOM_SUFFIXES):
        raise ValueError(f"{path}: a DICOM series is written as a folder; name one without a suffix")


TEMP_MARK = ".medsr-tmp."  # in every temporary name: ".<pid>.<random>.medsr-tmp.<target name>"


@contextmanager
def temporary_path(path: Path | str, *, folder: bool = False) -> Iterator[Path]:
    """Yield a new temporary file (or folder) beside ``path``, ending as ``path`` does (so writers pick the format);
    it is removed when the block ends, however it ends (an exception, KeyboardInterrupt, or SIGTERM once
    :func:`exit_on_sigterm` is installed).

    The name is unpredictable (a random token) and the file is created exclusively (``O_CREAT | O_EXCL``, as
    ``tempfile.mkstemp`` does), so a file or symlink planted beside the target is never written through. It is
    named before it is made, so a signal that lands the moment it appears still removes it. Temporaries that a
    killed process (``kill -9``) left beside the same target are removed first: their names carry the dead
    process's id.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: folder {path.parent} does not exist")
    _remove_stale_temporaries(path)
    tmp = None
    try:
        while tmp is None:
            tmp = path.parent / f".{os.getpid()}.{secrets.token_hex(4)}{TEMP_MARK}{path.name}"
            try:
                if folder:
                    os.mkdir(tmp, 0o700)
                else:
                    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:  # someone else's: never removed
                tmp = None
        yield tmp
    finally:
        if tmp is not None:
            _remove(tmp)


@contextmanager
def atomic_output(path: Path | str, *, folder: bool = False) -> Iterator[Path]:
    """The one atomic writer: yield a temporary path (see :func:`temporary_path`) that replaces ``path`` when the
    block completes, so ``path`` is at every moment the old content or the complete new one.

    An existing folder is moved aside first and deleted after the rename (callers check that it may be replaced).
    ``os.replace`` renames the temporary onto ``path`` itself: a symlink at ``path`` is replaced, not followed.

    >>> import tempfile; target = Path(tempfile.mkdtemp()) / "scores.txt"
    >>> with atomic_output(target) as tmp:
    ...     _ = tmp.write_text("done")
    >>> target.read_text(), sorted(p.name for p in target.parent.iterdir())
    ('done', ['scores.txt'])
    """
    path = Path(path)
    with temporary_path(path, folder=folder) as tmp:
        yield tmp
        if not (folder and path.is_dir() and not path.is_symlink()):
            os.replace(tmp, path)
            return
        with temporary_path(path, folder=True) as old:
            os.replace(path, old)  # onto the empty folder just made
            try:
                os.replace(tmp, path)
            except OSError:
                os.replace(old, path)
                raise


def write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_output`)."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def sidecar_path(path: Path | str) -> Path:
    """The JSON sidecar of an image file, named as BIDS names them: the file's name without its suffix, + .json.

    >>> sidecar_path("out/sr.nii.gz"), sidecar_path("sr.png")
    (PosixPath('out/sr.json'), PosixPath('sr.json'))
    """
    path = Path(path)
    stem = path.name[: -len(".nii.gz")] if path.name.lower().endswith(".nii.gz") else path.stem
    return path.with_name(f"{stem}.json")


@contextmanager
def sidecar_output(path: Path | str, record: Mapping[str, Any]) -> Iterator[None]:
    """Write ``record`` as the JSON sidecar of ``path`` (:func:`sidecar_path`) along with the file that the block
    writes atomically to ``path``: the sidecar is staged before the block and takes its name after it, so an
    exception (or SIGTERM, see :func:`exit_on_sigterm`) leaves neither new file, and the old ones as they were.

    >>> import tempfile; target = Path(tempfile.mkdtemp()) / "sr.nii.gz"
    >>> with sidecar_output(target, {"Model": "edsr_mr_x2"}):
    ...     write_bytes(target, b"voxels")
    >>> sorted(p.name for p in target.parent.iterdir()), json.loads(sidecar_path(target).read_text())
    (['sr.json', 'sr.nii.gz'], {'Model': 'edsr_mr_x2'})
    """
    with atomic_output(sidecar_path(path)) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        yield


def check_output(output: Path | str, inputs: Sequence[Path | str] = (), *, force: bool = False) -> None:
    """The one guard before a write: never an input (nor inside an input folder, nor a folder holding an input),
    never an existing path without ``force``, and only a parent folder that exists.

    >>> check_output("scan.nii.gz", ["scan.nii.gz"])
    Traceback (most recent call last):
    ValueError: scan.nii.gz: is an input; medsr never overwrites its input
    """
    output = Path(output)
    target = output.resolve()
    for source in map(Path, inputs):
        source = source.resolve()
        if target == source or source in target.parents or target in source.parents:
            raise ValueError(f"{output}: is an input; medsr never overwrites its input")
    if (output.exists() or output.is_symlink()) and not force:
        raise ValueError(f"{output}: exists; pass --force to replace it")


def exit_on_sigterm() -> None:
    """Make SIGTERM raise ``SystemExit(143)`` in the main thread, so that ``finally`` blocks (the temporary files of
    :func:`atomic_output`) run when a process is terminated, as they do on Ctrl-C. For command-line programs."""
    signal.signal(signal.SIGTERM, _terminate)


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _remove_stale_temporaries(path: Path) -> None:
    """Remove temporaries beside ``path`` left by processes that no longer run (``kill -9``, power loss)."""
    for stale in path.parent.glob(f".*{TEMP_MARK}{glob.escape(path.name)}"):
        pid = stale.name[1:].split(".", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            _remove(stale)


def _remove(path: Path) -> None:
    """Delete a temporary file or folder if it is there (a symlink itself, never what it points to)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


_GZIP_CHUNK = 2**20  # bytes decompressed at a time when a .nii.gz is checked or read
_DEFLATE_MAX_RATIO = 1032  # the most bytes one compressed byte can give (zlib's limit): a bound free to check
# PNG/TIFF: 67 M pixels (an 8,192^2 frame), checked on the header before decoding; below Pillow's own warning (89 M)
MAX_IMAGE_PIXELS = 2**26


def _read_nifti(path: Path) -> Volume:
    image, shape, end = _load_nifti(path)
    size = math.prod(shape) * 4
    if size > MAX_VOLUME_BYTES:
        raise ValueError(
            f"{path}: {shape[0]} x {shape[1]} x {shape[2]} voxels need {size / 2**30:.3g} GiB as float32, over the "
            f"{MAX_VOLUME_BYTES / 2**30:g} GiB limit of a whole-scan read; read it slab by slab (open_volume)"
        )
    proxy = image.dataobj
    if _gzipped(path):  # decompressed whole, once, so gzip checks the CRC and length at the end
        data = _gunzip(path, end, keep=True)
        raw = np.frombuffer(data, proxy.dtype, math.prod(shape), proxy.offset).reshape(shape, order="F")
    else:
        try:
            raw = np.asarray(proxy.get_unscaled()).reshape(shape, order="F")
        except Exception as error:  # nibabel raises many types for corrupt files
            raise ValueError(f"{path}: cannot read as NIfTI ({type(error).__name__}: {error})") from error
    array = torch.from_numpy(_scaled(raw, proxy.slope, proxy.inter))[np.newaxis]
    return Volume(array, image.affine, Modality.OT, _nifti_meta(proxy))


def _nifti_meta(proxy: ArrayProxy) -> dict[str, Any]:
    """``meta['nifti']``: how the file stores its voxels (``dtype='input'`` of :func:`write_volume` writes them so)."""
    dtype = np.dtype(proxy.dtype).newbyteorder("=").name  # written back in the machine's byte order
    return {"nifti": {"dtype": dtype, "scl_slope": float(proxy.slope), "scl_inter": float(proxy.inter)}}


def _load_nifti(path: Path) -> tuple[Any, tuple[int, int, int], int]:
    """The nibabel image of a NIfTI file (header only), its (I, J, K), and the byte where its voxels end.

    Refuses, before any voxel is read: a voxel type that is not real numbers (complex, RGB), a shape that is not
    2D/3D or has no voxels, a geometry that does not place the voxels (:func:`_check_nifti_affine`), and a file
    shorter than its header says (a .nii.gz: as far as its size shows; :func:`_gunzip` checks the rest).
    """
    logger = logging.getLogger("nibabel.global")  # where nibabel logs the header problems it fixes
    quiet, logger.disabled = logger.disabled, True  # a zero pixdim becomes 1 mm: refused below instead
    try:
        with np.errstate(all="ignore"):
            image = nib.load(path)
            with Opener(path) as stream:
                stored = type(image.header).from_fileobj(stream, check=False)  # the header as the file holds it
    except Exception as error:  # nibabel raises many types for corrupt files
        if _gzipped(path):
            _gunzip(path, 0, keep=False)  # a gzip error, if that is what nibabel met, in its own words
        raise ValueError(f"{path}: cannot read as NIfTI ({type(error).__name__}: {error})") from error
    finally:
        logger.disabled = quiet
    dtype = image.get_data_dtype()
    if dtype.kind not in "biuf" or dtype.fields:
        raise ValueError(
            f"{path}: voxel type {image.header.get_value_label('datatype')} is not supported: medsr reads real "
            "numbers (convert complex data to magnitude, colour to grey first)"
        )
    shape = _nifti_spatial_shape(path, image.shape)
    _check_nifti_affine(path, stored, image.affine, len(image.shape))
    end = int(image.dataobj.offset) + math.prod(shape) * dtype.itemsize
    size = path.stat().st_size
    if _gzipped(path) and end > size * _DEFLATE_MAX_RATIO:
        raise ValueError(f"{path}: truncated: the header says {end:,} bytes, more than {size:,} gzip bytes can hold")
    if not _gzipped(path) and size < end:
        raise ValueError(f"{path}: truncated: {size} bytes, the header says {end}")
    return image, shape, end


def _check_nifti_affine(path: Path, stored: Any, affine: np.ndarray, ndim: int) -> None:
    """Refuse a voxel-to-world affine that cannot place the voxels: NaN or infinite, or singular (a zero voxel size).

    nibabel's affine is the sform if sform_code > 0, else the qform (a rotation and pixdim) if qform_code > 0, else
    pixdim alone. It sets a zero pixdim to 1 mm, a made-up size, so pixdim is checked as ``stored`` in the file.
    """
    sform_code, qform_code = int(stored["sform_code"]), int(stored["qform_code"])
    if sform_code:
        source = f"sform (sform_code {sform_code})"
    else:
        source = f"qform (qform_code {qform_code})" if qform_code else "pixdim (qform_code and sform_code are 0)"
        sizes = [float(v) for v in stored["pixdim"][1 : 1 + min(ndim, 3)]]
        bad = {axis: v for axis, v in zip("ijk", sizes, strict=False) if not math.isfinite(v) or v == 0}
        if bad:
            problem = ", ".join(f"{'zero' if v == 0 else v} along {axis}" for axis, v in bad.items())
            raise ValueError(
                f"{path}: voxel size (pixdim) {sizes} mm is {problem}, in the {source}; the voxels cannot be "
                "placed in space"
            )
    if not np.isfinite(affine).all():
        raise ValueError(f"{path}: the {source} holds NaN or infinite values; the voxels cannot be placed in space")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if (spacing == 0).any() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:  # Volume's own rule
        zero = [axis for axis, s in zip("ijk", spacing, strict=True) if s == 0]
        detail = f"zero voxel size along {', '.join(zero)}" if zero else "its voxel axes do not span 3D space"
        raise ValueError(f"{path}: the {source} is singular ({detail}); the voxels cannot be placed in space")


def _gzipped(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


def _gunzip(path: Path, size: int, *, keep: bool) -> bytearray | None:
    """Decompress all of a .nii.gz in chunks, so that gzip checks its CRC and length (nibabel stops where the voxels
    end and never sees a corrupt end); return its first ``size`` bytes (header and voxels) if ``keep``.

    Memory holds at most what the file holds, so a header declaring more than that costs nothing.
    """
    kept = bytearray() if keep else None
    total = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(_GZIP_CHUNK):
                if kept is not None and total < size:
                    kept += chunk[: size - total]
                total += len(chunk)
    except (OSError, EOFError, zlib.error) as error:  # BadGzipFile (a CRC or length mismatch) is an OSError
        raise ValueError(f"{path}: cannot read as NIfTI: corrupt or truncated gzip data ({error})") from None
    if total < size:
        raise ValueError(f"{path}: truncated: {total} bytes decompressed, the header says {size}")
    return kept


def _scaled(raw: np.ndarray, slope: Any, inter: Any) -> np.ndarray:
    """Stored voxels in physical units (scl_slope, scl_inter), float32, as ``np.asarray(proxy, np.float32)``."""
    slope, inter = np.asanyarray(slope), np.asanyarray(inter)
    slope = slope.astype(np.float32) if np.can_cast(slope, np.float32) else slope
    inter = inter.astype(np.float32) if np.can_cast(inter, np.float32) else inter
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow gives inf, refused as such by _check_finite
        scaled = apply_read_scaling(raw, slope, inter)
        return np.asarray(scaled.astype(np.promote_types(scaled.dtype, np.float32), copy=False), dtype=np.float32)


def _nifti_spatial_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(I, J, K) of a NIfTI image of ``shape``: a 2D image has K == 1, a 4D one with one frame is 3D."""
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) == 2:
        shape = (*shape, 1)
    if len(shape) != 3:
        raise ValueError(
            f"{path}: expected a 2D or 3D image, got {len(shape)}D shape {shape}; split it into 3D volumes first"
        )
    if min(shape) < 1:
        raise ValueError(f"{path}: no voxels: shape {shape}")
    return tuple(int(n) for n in shape)


def _nifti_header(
    affine: np.ndarray,
    spatial_shape: tuple[int, int, int],
    *,
    meta: Mapping[str, Any] | None = None,
    dtype: str = "float32",
    description: str = "",
    display_range: tuple[float, float] | None = None,
) -> nib.Nifti1Header:
    """Header of a NIfTI-1 image in mm with ``affine`` as both sform and qform (when it can hold it); the voxel
    type and scaling, descrip and cal_min/cal_max as :func:`write_volume` describes them."""
    source = (meta or {}).get("nifti") if check_nifti_dtype(dtype) == "input" else None
    header = nib.Nifti1Header()
    header.set_data_shape(spatial_shape)
    if source is not None and np.dtype(source["dtype"]) in _INTEGER_TYPES:
        header.set_data_dtype(source["dtype"])
        header.set_slope_inter(source["scl_slope"], source["scl_inter"])
    else:
        header.set_data_dtype(np.float32)
    header.set_xyzt_units("mm")
    header["descrip"] = description.encode()[:80].decode(errors="ignore").encode()  # whole UTF-8 characters
    if display_range is not None:
        header["cal_min"], header["cal_max"] = display_range
    columns = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    orthogonal = np.allclose(columns.T @ columns, np.eye(3), atol=1e-6)
    # The qform cannot hold a shear (e.g. a gantry-tilted CT): then only the sform carries the geometry.
    header.set_qform(affine, code=1 if orthogonal else 0)  # 1 = scanner-based coordinates
    header.set_sform(affine, code=1)
    return header


def check_nifti_dtype(dtype: str) -> str:
    """``dtype`` if it is one of :data:`NIFTI_DTYPES` (see :func:`write_volume`), else a ValueError naming it.

    >>> check_nifti_dtype("int16")
    Traceback (most recent call last):
    ValueError: dtype must be one of input, float32; got 'int16'
    """
    if dtype not in NIFTI_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(NIFTI_DTYPES)}; got {dtype!r}")
    return dtype


def _stored(values: np.ndarray, header: nib.Nifti1Header, path: Path) -> np.ndarray:
    """Values in physical units as ``header`` stores them: float32, or integers round((x - scl_inter) / scl_slope)
    clipped to the type's range (NaN or infinite values cannot be stored as integers: a ValueError)."""
    dtype = header.get_data_dtype()
    if dtype.kind == "f":
        return np.asarray(values, dtype=np.float32)
    _check_finite(values, str(path))
    slope, inter = header.get_slope_inter()
    info = np.iinfo(dtype)
    return np.clip(np.rint((np.asarray(values, dtype=np.float64) - inter) / slope), info.min, info.max).astype(dtype)


@contextmanager
def _nifti_writer(path: Path, header: nib.Nifti1Header) -> Iterator[Callable[[np.ndarray], None]]:
    """Write a NIfTI-1 file with ``header`` (gzip-compressed for .nii.gz, as nibabel compresses) slab by slab along k.

    Yields ``write(slab)`` for float32 slabs (I, J, n) in physical units, in k order, stored as the header says
    (:func:`_stored`). The header goes first; the voxels follow in Fortran order (i fastest), in which each k-slice
    is one contiguous run, so slabs are simply appended. A float32 .nii file gets the bytes ``nib.save`` writes.

    Raises:
        ValueError: a slab of the wrong shape, or fewer than K slices when the block completes.
    """
    spatial_shape, written = header.get_data_shape(), 0
    with Opener(path, "wb") as stream:

        def write(slab: np.ndarray) -> None:
            nonlocal written
            if slab.ndim != 3 or slab.shape[:2] != spatial_shape[:2] or written + slab.shape[2] > spatial_shape[2]:
                raise ValueError(f"{path}: slab of shape {slab.shape} after {written} slices of {spatial_shape}")
            stream.write(_stored(slab, header, path).tobytes(order="F"))
            written += slab.shape[2]

        header.write_to(stream)  # 348 bytes + 4 for "no extensions": voxels at 352
        yield write
    if written != spatial_shape[2]:
        raise ValueError(f"{path}: got {written} of {spatial_shape[2]} slices")


def _open_nifti(path: Path) -> VolumeFile:
    image, shape, end = _load_nifti(path)
    if _gzipped(path):  # up front, once: a corrupt or truncated file fails before anything is computed or written
        _gunzip(path, end, keep=False)
    proxy = image.dataobj
    # A proxy of the (I, J, K) shape that keeps its file (for .nii.gz: its gzip stream) open between slices; read in
    # k order, a .nii.gz is then decompressed once, where a new stream per slice costs O(K^2).
    proxy = ArrayProxy(
        path, (shape, proxy.dtype, proxy.offset, proxy.slope, proxy.inter), mmap=False, keep_file_open=True
    )

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

    return VolumeFile(path, shape, image.affine, Modality.OT, _nifti_meta(proxy), read_slab)


def _open_dicom(path: Path) -> VolumeFile:
    from medsr.dicom import open_series

    series = open_series(path)
    if series.modality is Modality.US:
        raise ValueError(f"{path}: ultrasound DICOM is a 2D frame cropped to its image region; use read_volume")
    return _series_file(series)


def _series_file(series) -> VolumeFile:
    """The :class:`VolumeFile` of a DICOM series whose headers ``dicom.open_series`` read."""
    from medsr.dicom import read_slice

    def read_slab(start: int, stop: int) -> np.ndarray:
        slices = [read_slice(file).astype(np.float32) for file in series.files[start:stop]]
        for k, values in enumerate(slices, start):
            _check_finite(values, f"{series.files[k]} (slice {k})")
        return np.stack(slices, axis=-1)

    return VolumeFile(series.path, series.spatial_shape, series.affine, series.modality, series.meta, read_slab)


def _read_image(path: Path) -> Volume:
    """A PNG/TIFF frame as (1, columns, rows, 1): i runs along columns, j along rows, as for a DICOM slice.

    These formats carry no patient geometry: 1 mm pixels, placed like an unrotated DICOM image (LPS identity).
    """
    from PIL import Image

    with _pillow_errors(path):
        image = Image.open(path)  # reads the header only
    with image:
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ValueError(
                f"{path}: {image.width} x {image.height} = {image.width * image.height:,} pixels, over the limit of "
                f"{MAX_IMAGE_PIXELS:,} (a decompression bomb?)"
            )
        with _pillow_errors(path):
            frames = getattr(image, "n_frames", 1)
        if frames > 1:
            raise ValueError(f"{path}: holds {frames} frames; medsr reads single-frame images only")
        if image.mode not in ("L", "I;16", "I;16B", "I", "F"):
            warnings.warn(f"{path}: {image.mode} image converted to grey (luminance)", stacklevel=3)
        with _pillow_errors(path):
            image.load()
            pixels = np.asarray(image if image.mode in ("L", "I;16", "I;16B", "I", "F") else image.convert("L"))
    if pixels.ndim != 2:
        raise ValueError(f"{path}: expected a 2D grey image, got shape {pixels.shape}")
    array = torch.from_numpy(pixels.T.astype(np.float32).copy())[None, :, :, None]
    from medsr.dicom import lps_to_ras

    # No patient frame: placed like an unrotated DICOM image (i towards L, j towards P; row 0 shows on top).
    return Volume(array, lps_to_ras(np.eye(4)), Modality.OT, meta={"pixel_dtype": str(pixels.dtype)})


@contextmanager
def _pillow_errors(path: Path) -> Iterator[None]:
    """Pillow's errors for a corrupt, truncated or too large file (many types) as one ValueError naming ``path``."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(f"{path}: too many pixels to read safely ({error})") from None
    except Exception as error:
        raise ValueError(f"{path}: cannot read as an image ({type(error).__name__}: {error})") from error


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
