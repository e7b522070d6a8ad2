from __future__ import annotations

import re
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from medsr.io import read_volume, write_volume
from medsr.volume import Modality, Volume

ZOOMS = (0.5, 0.8, 2.5)  # mm, anisotropic


def oblique_affine() -> np.ndarray:
    """30 degrees about the S axis, anisotropic voxels, an offset origin."""
    angle = np.deg2rad(30.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(ZOOMS)
    affine[:3, 3] = (-40.25, 12.5, 7.0)
    return affine


@pytest.fixture
def volume() -> Volume:
    rng = np.random.default_rng(0)
    array = torch.from_numpy(rng.standard_normal((1, 7, 6, 5)).astype(np.float32))
    return Volume(array, oblique_affine())


def grey_volume(pixels: np.ndarray, dtype: str) -> Volume:
    """A (1, columns, rows, 1) volume as read from an image with rows x columns ``pixels``."""
    array = torch.from_numpy(pixels.T.astype(np.float32).copy())[None, :, :, None]
    return Volume(array, np.eye(4), meta={"pixel_dtype": dtype})


def save_nifti(array: np.ndarray, path, affine: np.ndarray | None = None) -> None:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)


def names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# NIfTI


@pytest.mark.parametrize("name", ["scan.nii.gz", "scan.nii"])
def test_nifti_round_trip(tmp_path, volume, name):
    path = tmp_path / name
    write_volume(volume, path)
    read = read_volume(path)
    assert torch.equal(read.array, volume.array)
    np.testing.assert_allclose(read.affine, volume.affine, atol=1e-6)
    assert read.modality == Modality.OT
    header = nib.load(path).header
    assert int(header["qform_code"]) == 1
    assert int(header["sform_code"]) == 1
    np.testing.assert_allclose(header.get_zooms(), ZOOMS, rtol=1e-6)
    np.testing.assert_allclose(header.get_qform(), volume.affine, atol=1e-5)


def test_nifti_2d_reads_as_single_slice(tmp_path):
    path = tmp_path / "slice.nii.gz"
    pixels = np.arange(42, dtype=np.float32).reshape(7, 6)
    save_nifti(pixels, path)
    read = read_volume(path)
    assert read.array.shape == (1, 7, 6, 1)
    assert torch.equal(read.array[0, :, :, 0], torch.from_numpy(pixels))


def test_nifti_4d_with_one_frame_reads_as_3d(tmp_path):
    path = tmp_path / "one_frame.nii.gz"
    save_nifti(np.ones((4, 3, 2, 1), dtype=np.float32), path)
    assert read_volume(path).array.shape == (1, 4, 3, 2)


def test_nifti_4d_series_raises(tmp_path):
    path = tmp_path / "series.nii.gz"
    save_nifti(np.zeros((4, 3, 2, 3), dtype=np.float32), path)
    with pytest.raises(ValueError, match=r"4D") as info:
        read_volume(path)
    assert str(path) in str(info.value)


def test_nifti_nan_raises_naming_file(tmp_path):
    path = tmp_path / "nan.nii.gz"
    array = np.zeros((4, 3, 2), dtype=np.float32)
    array[1, 2, 0] = np.nan
    save_nifti(array, path)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: 1 voxels are NaN"):
        read_volume(path)


def test_nifti_scaling_is_applied(tmp_path):
    path = tmp_path / "scaled.nii"
    raw = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    save_nifti(raw, path)
    # nibabel resets scl_slope/scl_inter when saving an array, so set them in the written header.
    with open(path, "r+b") as file:
        header = nib.Nifti1Header.from_fileobj(file)
        header["scl_slope"] = 2.0
        header["scl_inter"] = -10.0
        file.seek(0)
        header.write_to(file)
    read = read_volume(path)
    assert read.array.dtype == torch.float32
    assert torch.equal(read.array[0], torch.from_numpy(2.0 * raw.astype(np.float32) - 10.0))


