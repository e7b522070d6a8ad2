"""Hostile and broken input files: each is refused with one line naming the file and the problem, before any work
or write; never a traceback, a silently wrong result, a hang or gigabytes of memory.

The corpus is made here, a few KB per file; every file goes through ``medsr info`` and ``medsr upscale``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

from medsr import dicom, io
from medsr.cli import main
from medsr.io import open_volume, read_volume, volume_writer

CUBE = np.arange(4 * 5 * 3, dtype=np.int16).reshape(4, 5, 3)
PIXELS = np.arange(12, dtype=np.uint16).reshape(3, 4)  # one DICOM slice: 3 rows, 4 columns

# NIfTI


def nifti_bytes(data, *, pixdim=(1.0, 1.0, 1.0), qform=0, sform=0, srow=None, shape=None, scale=None) -> bytes:
    """A NIfTI-1 file written field by field: nibabel's writer would correct the broken fields."""
    data = np.asarray(data)
    header = nib.Nifti1Header()
    header.set_data_dtype(data.dtype)
    header.set_data_shape(shape or data.shape)
    header["pixdim"][1:4] = pixdim
    header["qform_code"], header["sform_code"] = qform, sform
    if srow is not None:
        header["srow_x"], header["srow_y"], header["srow_z"] = np.asarray(srow, dtype=np.float32)
    if scale is not None:
        header["scl_slope"], header["scl_inter"] = scale
    header["vox_offset"] = 352
    return header.binaryblock + b"\0" * 4 + data.tobytes(order="F")


def nifti(name: str, data=CUBE, **fields) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        blob = nifti_bytes(data, **fields)
        path = folder / name
        path.write_bytes(gzip.compress(blob, mtime=0) if name.endswith(".gz") else blob)
        return path

    return make


def raw(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        (folder / name).write_bytes(data)
        return folder / name

    return make


def noise_gz() -> bytes:
    """A valid .nii.gz large enough that nibabel reads its header and voxels without reaching the gzip trailer."""
    data = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
    return gzip.compress(nifti_bytes(data), mtime=0)


def bad_crc(folder: Path) -> Path:
    blob = bytearray(noise_gz())
    blob[-8] ^= 0xFF  # the CRC-32 of the trailer; the voxels are intact
    path = folder / "bad_crc.nii.gz"
    path.write_bytes(bytes(blob))
    # nibabel alone reads it silently: the corruption only shows when the whole stream is checked
    assert np.asarray(nib.load(path).dataobj).shape == (8, 8, 8)
    return path


def bad_length(folder: Path) -> Path:
    blob = bytearray(noise_gz())
    blob[-1] ^= 0x01  # ISIZE, the uncompressed length mod 2^32
    return raw("bad_length.nii.gz", bytes(blob))(folder)


def nan_voxel(name: str, value: float) -> Callable[[Path], Path]:
    data = CUBE.astype(np.float32)
    data[1, 2, 1] = value
    return nifti(name, data)


def folder_named_nifti(folder: Path) -> Path:
    (folder / "scan.nii.gz").mkdir()
    return folder / "scan.nii.gz"


def symlink_loop(folder: Path) -> Path:
    (folder / "cycle.nii.gz").symlink_to("cycle.nii.gz")
    return folder / "cycle.nii.gz"


def dangling_link(folder: Path) -> Path:
    (folder / "gone.nii").symlink_to("missing.nii")
    return folder / "gone.nii"


def fifo(folder: Path) -> Path:
    os.mkfifo(folder / "pipe.nii")  # reading it would wait for a writer forever
    return folder / "pipe.nii"


# PNG / TIFF


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, *, extra: bytes = b"") -> bytes:
    """An 8-bit grey PNG whose header declares ``width`` x ``height``, with a few bytes of image data."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    body = png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + header + extra + body


def tiff(width: int, height: int) -> bytes:
    """A little-endian 8-bit grey TIFF whose header declares ``width`` x ``height``, with 16 bytes of strip."""
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 110)]
    entries += [(278, 4, height), (279, 4, 16)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", t, kind, 1, v) for t, kind, v in entries)
    return b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + b"\0" * 16


def text_bomb() -> bytes:
    """A 4x4 PNG with a compressed text chunk that inflates to 4 MB."""
    return png(4, 4, extra=png_chunk(b"zTXt", b"comment\0\0" + zlib.compress(b"\0" * 2**22, 9)))


def cut_png(folder: Path) -> Path:
    path = folder / "cut.png"
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:80])
    return path


# DICOM


def dicom_bytes(path: Path, pixels=PIXELS, *, syntax=ExplicitVRLittleEndian, **tags) -> Path:
    """A one-slice CT file; ``tags`` set (None: delete) attributes after the pixels, so they may contradict them."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.ImagePositionPatient = [0, 0, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    if pixels is None:
        ds.Rows, ds.Columns, ds.BitsAllocated, ds.SamplesPerPixel = 3, 4, 16, 1
    else:
        ds.set_pixel_data(pixels, photometric_interpretation="MONOCHROME2", bits_stored=16, generate_instance_uid=False)
    ds.file_meta.TransferSyntaxUID = syntax
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of the invalid values written on purpose
        for keyword, value in tags.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)
    return path


