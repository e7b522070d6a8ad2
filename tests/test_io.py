from __future__ import annotations

import json
import os
import re
import shutil
import signal

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from medsr.io import (
    atomic_output,
    exit_on_sigterm,
    open_volume,
    read_volume,
    sidecar_output,
    sidecar_path,
    write_bytes,
    write_volume,
)
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


def scaled_nifti(path, raw: np.ndarray, slope: float, inter: float, endianness: str = "<") -> None:
    """``raw`` stored as it is, with scl_slope/scl_inter, in a header of the given byte order."""
    image = nib.Nifti1Image(raw, np.diag([0.9, 0.9, 3.0, 1.0]), nib.Nifti1Header(endianness=endianness))
    image.set_data_dtype(raw.dtype)
    image.header.set_slope_inter(slope, inter)
    nib.save(image, path)


@pytest.mark.parametrize("endianness", ["<", ">"])
def test_integer_nifti_is_written_back_in_its_type_and_scaling(tmp_path, endianness):
    """A CT stored as int16 HU + 1024 (scl_inter -1024): read, then written with dtype='input', the file holds the
    same integers, scaling and byte order of this machine; read whole or lazily, the storage is in meta."""
    raw = np.random.default_rng(4).integers(0, 3000, size=(7, 6, 5)).astype(f"{endianness}i2")
    scaled_nifti(tmp_path / "ct.nii.gz", raw, 1.0, -1024.0, endianness)
    storage = {"nifti": {"dtype": "int16", "scl_slope": 1.0, "scl_inter": -1024.0}}
    assert read_volume(tmp_path / "ct.nii.gz").meta == storage == open_volume(tmp_path / "ct.nii.gz").meta
    volume = read_volume(tmp_path / "ct.nii.gz")
    write_volume(volume, tmp_path / "int.nii.gz", dtype="input")
    write_volume(volume, tmp_path / "float.nii.gz")
    stored, floats = nib.load(tmp_path / "int.nii.gz"), nib.load(tmp_path / "float.nii.gz")
    assert stored.get_data_dtype() == np.dtype("=i2") and (stored.dataobj.slope, stored.dataobj.inter) == (1, -1024)
    np.testing.assert_array_equal(stored.dataobj.get_unscaled(), raw)
    assert floats.get_data_dtype() == np.float32
    assert torch.equal(read_volume(tmp_path / "int.nii.gz").array, volume.array)


def test_integer_storage_rounds_and_clips_what_the_type_cannot_hold(tmp_path):
    """raw = round((x - scl_inter) / scl_slope), clipped to the type: uint8 and int16 with a slope of 0.5 HU."""
    values = np.array([-3.2, 0.4, 0.6, 254.6, 300.0, -40000.0, 20000.0], dtype=np.float32)
    for dtype, slope, inter in (("uint8", 1.0, 0.0), ("int16", 0.5, -1024.0)):
        meta = {"nifti": {"dtype": dtype, "scl_slope": slope, "scl_inter": inter}}
        volume = Volume(torch.from_numpy(values)[None, :, None, None], np.eye(4), meta=meta)
        write_volume(volume, tmp_path / f"{dtype}.nii", dtype="input")
        info = np.iinfo(dtype)
        expected = np.clip(np.rint((values.astype(np.float64) - inter) / slope), info.min, info.max)
        np.testing.assert_array_equal(nib.load(tmp_path / f"{dtype}.nii").dataobj.get_unscaled()[:, 0, 0], expected)
    nan = volume.replace(array=torch.full((1, 2, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="NaN or infinite"):
        write_volume(nan, tmp_path / "nan.nii.gz", dtype="input")
    assert names(tmp_path) == ["int16.nii", "uint8.nii"]


def test_uint8_nifti_stays_uint8(tmp_path):
    """Colin27 is stored as uint8: a crop read and written back with dtype='input' is the same bytes of voxels."""
    from medsr.samples import sample_path

    nib.save(nib.load(sample_path("colin27")).slicer[60:100, 80:120, 90:93], tmp_path / "colin.nii.gz")
    write_volume(read_volume(tmp_path / "colin.nii.gz"), tmp_path / "out.nii.gz", dtype="input")
    source, written = nib.load(tmp_path / "colin.nii.gz"), nib.load(tmp_path / "out.nii.gz")
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(written.dataobj.get_unscaled(), source.dataobj.get_unscaled())


def test_float32_nifti_is_the_file_nibabel_writes(tmp_path, volume):
    """nibabel saving what it loads from a medsr float32 file gives that file byte for byte; SimpleITK reads an
    int16 file with scaling as medsr does."""
    import SimpleITK as sitk

    write_volume(volume, tmp_path / "medsr.nii", description="test", display_range=(-2.0, 2.0))
    nib.save(nib.load(tmp_path / "medsr.nii"), tmp_path / "nibabel.nii")
    assert (tmp_path / "medsr.nii").read_bytes() == (tmp_path / "nibabel.nii").read_bytes()
    scaled_nifti(tmp_path / "scaled.nii", np.arange(210, dtype=np.int16).reshape(7, 6, 5), 0.25, 10.0)
    write_volume(read_volume(tmp_path / "scaled.nii"), tmp_path / "int.nii", dtype="input")
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "int.nii"))).T  # SimpleITK indexes (k, j, i)
    np.testing.assert_array_equal(image, read_volume(tmp_path / "scaled.nii").array[0].numpy())