def test_truncated_nifti_raises_naming_file(tmp_path, volume):
    path = tmp_path / "cut.nii.gz"
    write_volume(volume, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: cannot read as NIfTI"):
        read_volume(path)


def test_garbage_nifti_raises_naming_file(tmp_path):
    path = tmp_path / "garbage.nii"
    path.write_bytes(b"not a nifti file at all" * 20)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: cannot read as NIfTI"):
        read_volume(path)


def test_missing_file_raises(tmp_path):
    path = tmp_path / "missing.nii.gz"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        read_volume(path)


def test_unknown_suffix_raises(tmp_path):
    path = tmp_path / "scan.xyz"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match=r"unknown file type") as info:
        read_volume(path)
    assert str(path) in str(info.value)


def test_modality_override(tmp_path, volume):
    path = tmp_path / "ct.nii.gz"
    write_volume(volume, path)
    assert read_volume(path).modality == Modality.OT
    assert read_volume(path, modality="CT").modality == Modality.CT
    assert read_volume(path, modality=Modality.MR).modality == Modality.MR


# PNG / TIFF


@pytest.mark.parametrize(
    ("dtype", "mode", "high"),
    [("uint8", "L", 255), ("uint16", "I;16", 65535)],
)
def test_grey_png_layout(tmp_path, dtype, mode, high):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, high, size=(5, 7), endpoint=True).astype(dtype)  # 5 rows, 7 columns
    path = tmp_path / "frame.png"
    Image.fromarray(pixels).save(path)
    with Image.open(path) as image:
        assert image.mode == mode
    read = read_volume(path)
    assert read.array.shape == (1, 7, 5, 1)  # (1, columns, rows, 1)
    for r, c in [(0, 0), (4, 0), (0, 6), (3, 5)]:
        assert read.array[0, c, r, 0].item() == pixels[r, c]
    assert read.meta["pixel_dtype"] == dtype
    assert read.modality == Modality.OT


@pytest.mark.parametrize("name", ["frame.png", "frame.tif"])
def test_uint8_image_round_trip(tmp_path, name):
    pixels = np.random.default_rng(2).integers(0, 256, size=(5, 7), dtype=np.uint8)
    source = tmp_path / f"source_{name}"
    Image.fromarray(pixels).save(source)
    target = tmp_path / name
    write_volume(read_volume(source), target)
    with Image.open(target) as image:
        assert image.mode == "L"
        np.testing.assert_array_equal(np.asarray(image), pixels)


def test_uint16_png_round_trip(tmp_path):
    pixels = np.random.default_rng(3).integers(0, 65536, size=(5, 7), dtype=np.uint16)
    source, target = tmp_path / "source.png", tmp_path / "target.png"
    Image.fromarray(pixels).save(source)
    write_volume(read_volume(source), target)
    with Image.open(target) as image:
        np.testing.assert_array_equal(np.asarray(image), pixels)


def test_png_write_rounds_and_clips(tmp_path):
    path = tmp_path / "clipped.png"
    values = np.array([[-5.0, 0.4, 0.6, 254.6, 300.0]], dtype=np.float32)  # 1 row, 5 columns
    write_volume(grey_volume(values, "uint8"), path)
    with Image.open(path) as image:
        np.testing.assert_array_equal(np.asarray(image), [[0, 0, 1, 255, 255]])


def test_rgb_png_warns_and_gives_luminance(tmp_path):
    rgb = np.random.default_rng(4).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    path = tmp_path / "colour.png"
    Image.fromarray(rgb, mode="RGB").save(path)
    with pytest.warns(UserWarning, match=r"RGB image converted to grey"):
        read = read_volume(path)
    assert read.array.shape == (1, 7, 5, 1)
    # ITU-R 601-2 luma, as Pillow's convert("L") documents it.
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(read.array[0, :, :, 0].numpy().T, luma, atol=1.0)