def dcm(name: str, pixels=PIXELS, **tags) -> Callable[[Path], Path]:
    return lambda folder: dicom_bytes(folder / name, pixels, **tags)


def cut_dicom(folder: Path) -> Path:
    path = dicom_bytes(folder / "cut.dcm")
    path.write_bytes(path.read_bytes()[:-10])
    return path


def deflated(name: str, *, cut: bool = False, **tags) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = dicom_bytes(folder / name, np.zeros((64, 64), np.uint16), syntax=DeflatedExplicitVRLittleEndian, **tags)
        if cut:
            path.write_bytes(path.read_bytes()[:-40])
        return path

    return make


def junk_only_folder(folder: Path) -> Path:
    (folder / "series").mkdir()
    (folder / "series" / "README").write_text("not a scan")
    (folder / "series" / "empty").write_bytes(b"")
    return folder / "series"


def fake_dicm(folder: Path) -> Path:
    return raw("fake.dcm", b"\0" * 128 + b"DICM" + bytes(range(256)) * 4)(folder)


# Every case: how to make it, and a pattern naming the problem in the one-line error.
CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    # NIfTI geometry that cannot be decomposed
    "pixdim_nan": (nifti("pixdim_nan.nii", pixdim=(np.nan, 1, 1)), r"pixdim.*nan along i"),
    "pixdim_inf": (nifti("pixdim_inf.nii", pixdim=(1, np.inf, 1)), r"pixdim.*inf along j"),
    "pixdim_zero": (nifti("pixdim_zero.nii.gz", pixdim=(1, 1, 0)), r"pixdim.*zero along k"),
    "qform_pixdim_nan": (nifti("qform_nan.nii", qform=1, pixdim=(1, np.nan, 1)), r"pixdim.*nan.*qform"),
    "qform_pixdim_zero": (nifti("qform_zero.nii", qform=1, pixdim=(0, 1, 1)), r"pixdim.*zero.*qform"),
    "sform_zero": (nifti("sform_zero.nii", sform=1, srow=np.zeros((3, 4))), r"sform.*singular.*zero voxel size"),
    "sform_singular": (
        nifti("sform_flat.nii", sform=1, srow=[[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]]),
        r"sform.*singular",
    ),
    "sform_nan": (nifti("sform_nan.nii", sform=1, srow=np.full((3, 4), np.nan)), r"sform.*NaN or infinite"),
    "sform_inf": (
        nifti("sform_inf.nii", sform=1, srow=[[np.inf, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]),
        r"sform.*NaN or infinite",
    ),
    # gzip
    "gzip_bad_crc": (bad_crc, r"CRC check failed"),
    "gzip_bad_length": (bad_length, r"gzip.*length"),
    "gzip_truncated": (raw("cut.nii.gz", noise_gz()[:-200]), r"truncated"),
    "gzip_no_trailer": (raw("no_trailer.nii.gz", noise_gz()[:-8]), r"truncated"),
    "gzip_garbage": (raw("garbage.nii.gz", b"\x1f\x8b\x08\0" + bytes(range(256)) * 4), r"gzip|NIfTI"),
    "data_shorter_gz": (nifti("short.nii.gz", shape=(40, 50, 30)), r"truncated"),
    "data_shorter_nii": (nifti("short.nii", shape=(40, 50, 30)), r"truncated"),
    "dims_huge_gz": (nifti("huge.nii.gz", shape=(30000, 30000, 30000)), r"truncated"),
    "dims_huge_nii": (nifti("huge.nii", shape=(30000, 30000, 30000)), r"truncated"),
    # voxel types and shapes
    "complex64": (nifti("complex64.nii", CUBE.astype(np.complex64)), r"complex64"),
    "complex128": (nifti("complex128.nii.gz", CUBE.astype(np.complex128)), r"complex128"),
    "rgb24": (nifti("rgb.nii", np.zeros((4, 5, 3), [("R", "u1"), ("G", "u1"), ("B", "u1")])), r"RGB"),
    "4d": (nifti("4d.nii", np.zeros((2, 2, 2, 3), np.int16)), r"4D"),
    "5d": (nifti("5d.nii", np.zeros((2, 2, 2, 1, 2), np.int16)), r"5D"),
    "no_voxels": (nifti("empty_shape.nii", np.zeros((0, 4, 4), np.int16)), r"no voxels"),
    "nan_voxel": (nan_voxel("nan.nii.gz", np.nan), r"NaN"),
    "inf_voxel": (nan_voxel("inf.nii", np.inf), r"infinite"),
    # not NIfTI files at all
    "empty_nii": (raw("empty.nii", b""), r"empty"),
    "empty_nii_gz": (raw("empty.nii.gz", b""), r"empty"),
    "garbage_nii": (raw("garbage.nii", bytes(range(256)) * 2), r"cannot read as NIfTI"),
    "folder_named_nii_gz": (folder_named_nifti, r"folder|no scans"),
    "symlink_loop": (symlink_loop, r"[Ll]oop"),
    "dangling_symlink": (dangling_link, r"leads nowhere"),
    "fifo": (fifo, r"not a regular file"),
    # PNG / TIFF
    "png_bomb": (raw("bomb.png", png(100_000, 100_000)), r"pixels"),
    "png_over_limit": (raw("big.png", png(9000, 9000)), r"81,000,000 pixels"),
    "tiff_bomb": (raw("bomb.tif", tiff(100_000, 100_000)), r"pixels"),
    "tiff_over_limit": (raw("big.tif", tiff(9000, 9000)), r"81,000,000 pixels"),
    "png_text_bomb": (raw("text.png", text_bomb()), r"[Dd]ecompressed|too large"),
    "png_truncated": (cut_png, r"cannot read as an image"),
    "png_empty": (raw("empty.png", b""), r"empty"),
    # DICOM
    "dicom_no_pixel_data": (dcm("nopix.dcm", None), r"no pixel data"),
    "dicom_pixel_spacing_zero": (dcm("ps0.dcm", PixelSpacing=[0, 0]), r"PixelSpacing \[0.0, 0.0\]"),
    "dicom_pixel_spacing_nan": (dcm("psnan.dcm", PixelSpacing=["NaN", "NaN"]), r"PixelSpacing \[nan, nan\]"),
    "dicom_pixel_spacing_inf": (dcm("psinf.dcm", PixelSpacing=["inf", "1"]), r"PixelSpacing \[inf, 1.0\]"),
    "dicom_pixel_spacing_one_value": (dcm("ps1.dcm", PixelSpacing="1"), r"PixelSpacing \[1.0\]"),
    "dicom_orientation_zero": (
        dcm("iop0.dcm", ImageOrientationPatient=[0] * 6),
        r"ImageOrientationPatient \[0.0, 0.0, 0.0, 0.0, 0.0, 0.0\] is not two perpendicular unit vectors",
    ),
    "dicom_orientation_nan": (
        dcm("iopnan.dcm", ImageOrientationPatient=["nan", 0, 0, 0, 1, 0]),
        r"ImageOrientationPatient \[nan, 0.0, 0.0, 0.0, 1.0, 0.0\] is not 6 finite numbers",
    ),
    "dicom_position_nan": (
        dcm("ippnan.dcm", ImagePositionPatient=["nan", 0, 0]),
        r"ImagePositionPatient \[nan, 0.0, 0.0\] is not 3 finite",
    ),
    "dicom_rows_zero": (dcm("rows0.dcm", Rows=0), r"Rows 0"),
    "dicom_huge_declared": (dcm("huge.dcm", Rows=65535, Columns=65535), r"over the limit"),
    "dicom_shorter_declared": (dcm("short.dcm", Rows=2), r"pixel data holds 24 bytes.*declare 16"),
    "dicom_longer_declared": (dcm("long.dcm", Rows=4), r"pixel data holds 24 bytes.*declare 32"),
    "dicom_truncated": (cut_dicom, r"truncated"),
    "dicom_rescale_nan": (dcm("slope.dcm", RescaleSlope="NaN"), r"NaN"),
    "dicom_deflated_huge_declared": (
        deflated("deflate.dcm", Rows=60000, Columns=60000, NumberOfFrames=500),
        r"over the limit",
    ),
    "dicom_deflated_truncated": (deflated("deflate_cut.dcm", cut=True), r"deflated data set is truncated"),
    "dicom_fake_dicm": (fake_dicm, r"no DICOM image|cannot read DICOM header"),
    "dicom_folder_without_dicom": (junk_only_folder, r"no DICOM image files|no scans"),
}


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` with its bytes (a link: its target; a folder or FIFO: its kind)."""
    entries = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            key = str(path.relative_to(folder))
            if path.is_symlink():
                entries[key] = f"link to {os.readlink(path)}"
            elif path.is_file():
                entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                entries[key] = "folder" if path.is_dir() else "special"
    return entries


def run(capsys, argv: list[str]) -> tuple[int, str]:
    """``medsr ARGV``: the exit code and stderr; no warning may reach the user besides the one error line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(argv)
    shown = [w for w in caught if not issubclass(w.category, DeprecationWarning)]
    assert not shown, [str(w.message) for w in shown]
    return code, capsys.readouterr().err


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    return tmp_path / "in", tmp_path / "out"


def upscale_args(source: Path, output: Path) -> list[str]:
    # A model and modality given: no model-choice line on stderr when the error comes after reading the headers
    if source.name.endswith(".dcm"):
        return ["upscale", str(source), str(output), "--model", "edsr_ct_x2"]
    return ["upscale", str(source), str(output), "--modality", "MR", "--model", "edsr_mr_x2"]


@pytest.mark.parametrize("command", ["info", "upscale"])
@pytest.mark.parametrize("case", list(CASES))
def test_cli_refuses_in_one_line_naming_file_and_problem(capsys, folders, case, command):
    source_folder, out_folder = folders
    make, problem = CASES[case]
    source = make(source_folder)
    before = snapshot(source_folder.parent)
    output = out_folder / "sr.nii.gz"

    code, err = run(capsys, ["info", str(source)] if command == "info" else upscale_args(source, output))

    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"medsr {command}: error: ")
    assert str(source) in lines[0]
    assert re.search(problem, lines[0]), lines[0]
    assert "Traceback" not in err
    assert snapshot(source_folder.parent) == before  # input bytes unchanged, nothing written anywhere
    assert list(out_folder.iterdir()) == []


LIBRARY_CASES = [case for case in CASES if case not in ("folder_named_nii_gz", "dicom_folder_without_dicom")]


@pytest.mark.parametrize("case", LIBRARY_CASES)
def test_read_volume_refuses_naming_file_and_problem(folders, case):
    make, problem = CASES[case]
    source = make(folders[0])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(source))}.*{problem}"):
        read_volume(source)


STREAMABLE = [
    case
    for case in LIBRARY_CASES
    if not case.startswith(("png", "tiff", "empty", "garbage", "symlink", "dangling", "fifo", "dicom_fake"))
]


@pytest.mark.parametrize("case", STREAMABLE)
def test_open_volume_refuses_before_any_slab_is_used(folders, case):
    """Headers and (.nii.gz) the whole gzip stream are checked on opening; NaN/inf voxels where a slab is read,
    inside the writer, which then leaves nothing behind."""
    source_folder, out_folder = folders
    make, problem = CASES[case]
    source = make(source_folder)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(source))}.*{problem}"):
        scan = open_volume(source)
        with volume_writer(out_folder / "copy.nii.gz", spatial_shape=scan.spatial_shape, affine=scan.affine) as write:
            for k in range(scan.spatial_shape[2]):
                write(scan.read_slab(k, k + 1))
    assert list(out_folder.iterdir()) == []


def test_nan_and_crc_are_found_on_opening_or_reading_not_after(folders):
    source_folder, _ = folders
    with pytest.raises(ValueError, match="CRC check failed"):
        open_volume(bad_crc(source_folder))  # before a single slab: the writer never starts
    scan = open_volume(nan_voxel("nan.nii.gz", np.nan)(source_folder))
    scan.read_slab(0, 1)
    with pytest.raises(ValueError, match=r"nan\.nii\.gz, slice 1: 1 voxels are NaN"):
        scan.read_slab(1, 2)


def test_folder_with_non_dicom_files_reads_its_one_image(capsys, folders):
    source_folder, out_folder = folders
    series = source_folder / "series"
    series.mkdir()
    dicom_bytes(series / "IM0001")
    (series / "README").write_text("hello")
    (series / "empty").write_bytes(b"")
    (series / "junk.bin").write_bytes(bytes(range(256)) * 4)
    code, err = run(capsys, ["upscale", str(series), str(out_folder / "sr.nii.gz"), "--model", "edsr_ct_x2"])
    assert code == 0 and read_volume(out_folder / "sr.nii.gz").spatial_shape == (8, 6, 1)
    (series / "loop").symlink_to("loop")  # batch mode's scan search (CLI) does not pass these yet
    (series / "sub").mkdir()
    os.mkfifo(series / "pipe")
    assert read_volume(series).spatial_shape == (4, 3, 1)
    code, err = run(capsys, ["info", str(series)])
    assert code == 0 and err == ""


def test_one_voxel_volume_reads_and_is_refused_for_upscaling(capsys, folders):
    source_folder, out_folder = folders
    source = nifti("one.nii", np.ones((1, 1, 1), np.float32))(source_folder)
    assert read_volume(source).spatial_shape == (1, 1, 1)
    code, err = run(capsys, ["info", str(source)])
    assert code == 0 and err == ""
    code, err = run(capsys, upscale_args(source, out_folder / "sr.nii.gz"))
    assert code == 2 and err.splitlines()[-1].startswith("medsr upscale: error: ") and "Traceback" not in err
    assert list(out_folder.iterdir()) == []


def test_one_voxel_volume_refusal_is_one_line_naming_the_file(capsys, folders):
    source_folder, out_folder = folders
    source = nifti("one.nii", np.ones((1, 1, 1), np.float32))(source_folder)
    code, err = run(capsys, upscale_args(source, out_folder / "sr.nii.gz"))
    assert len(err.splitlines()) == 1 and str(source) in err


def test_scaled_and_2d_nifti_still_read(folders):
    """The checks pass what is valid: scl_slope/scl_inter, a 2D image whose pixdim[3] is 0."""
    source_folder, _ = folders
    for name in ("scaled.nii", "scaled.nii.gz"):
        volume = read_volume(nifti(name, CUBE, scale=(2.0, -10.0))(source_folder))
        np.testing.assert_array_equal(volume.array[0].numpy(), 2.0 * CUBE - 10.0)
    flat = read_volume(nifti("flat.nii.gz", CUBE[:, :, 0], pixdim=(0.5, 0.7, 0))(source_folder))
    assert flat.spatial_shape == (4, 5, 1) and flat.spacing[:2] == pytest.approx((0.5, 0.7))


def test_whole_scan_limit_is_checked_before_decompressing(folders, monkeypatch):
    source_folder, _ = folders
    source = nifti("cube.nii.gz", CUBE)(source_folder)
    monkeypatch.setattr(io, "MAX_VOLUME_BYTES", 100)
    with monkeypatch.context() as patch:
        patch.setattr(io, "_gunzip", lambda *args, **kwargs: pytest.fail("decompressed"))
        with pytest.raises(ValueError, match=r"4 x 5 x 3 voxels need .* GiB as float32, over the .* limit"):
            read_volume(source)
    assert open_volume(source).read_slab(0, 3).shape == (4, 5, 3)  # streaming has no such limit
    monkeypatch.setattr(dicom, "MAX_VOLUME_BYTES", 40)
    file = dicom_bytes(source_folder / "slice.dcm")
    with pytest.raises(ValueError, match=r"4 x 3 x 1 voxels .* over the .* limit"):
        read_volume(file)


def test_deflated_file_is_not_inflated_past_the_limit(folders, monkeypatch):
    """A deflated data set is inflated in chunks that are not kept, and refused past the limit before pydicom
    inflates it whole (as it does even to read the header)."""
    source_folder, _ = folders
    file = deflated("zeros.dcm")(source_folder)  # 8 KB of pixels in a few hundred bytes
    assert read_volume(file).spatial_shape == (64, 64, 1)
    monkeypatch.setattr(dicom, "MAX_SLICE_BYTES", 1024)
    monkeypatch.setattr(dicom, "_MAX_HEADER_BYTES", 1024)

    def never(*args, **kwargs):
        raise AssertionError("pydicom read the file")

    monkeypatch.setattr(dicom, "read_partial", never)
    with pytest.raises(ValueError, match=r"deflated data set inflates to more than 2,048 bytes"):
        read_volume(file)


def test_pydicom_deflated_sample_passes_the_header_checks():
    from pydicom.data import get_testdata_file

    file = Path(get_testdata_file("image_dfl.dcm"))
    assert pydicom.dcmread(file).file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    [(_, header)] = dicom._read_series_headers(file)  # inflated in chunks, pixel data length checked
    assert dicom.read_slice(file).shape == (header.Columns, header.Rows)
