from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from medsr.intensity import CT_WINDOW_HU, Window, default_window, percentiles, volume_range, window_from_slices
from medsr.samples import sample_path
from medsr.volume import Modality, Volume

Q = (0, 0.5, 1, 12.3, 50, 99.5, 99.9, 100)


def by_slice(array: np.ndarray):
    """The slices of ``array`` along its last axis, as a fresh iterator per call (one per pass)."""
    return lambda: (array[..., k] for k in range(array.shape[-1]))


@pytest.mark.parametrize(
    "make",
    [
        lambda rng: rng.standard_normal((30, 20, 7)).astype(np.float32),
        lambda rng: rng.integers(-3, 4, (25, 10, 9)).astype(np.float32),  # ties at every rank
        lambda rng: np.concatenate([np.zeros(900), -np.zeros(500), rng.random(77) * 1e-38]).astype(np.float32)[:, None],
        lambda rng: rng.exponential(size=(64, 64, 10)).astype(np.float32) - 0.2,
        lambda rng: rng.standard_normal((11, 13, 5)) * 1e30,  # float64: four passes
        lambda rng: np.full((3, 1), 7.0, dtype=np.float32),
    ],
    ids=["normal", "ties", "zeros-and-denormals", "skewed", "float64", "constant"],
)
def test_percentiles_equal_numpy_bitwise(rng, make):
    array = make(rng)
    assert percentiles(by_slice(array), Q) == list(np.percentile(array, Q))


def test_percentiles_of_a_real_scan(rng):
    """Colin27 is uint8 (about 90 levels): nearly every rank is a tie."""
    array = np.asarray(nib.load(sample_path("colin27")).dataobj, dtype=np.float32)[:, :, 60:100]
    assert percentiles(by_slice(array), Q) == list(np.percentile(array, Q))


def test_percentiles_refuse_nan():
    array = np.ones((4, 4, 3), dtype=np.float32)
    array[1, 2, 2] = np.nan
    with pytest.raises(ValueError, match="1 voxels are NaN or infinite"):
        percentiles(by_slice(array), Q)


def test_default_window_is_the_window_of_its_slices(phantom):
    array = phantom.array[0].numpy()
    assert default_window(phantom) == Window(*np.percentile(array, (0.5, 99.9)))
    assert window_from_slices("MR", by_slice(array)) == default_window(phantom)


def test_ct_window_is_fixed_and_reads_nothing(phantom):
    def unreadable():
        raise AssertionError("a CT window must not read the scan")

    assert window_from_slices("CT", unreadable) == Window(*CT_WINDOW_HU, floor=-1024)
    assert default_window(phantom.replace(modality="CT")) == Window(*CT_WINDOW_HU, floor=-1024)


def test_ct_padding_below_air_is_seen_as_air():
    """Scanners pad outside the reconstruction circle with -2000 or -3024 HU: the model sees -1024 (air) there."""
    window = default_window(Volume(torch.tensor([[[[-3024.0]], [[-1024.0]], [[40.0]]]]), np.eye(4), Modality.CT))
    unit = window.to_unit(torch.tensor([-3024.0, -1024.0, 40.0, 3071.0]))
    torch.testing.assert_close(unit, torch.tensor([0.0, 0.0, 1064 / 4095, 1.0]))
    assert Window(0.0, 1.0).to_unit(torch.tensor([-5.0])) == -5.0  # other windows keep values outside


def test_constant_volume_is_refused(phantom):
    with pytest.raises(ValueError, match="constant"):
        default_window(Volume(torch.ones((1, 4, 4, 4)), phantom.affine, "MR"))


def test_volume_range_is_the_percentiles_numpy_gives():
    values = np.random.default_rng(0).normal(50, 10, (1, 30, 20, 7)).astype(np.float32)
    low, high = volume_range(Volume(torch.from_numpy(values), np.eye(4), Modality.MR))
    np.testing.assert_allclose([low, high], np.percentile(values, [0.5, 99.9]), rtol=1e-5)
