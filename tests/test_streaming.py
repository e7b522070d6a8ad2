"""Streaming upscale equals the in-memory path (read_volume -> normalise -> predict_volume -> write_volume)."""

from __future__ import annotations

import gzip
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from medsr.infer import footprint, model_predictor, predict_volume, volume_tiling
from medsr.intensity import default_window, denormalize, normalize
from medsr.io import open_volume, read_volume, volume_writer, write_volume
from medsr.models import create_model
from medsr.models.blocks import interpolate
from medsr.samples import sample_path
from medsr.streaming import stream_upscale
from medsr.volume import Modality, Volume, crop

from .conftest import oblique_affine


def repeat(scale):
    """Nearest-neighbour upsampling: no spatial context, so any tiling gives the same output exactly."""
    return lambda x: interpolate(x, scale, "nearest")


def cubic(scale):
    return lambda x: interpolate(x, scale, "cubic")


def in_memory(
    source: Path, target: Path, predictor, *, scale, spatial_dims, modality=None, floor=None, storage=(), **options
) -> None:
    """The reference: the whole volume in memory, as ``infer.super_resolve`` does it (and the pipeline's floor)."""
    volume = read_volume(source, modality=modality)
    window = default_window(volume)
    sr = predict_volume(
        predictor, normalize(volume, window), scale=scale, spatial_dims=spatial_dims, progress=False, **options
    )
    sr = denormalize(sr, window)
    sr = sr if floor is None else sr.replace(array=sr.array.clamp(min=floor))
    write_volume(sr, target, description="sr", **dict(storage))


def both(tmp_path, source, name, predictor, *, floor=None, storage=(), **options) -> tuple[Path, Path]:
    """(in-memory output, streamed output) of ``source``; each target is named ``name`` in its own folder.
    ``storage``: the NIfTI ``dtype`` and ``display_range`` for both writers."""
    (tmp_path / "memory").mkdir()
    (tmp_path / "streamed").mkdir()
    expected, streamed = tmp_path / "memory" / name, tmp_path / "streamed" / name
    in_memory(source, expected, predictor, floor=floor, storage=storage, **options)
    stream_upscale(
        source, streamed, predictor, description="sr", progress=False, floor=floor, **dict(storage), **options
    )
    return expected, streamed


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def mr_nifti(tmp_path, phantom) -> Path:
    """The 24 x 20 x 16 phantom in MR-like units, oblique, as int16 with scl_slope (a real scanner's storage)."""
    path = tmp_path / "mr.nii.gz"
    image = nib.Nifti1Image(np.rint(phantom.array[0].numpy() * 3000).astype(np.int16), phantom.affine)
    image.header.set_slope_inter(0.25, 10.0)
    nib.save(image, path)
    return path


@pytest.mark.kernels
@pytest.mark.parametrize("source_name", ["mr.nii", "mr.nii.gz"])
def test_2d_nifti_to_nii_is_byte_for_byte_the_in_memory_file(tmp_path, mr_nifti, source_name):
    source = tmp_path / source_name
    if source_name == "mr.nii":
        nib.save(nib.load(mr_nifti), source)
    expected, streamed = both(
        tmp_path, source, "sr.nii", cubic((2, 3)), scale=(2, 3, 1), spatial_dims=2, modality="MR", tile=8, overlap=4
    )
    assert streamed.read_bytes() == expected.read_bytes()
    assert names(tmp_path / "streamed") == ["sr.nii"]


