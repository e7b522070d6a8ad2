from __future__ import annotations

import numpy as np
import pydicom
import pytest
from nibabel.affines import apply_affine
from pydicom.data import get_testdata_file

from medsr.io import read_volume
from medsr.volume import Modality

SAMPLE = "JPGLosslessP14SV1_1s_1f_8b.dcm"  # grey echo, 768 rows x 1024 columns, lossless JPEG


@pytest.fixture(scope="module")
def sample() -> str:
    path = get_testdata_file(SAMPLE)
    if path is None:
        pytest.skip(f"pydicom test file {SAMPLE} is not available")
    return path


def test_ultrasound_is_cropped_to_its_region(sample):
    volume = read_volume(sample)

    assert volume.modality is Modality.US
    assert volume.meta["us_region"] == (14, 38, 1010, 758)  # columns 14..1010, rows 38..758, inclusive
    assert volume.spatial_shape == (997, 721, 1)
    np.testing.assert_allclose(volume.spacing[:2], (0.25476696592378157,) * 2)  # PhysicalDeltaX/Y 0.025477 cm
    pixels = pydicom.dcmread(sample).pixel_array
    np.testing.assert_array_equal(volume.array[0, :, :, 0].numpy(), pixels[38:759, 14:1011].T)
    assert volume.meta["dicom"].Modality == "US" and volume.meta["dicom_source"] == sample


def test_cropped_pixels_keep_their_place_in_space(sample):
    """The crop's voxel (0, 0) is where the full frame's pixel (column 14, row 38) was."""
    volume = read_volume(sample)
    spacing = volume.spacing[0]
    # An unrotated DICOM frame in RAS: columns run to -x (patient left), rows to -y (posterior).
    np.testing.assert_allclose(apply_affine(volume.affine, [0, 0, 0]), [-14 * spacing, -38 * spacing, 0.0])
    np.testing.assert_allclose(apply_affine(volume.affine, [10, 20, 0]), [-24 * spacing, -58 * spacing, 0.0])


def _with_regions(sample: str, tmp_path, regions: list[pydicom.Dataset]) -> str:
    ds = pydicom.dcmread(sample)
    ds.SequenceOfUltrasoundRegions = regions
    path = tmp_path / "us.dcm"
    ds.save_as(path)
    return str(path)


def _region(box: tuple[int, int, int, int], units: int = 3) -> pydicom.Dataset:
    region = pydicom.Dataset()
    region.RegionLocationMinX0, region.RegionLocationMinY0, region.RegionLocationMaxX1, region.RegionLocationMaxY1 = box
    region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = units
    region.PhysicalDeltaX = region.PhysicalDeltaY = 0.02
    return region


def test_doppler_region_before_the_image_is_skipped(sample, tmp_path):
    doppler = _region((0, 600, 1023, 767), units=4)  # seconds (x) against cm/s (y): not the image plane
    path = _with_regions(sample, tmp_path, [doppler, _region((100, 50, 499, 349))])

    volume = read_volume(path)

    assert volume.meta["us_region"] == (100, 50, 499, 349)
    assert volume.spatial_shape == (400, 300, 1)
    np.testing.assert_allclose(volume.spacing[:2], (0.2, 0.2))


def test_region_outside_the_image_is_refused(sample, tmp_path):
    path = _with_regions(sample, tmp_path, [_region((0, 0, 1024, 767))])  # columns 0..1023 exist, not 1024
    with pytest.raises(ValueError, match="outside the 1024 x 768 image"):
        read_volume(path)