def test_png_write_3d_raises(tmp_path, volume):
    path = tmp_path / "volume.png"
    with pytest.raises(ValueError, match=r"PNG/TIFF hold 2D images"):
        write_volume(volume, path)
    assert names(tmp_path) == []


def test_garbage_png_raises_naming_file(tmp_path):
    path = tmp_path / "garbage.png"
    path.write_bytes(b"\x89PNG not really" * 10)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: cannot read as an image"):
        read_volume(path)


# Atomic writes and write errors


@pytest.mark.parametrize("name", ["out.nii.gz", "out.png"])
def test_write_leaves_only_target(tmp_path, name):
    volume = grey_volume(np.arange(35, dtype=np.float32).reshape(5, 7), "uint8")
    write_volume(volume, tmp_path / name)
    assert names(tmp_path) == [name]
    write_volume(volume, tmp_path / name)  # overwriting is atomic too
    assert names(tmp_path) == [name]


def test_failed_write_leaves_nothing(tmp_path, volume, monkeypatch):
    def broken_save(image, path):
        with open(path, "wb") as file:
            file.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OSError, match=r"disk full"):
        write_volume(volume, tmp_path / "out.nii.gz")
    assert names(tmp_path) == []


def test_failed_write_keeps_existing_target(tmp_path, volume, monkeypatch):
    path = tmp_path / "out.nii.gz"
    write_volume(volume, path)
    before = path.read_bytes()

    def broken_save(image, path):
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OSError):
        write_volume(volume.replace(array=volume.array + 1), path)
    assert names(tmp_path) == ["out.nii.gz"]
    assert path.read_bytes() == before


def test_write_into_missing_folder_raises(tmp_path, volume):
    path = tmp_path / "nowhere" / "out.nii.gz"
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        write_volume(volume, path)
    assert names(tmp_path) == []


def test_write_dicom_raises(tmp_path, volume):
    with pytest.raises(ValueError, match=r"DICOM"):
        write_volume(volume, tmp_path / "out.dcm")
    assert names(tmp_path) == []


def test_write_two_channels_raises(tmp_path, volume):
    two = volume.replace(array=torch.cat([volume.array, volume.array]))
    with pytest.raises(ValueError, match=r"single-channel.*got 2 channels"):
        write_volume(two, tmp_path / "out.nii.gz")
    assert names(tmp_path) == []


# DICOM dispatch


@pytest.fixture
def ct_file():
    return get_testdata_file("CT_small.dcm")


def test_dicom_folder_dispatch(tmp_path, ct_file):
    folder = tmp_path / "series"
    folder.mkdir()
    shutil.copy(ct_file, folder / "slice0001.dcm")
    read = read_volume(folder)
    assert read.modality == Modality.CT
    assert read.spatial_shape == (128, 128, 1)


def test_dicom_file_dispatch(tmp_path, ct_file):
    path = tmp_path / "ct.dcm"
    shutil.copy(ct_file, path)
    read = read_volume(path)
    assert read.modality == Modality.CT
    assert read.spatial_shape == (128, 128, 1)
    assert read_volume(path, modality="OT").modality == Modality.OT


# Regressions of bugs found in review


def test_mixed_case_nifti_suffix_is_rejected_before_writing(tmp_path, volume):
    """nibabel lower-cases mixed-case suffixes and would miss the file: refuse clearly instead."""
    path = tmp_path / "scan.Nii.gz"
    with pytest.raises(ValueError, match="mixed-case NIfTI suffix"):
        write_volume(volume, path)
    assert names(tmp_path) == []


def test_multipage_tiff_raises(tmp_path):
    path = tmp_path / "stack.tif"
    frames = [Image.fromarray(np.full((5, 7), i, dtype=np.uint8)) for i in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        read_volume(path)


def test_float_volume_to_png_error_names_file(tmp_path):
    path = tmp_path / "out.png"
    with pytest.raises(ValueError, match=re.escape(str(path))):
        write_volume(grey_volume(np.zeros((5, 7), dtype=np.float32), "float32"), path)