@pytest.mark.kernels
def test_integer_storage_and_a_floor_stream_as_in_memory(tmp_path, mr_nifti):
    """The int16 source with scl_slope 0.25, scl_inter 10 written back in its storage (the header first, the type
    and scaling known from the source's), cubic overshoot floored at 300: byte for byte the in-memory file, whose
    integers are the float32 output floored, then round((x - 10) / 0.25)."""
    storage = {"dtype": "input", "display_range": (10.0, 900.0)}
    options = {"scale": (2, 2, 1), "spatial_dims": 2, "modality": "MR", "tile": 16, "floor": 300.0}
    expected, streamed = both(tmp_path, mr_nifti, "sr.nii", cubic((2, 2)), storage=storage, **options)
    assert streamed.read_bytes() == expected.read_bytes()
    stream_upscale(mr_nifti, tmp_path / "float.nii", cubic((2, 2)), progress=False, **options)
    stored, floats = nib.load(streamed), nib.load(tmp_path / "float.nii").get_fdata(dtype=np.float32)
    assert stored.get_data_dtype() == np.int16 and (stored.dataobj.slope, stored.dataobj.inter) == (0.25, 10)
    assert floats.min() == 300.0 and stored.header["cal_max"] == 900.0
    np.testing.assert_array_equal(stored.dataobj.get_unscaled(), np.rint((floats.astype(np.float64) - 10) / 0.25))


@pytest.mark.kernels
def test_nii_gz_target_decompresses_to_the_in_memory_file(tmp_path, mr_nifti):
    expected, streamed = both(
        tmp_path, mr_nifti, "sr.nii.gz", repeat((2, 2)), scale=(2, 2, 1), spatial_dims=2, modality="MR", tile=16
    )
    assert gzip.decompress(streamed.read_bytes()) == gzip.decompress(expected.read_bytes())


@pytest.mark.parametrize(
    ("scale", "tile", "overlap"),
    [((2, 2, 2), 8, 4), ((1, 1, 3), 6, 2), ((2, 1, 1), 48, 8)],
    ids=["x2-isotropic", "through-plane", "one-slab"],
)
@pytest.mark.kernels
def test_3d_slabs_are_rows_of_the_whole_volume_tiles(tmp_path, mr_nifti, scale, tile, overlap):
    """Slabs overlap along k (16 slices, tiles of 6 or 8) and keep what the whole volume's tiles keep there."""
    expected, streamed = both(
        tmp_path,
        mr_nifti,
        "sr.nii",
        cubic(scale),
        scale=scale,
        spatial_dims=3,
        modality="MR",
        tile=tile,
        overlap=overlap,
    )
    assert streamed.read_bytes() == expected.read_bytes()


def test_2d_through_plane(tmp_path, mr_nifti):
    expected, streamed = both(
        tmp_path, mr_nifti, "sr.nii", cubic((1, 3)), scale=(1, 1, 3), spatial_dims=2, modality="MR", tile=8, overlap=2
    )
    np.testing.assert_allclose(nib.load(streamed).get_fdata(), nib.load(expected).get_fdata(), atol=1e-6 * 3000)


@pytest.fixture
def large_nifti(tmp_path) -> Path:
    """A 40 x 36 x 48 float32 MR-like volume: room for several tiles of a network's receptive field along k."""
    path = tmp_path / "large.nii"
    rng = np.random.default_rng(1)
    i, j, k = np.meshgrid(*(np.linspace(-1, 1, n) for n in (40, 36, 48)), indexing="ij")
    image = 900 * (i**2 + j**2 + k**2 < 0.8) + 300 * np.cos(6 * i) * np.sin(5 * k) + 20 * rng.standard_normal(i.shape)
    nib.save(nib.Nifti1Image(image.astype(np.float32), oblique_affine()), path)
    return path


@pytest.mark.kernels
@pytest.mark.parametrize(
    ("spatial_dims", "model_scale", "scale"),
    [(2, (2, 2), (2, 2, 1)), (2, (1, 2), (1, 1, 2)), (3, (2, 2, 2), (2, 2, 2))],
    ids=["in-plane", "through-plane", "3d"],
)
def test_a_network_with_default_tiles_streams_as_in_memory(tmp_path, large_nifti, spatial_dims, model_scale, scale):
    """edsr_tiny with the default tiles (overlap from its receptive radius) under a budget that cuts the volume into
    several slabs: the streamed file is the in-memory file, byte for byte."""
    torch.manual_seed(0)
    predictor = model_predictor(
        create_model("edsr_tiny", spatial_dims=spatial_dims, scale=model_scale), precision="fp32"
    )
    memory = footprint(predictor, spatial_dims).bytes_per_voxel * 40 * 36 * 48 / (3 if spatial_dims == 3 else 80)
    tiling = volume_tiling(
        predictor, (1, 40, 36, 48), spatial_dims=spatial_dims, through_plane=scale[2] != 1, memory=memory
    )
    assert tiling.tile[2] < 48  # several slabs
    options = {"scale": scale, "spatial_dims": spatial_dims, "modality": "MR", "memory": memory}
    expected, streamed = both(tmp_path, large_nifti, "sr.nii", predictor, **options)
    assert streamed.read_bytes() == expected.read_bytes()


