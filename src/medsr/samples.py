"""Real sample scans (see shared/DATA.md), installed on demand into a user cache without root.

Three kinds of source:

* Debian packages (``mricron-data``, ``invesalius-examples``): used in place when installed system-wide, else
  fetched with ``apt-get download`` and unpacked with ``dpkg -x`` into ``<cache>/debs/<package>/``. The data stay
  in the user cache and are never copied into the repository (``invesalius-examples`` is GPL-2).
* ``cranium_ct`` is converted once from InVesalius' ``.inv3`` project format into ``<cache>/cranium_ct.nii.gz``.
* pydicom-data files, found offline with ``pydicom.data.get_testdata_file``; nothing to install.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import plistlib
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from medsr.io import write_volume
from medsr.volume import Modality, Volume

logger = logging.getLogger(__name__)

# Where system-wide packages put their files; tests point it elsewhere to force the cache route.
_SYSTEM_ROOT = Path("/")
_PYDICOM_DATA = "pydicom-data"


@dataclasses.dataclass(frozen=True)
class Sample:
    """One real scan that medsr can install.

    Args:
        name: Key for ``sample_path`` (e.g. ``"colin27"``).
        modality: Scanner that made it.
        description: Anatomy, size and spacing, in a line.
        licence: Licence of the data (SPDX identifier).
        source: Debian package name, or ``"pydicom-data"``.
        member: Path of the file inside the Debian package (relative to ``/``), or the pydicom-data file name.
    """

    name: str
    modality: Modality
    description: str
    licence: str
    source: str
    member: str

    @property
    def is_debian(self) -> bool:
        """Whether the file comes from a Debian package (rather than from pydicom-data)."""
        return self.source != _PYDICOM_DATA


_COLIN = "usr/share/mricron/templates"
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
    ]
}

# Samples stored in a format medsr does not read, converted once into this cache file name.
_CONVERTED = {"cranium_ct": "cranium_ct.nii.gz"}


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
        FileNotFoundError: Missing and ``install=False``, or a pydicom-data file that is not there.
        RuntimeError: The Debian package could not be downloaded or unpacked.
    """
    sample = _get(name)
    path = _find(sample)
    if path is not None:
        return path
    if not sample.is_debian:
        raise FileNotFoundError(
            f"sample {name!r}: {sample.member} not found in pydicom-data; install it with `pip install pydicom-data`"
        )
    if not install:
        raise FileNotFoundError(
            f"sample {name!r} is not installed (looked for {_SYSTEM_ROOT / sample.member} and under "
            f"{cache_dir()}); run `medsr samples` to install it"
        )
    source = _find_debian_file(sample) or _install_debian_file(sample)
    if name not in _CONVERTED:
        return source
    target = cache_dir() / _CONVERTED[name]
    logger.info("converting %s to %s", source, target)
    target.parent.mkdir(parents=True, exist_ok=True)  # absent when the package was installed system-wide
    write_volume(_read_inv3(source), target)
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
    if not sample.is_debian:
        from pydicom.data import get_testdata_file

        found = get_testdata_file(sample.member, download=False)  # offline: pydicom-data's store only
        return Path(found) if found else None
    if sample.name in _CONVERTED:
        path = cache_dir() / _CONVERTED[sample.name]
        return path if path.is_file() else None
    return _find_debian_file(sample)


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
