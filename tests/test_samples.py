from __future__ import annotations

import io
import plistlib
import shutil
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsr import samples
from medsr.volume import Modality


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty sample cache, and no system-wide packages, so every Debian sample takes the cache route."""
    monkeypatch.setenv("MEDSR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(samples, "_SYSTEM_ROOT", tmp_path / "no-system-root")
    return tmp_path / "cache"


def _write_inv3(path: Path, hu: np.ndarray, spacing_xyz: tuple[float, float, float]) -> None:
    """A minimal InVesalius project laid out as Cranium.inv3 is: tmpXXXX/main.plist + tmpXXXX/matrix.dat."""
    main = {
        "format_version": 1,
        "modality": "CT",
        "name": "synthetic",
        "orientation": 1,
        "matrix": {"dtype": "int16", "filename": "matrix.dat", "shape": list(hu.shape)},  # (z, y, x)
        "spacing": [float(s) for s in spacing_xyz],
        "scalar_range": [int(hu.min()), int(hu.max())],
    }
    with tarfile.open(path, "w:gz") as archive:
        for name, data in [("main.plist", plistlib.dumps(main)), ("matrix.dat", hu.astype("<i2").tobytes())]:
            info = tarfile.TarInfo(f"tmpabcdef/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_read_inv3_shape_hu_and_affine(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    hu = rng.integers(-1024, 3000, size=(3, 5, 4)).astype(np.int16)  # (z, y, x)
    path = tmp_path / "tiny.inv3"
    _write_inv3(path, hu, (0.5, 0.75, 2.0))

    volume = samples._read_inv3(path)

    assert volume.modality == Modality.CT
    assert volume.spatial_shape == (4, 5, 3)  # (x, y, z)
    assert volume.array.dtype.is_floating_point
    np.testing.assert_array_equal(volume.array[0].numpy(), hu.transpose(2, 1, 0).astype(np.float32))
    assert volume.spacing == pytest.approx((0.5, 0.75, 2.0))
    assert volume.orientation == ("L", "A", "S")
    np.testing.assert_allclose(np.diag(volume.affine), [-0.5, 0.75, 2.0, 1.0])
    centre = volume.affine @ np.array([1.5, 2.0, 1.0, 1.0])  # middle voxel of (4, 5, 3)
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-12)


def test_read_inv3_rejects_wrong_size(tmp_path: Path) -> None:
    path = tmp_path / "bad.inv3"
    with tarfile.open(path, "w:gz") as archive:
        main = plistlib.dumps({"matrix": {"dtype": "int16", "filename": "matrix.dat", "shape": [2, 2, 2]}})
        for name, data in [("main.plist", main), ("matrix.dat", b"\0" * 10)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="do not fit shape"):
        samples._read_inv3(path)


@pytest.mark.parametrize("where", ["cache", "system"])
def test_cranium_converted_from_unpacked_package(cache: Path, where: str) -> None:
    sample = {s.name: s for s in samples.list_samples()}["cranium_ct"]
    root = cache / "debs" / sample.source if where == "cache" else samples._SYSTEM_ROOT
    inv3 = root / sample.member
    inv3.parent.mkdir(parents=True)
    hu = np.arange(-1024, -1024 + 2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    _write_inv3(inv3, hu, (0.9, 0.9, 1.5))
    assert not samples.is_installed("cranium_ct")

    path = samples.sample_path("cranium_ct")

    assert path == cache / "cranium_ct.nii.gz"
    assert samples.is_installed("cranium_ct")
    image = nib.load(path)
    assert image.shape == (4, 3, 2)
    assert nib.aff2axcodes(image.affine) == ("L", "A", "S")
    np.testing.assert_allclose(image.header.get_zooms(), (0.9, 0.9, 1.5), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(image.dataobj), hu.transpose(2, 1, 0))
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no temporary files left


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get (Debian/Ubuntu)")
def test_colin27_downloaded_into_cache(cache: Path) -> None:
    path = samples.sample_path("colin27")

    assert path.is_relative_to(cache / "debs" / "mricron-data")
    image = nib.load(path)
    assert image.shape == (181, 217, 181)
    np.testing.assert_allclose(image.header.get_zooms(), (1.0, 1.0, 1.0))
    assert samples.is_installed("colin27_brain")  # same package, already unpacked
    assert sorted(p.name for p in (cache / "debs").iterdir()) == ["mricron-data"]  # no temporary folders left


def test_failed_unpack_leaves_nothing(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run(command: list[str], package: str, *, cwd: Path | None = None) -> None:
        if command[:2] == ["apt-get", "download"]:
            (cwd / f"{package}_1.0_all.deb").write_bytes(b"not really a deb")
        elif command[:2] == ["dpkg", "-x"]:
            Path(command[3], "usr").mkdir(parents=True)  # half-unpacked, then interrupted
            raise RuntimeError("`dpkg -x` failed")

    monkeypatch.setattr(samples, "_run", fake_run)
    with pytest.raises(RuntimeError, match="dpkg"):
        samples.sample_path("colin27")
    assert list((cache / "debs").iterdir()) == []
    assert not samples.is_installed("colin27")


@pytest.mark.parametrize("root", [True, False])
def test_unknown_package_updates_lists_only_as_root(cache: Path, monkeypatch: pytest.MonkeyPatch, root: bool) -> None:
    calls = []

    def fake_run(command: list[str], package: str, *, cwd: Path | None = None) -> None:
        calls.append(command[:2])
        if command[:2] == ["apt-get", "download"] and ["apt-get", "update"] not in calls:
            raise RuntimeError(f"`apt-get download {package}` failed (exit 100): E: Unable to locate package {package}")
        if command[:2] == ["apt-get", "download"]:
            (cwd / f"{package}_1.0_all.deb").write_bytes(b"")
        if command[:2] == ["dpkg", "-x"]:
            member = Path(command[3], samples._SAMPLES["colin27"].member)
            member.parent.mkdir(parents=True)
            member.write_bytes(b"")

    monkeypatch.setattr(samples, "_run", fake_run)
    monkeypatch.setattr(samples.os, "geteuid", lambda: 0 if root else 1000)
    if root:
        path = samples.sample_path("colin27")
        assert calls == [["apt-get", "download"], ["apt-get", "update"], ["apt-get", "download"], ["dpkg", "-x"]]
        assert path == cache / "debs" / "mricron-data" / samples._SAMPLES["colin27"].member
    else:
        with pytest.raises(RuntimeError, match="sudo apt-get update"):
            samples.sample_path("colin27")
        assert calls == [["apt-get", "download"]]


def test_unknown_name_lists_known_names(cache: Path) -> None:
    with pytest.raises(ValueError, match="unknown sample 'colin28'.*colin27.*cranium_ct"):
        samples.sample_path("colin28")
    with pytest.raises(ValueError, match="unknown sample"):
        samples.install_samples(["colin27", "nope"])
    assert not (cache / "debs").exists()  # nothing downloaded before the bad name was caught


def test_not_installed_without_install(cache: Path) -> None:
    with pytest.raises(FileNotFoundError, match="medsr samples"):
        samples.sample_path("colin27", install=False)
    with pytest.raises(FileNotFoundError, match="medsr samples"):
        samples.sample_path("cranium_ct", install=False)
    assert not samples.is_installed("colin27")


def test_pydicom_samples_need_no_install(cache: Path) -> None:
    import pydicom

    for sample in samples.list_samples():
        if sample.is_debian:
            continue
        assert samples.is_installed(sample.name)
        dataset = pydicom.dcmread(samples.sample_path(sample.name, install=False), stop_before_pixels=True)
        assert dataset.Modality == sample.modality.value
    assert not cache.exists()


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSR_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert samples.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("MEDSR_CACHE")
    assert samples.cache_dir() == tmp_path / "xdg" / "medsr"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert samples.cache_dir() == tmp_path / "home" / ".cache" / "medsr"