def test_real_mr_crop(tmp_path):
    """Colin27 (uint8 T1, many ties in the window's percentiles), a 40 x 36 x 12 block kept in its storage type."""
    colin = nib.load(sample_path("colin27"))
    source = tmp_path / "colin.nii.gz"
    nib.save(colin.slicer[70:110, 90:126, 80:92], source)
    expected, streamed = both(
        tmp_path, source, "sr.nii", cubic((2, 2)), scale=(2, 2, 1), spatial_dims=2, modality="MR", tile=16
    )
    assert streamed.read_bytes() == expected.read_bytes()


def dicom_headers(folder: Path) -> list[dict]:
    """Every element but the per-write UIDs and times, file by file."""
    fresh = {"SOPInstanceUID", "MediaStorageSOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"}
    fresh |= {"FrameOfReferenceUID", "SeriesTime", "ContentTime", "SeriesDate", "ContentDate"}
    files = [pydicom.dcmread(file) for file in sorted(folder.iterdir())]
    return [{e.keyword: e.value for e in ds.iterall() if e.keyword not in fresh} for ds in files]


@pytest.mark.parametrize("modality", ["MR", "CT"])
def test_dicom_series_to_dicom_series(tmp_path, phantom, modality):
    """A 5-slice series written by medsr: the same pixels, rescale, window and geometry as in memory."""
    volume = crop(phantom, (0, 0, 4), (24, 20, 9))
    volume = volume.replace(array=volume.array * 1500 - (1000 if modality == "CT" else 0), modality=modality)
    write_volume(volume, tmp_path / "series")
    expected, streamed = both(
        tmp_path, tmp_path / "series", "sr", cubic((2, 2)), scale=(2, 2, 1), spatial_dims=2, tile=8, overlap=4
    )
    assert dicom_headers(streamed) == dicom_headers(expected)
    assert names(tmp_path) == ["memory", "series", "streamed"]  # nothing staged is left


def test_real_ct_slice_to_dicom_and_nifti(tmp_path):
    """A real CT file (HU rescale, a source header to copy) read lazily, written as a series and as NIfTI."""
    source = tmp_path / "ct"
    source.mkdir()
    shutil.copy(sample_path("ct_head_slice"), source / "slice.dcm")
    options = {"scale": (2, 2, 1), "spatial_dims": 2, "tile": 512}
    expected, streamed = both(tmp_path, source, "sr", repeat((2, 2)), **options)
    assert dicom_headers(streamed) == dicom_headers(expected)
    stream_upscale(source, tmp_path / "sr.nii", repeat((2, 2)), progress=False, **options)
    write_volume(read_volume(expected), tmp_path / "expected.nii")
    np.testing.assert_array_equal(nib.load(tmp_path / "sr.nii").dataobj, nib.load(tmp_path / "expected.nii").dataobj)


def test_lazy_reader_gives_read_volume(tmp_path, mr_nifti):
    volume, lazy = read_volume(mr_nifti), open_volume(mr_nifti)
    np.testing.assert_array_equal(lazy.read_slab(3, 7), volume.array[0, :, :, 3:7].numpy())
    np.testing.assert_array_equal(np.stack(list(lazy.slices()), axis=-1), volume.array[0].numpy())
    assert lazy.spatial_shape == volume.spatial_shape and np.array_equal(lazy.affine, volume.affine)