def test_descrip_holds_80_bytes_of_whole_characters_and_cal_the_display_range(tmp_path, volume):
    description = "medsr SR x2x2x1 " + "modèle" * 20  # 2 bytes per è: the 80th byte falls inside one
    write_volume(volume, tmp_path / "sr.nii.gz", description=description, display_range=(-1024.0, 3071.0))
    header = nib.load(tmp_path / "sr.nii.gz").header
    descrip = bytes(header["descrip"])
    assert len(descrip) <= 80 and description.startswith(descrip.decode()) and len(description.encode()) > 80
    assert (float(header["cal_min"]), float(header["cal_max"])) == (-1024.0, 3071.0)
    with pytest.raises(ValueError, match="dtype must be one of input, float32"):
        write_volume(volume, tmp_path / "x.nii.gz", dtype="int16")


def test_a_sidecar_is_written_with_its_file_or_not_at_all(tmp_path):
    """A failing block leaves the old image and sidecar as they were and no temporary file; a complete one both."""
    target = tmp_path / "sr.nii.gz"
    target.write_bytes(b"old image")
    sidecar_path(target).write_text("old sidecar")
    with pytest.raises(OSError, match="disk full"), sidecar_output(target, {"Model": "new"}):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError("disk full")
    assert names(tmp_path) == ["sr.json", "sr.nii.gz"] and sidecar_path(target).read_text() == "old sidecar"
    with sidecar_output(target, {"Model": "new"}):
        write_bytes(target, b"new image")
    assert json.loads(sidecar_path(target).read_text()) == {"Model": "new"} and target.read_bytes() == b"new image"
    assert names(tmp_path) == ["sr.json", "sr.nii.gz"]
    assert [sidecar_path(tmp_path / n).name for n in ("a.nii", "a.NII.GZ", "a.tif")] == ["a.json"] * 3


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
    def broken_header(header, stream):
        stream.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(nib.Nifti1Header, "write_to", broken_header)
    with pytest.raises(OSError, match=r"disk full"):
        write_volume(volume, tmp_path / "out.nii.gz")
    assert names(tmp_path) == []


def test_failed_write_keeps_existing_target(tmp_path, volume, monkeypatch):
    path = tmp_path / "out.nii.gz"
    write_volume(volume, path)
    before = path.read_bytes()

    def broken_header(header, stream):
        raise OSError("disk full")

    monkeypatch.setattr(nib.Nifti1Header, "write_to", broken_header)
    with pytest.raises(OSError):
        write_volume(volume.replace(array=volume.array + 1), path)
    assert names(tmp_path) == ["out.nii.gz"]
    assert path.read_bytes() == before


def test_a_sigterm_the_moment_a_temporary_appears_still_removes_it(tmp_path, monkeypatch):
    """`kill -TERM` as the temporary file is made (what a process killed as its output appears meets), raised
    before the writer gets the file back: nothing is left."""
    make = os.open

    def make_then_terminate(*args, **kwargs):
        made = make(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return made

    previous = signal.getsignal(signal.SIGTERM)
    exit_on_sigterm()
    try:
        monkeypatch.setattr(os, "open", make_then_terminate)
        with pytest.raises(SystemExit), atomic_output(tmp_path / "sr.nii.gz") as tmp:
            tmp.write_bytes(b"never written")
    finally:
        monkeypatch.undo()
        signal.signal(signal.SIGTERM, previous)
    assert names(tmp_path) == []


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