@pytest.mark.parametrize("name", ["bad.nii", "bad.nii.gz"])
def test_truncated_source_is_refused_and_nothing_is_written(tmp_path, mr_nifti, name):
    source = tmp_path / name
    image = nib.load(mr_nifti)
    nib.save(image, source)
    data = gzip.decompress(source.read_bytes()) if name.endswith(".gz") else source.read_bytes()
    data = data[: len(data) * 2 // 3]
    source.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match=rf"^{re.escape(str(source))}: (truncated|cannot read slices)"):
        stream_upscale(source, tmp_path / "out" / "sr.nii", repeat((2, 2)), scale=(2, 2, 1), spatial_dims=2)
    assert names(tmp_path / "out") == []


@pytest.mark.parametrize("modality", ["MR", "CT"])  # CT: no window pass, found while writing
def test_nan_slice_is_refused_naming_file_and_slice(tmp_path, phantom, modality):
    array = phantom.array[0].numpy().copy()
    array[3, 4, 11] = np.nan
    source = tmp_path / "nan.nii"
    nib.save(nib.Nifti1Image(array, phantom.affine), source)
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match=rf"^{re.escape(str(source))}, slice 11: 1 voxels are NaN or infinite"):
        stream_upscale(
            source, tmp_path / "out" / "sr.nii.gz", repeat((2, 2)), scale=(2, 2, 1), spatial_dims=2, modality=modality
        )
    assert names(tmp_path / "out") == []


def test_existing_targets_follow_write_volume(tmp_path, mr_nifti):
    options = {"scale": (2, 2, 1), "spatial_dims": 2, "progress": False}
    with pytest.raises(ValueError, match="is an input"):
        stream_upscale(mr_nifti, mr_nifti, repeat((2, 2)), **options)
    old = tmp_path / "old.nii"
    old.write_bytes(b"replaced")
    stream_upscale(mr_nifti, old, repeat((2, 2)), **options)
    assert nib.load(old).shape == (48, 40, 16)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="medsr did not write"):
        stream_upscale(mr_nifti, foreign, repeat((2, 2)), **options)
    assert names(foreign) == ["notes.txt"]


def test_dicom_target_inside_the_source_series_is_refused(tmp_path, phantom):
    write_volume(phantom, tmp_path / "series")
    with pytest.raises(ValueError, match="never overwrites its input"):
        stream_upscale(tmp_path / "series", tmp_path / "series" / "sr", repeat((2, 2)), scale=(2, 2, 1), spatial_dims=2)


def test_writer_needs_every_slice(tmp_path, phantom):
    target = tmp_path / "short.nii.gz"
    with pytest.raises(ValueError, match="got 15 of 16 slices"):
        with volume_writer(target, spatial_shape=(24, 20, 16), affine=oblique_affine()) as write:
            write(phantom.array[0, :, :, :15].numpy())
    assert names(tmp_path) == []


def test_multichannel_model_output_is_refused(tmp_path, mr_nifti):
    def two_channels(x):
        return torch.cat([x, x], dim=1)

    with pytest.raises(ValueError, match="single-channel"):
        stream_upscale(mr_nifti, tmp_path / "sr.nii", two_channels, scale=(1, 1, 1), spatial_dims=2, progress=False)
    assert names(tmp_path) == ["mr.nii.gz"]


def test_modality_override_sets_the_window_rule(tmp_path, phantom):
    """A NIfTI read as CT gets the fixed HU window: values map through (-1024, 3071), not percentiles."""
    source = tmp_path / "ct.nii"
    write_volume(phantom.replace(array=phantom.array * 1000), source)
    stream_upscale(source, tmp_path / "sr.nii", lambda x: x, scale=(1, 1, 1), spatial_dims=2, modality=Modality.CT)
    np.testing.assert_allclose(nib.load(tmp_path / "sr.nii").get_fdata(), nib.load(source).get_fdata(), atol=1e-3)
    assert isinstance(read_volume(source), Volume)
