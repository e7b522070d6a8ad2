import numpy as np
import pytest
import torch

from medsr.data import PairDataset, crop_to_multiple, prepare_scan, slice_range
from medsr.degrade import Degradation, degrade
from medsr.intensity import default_window, normalize
from medsr.volume import Modality, Volume


@pytest.fixture
def volume(rng) -> Volume:
    return Volume(torch.from_numpy(rng.random((1, 40, 36, 12), dtype=np.float32)), np.eye(4), Modality.MR)


def dataset(volume, **kwargs) -> PairDataset:
    options = {"slices": (2, 8), "patch": 16, "length": 10, "seed": 0, "min_foreground": 0.0} | kwargs
    return PairDataset([volume], Degradation((2, 2, 1)), **options)


def test_pairs_are_aligned_crops_of_the_whole_scan_lr(volume):
    """Every LR patch is a crop of the LR simulated from the whole slab, and its HR partner the matching block."""
    pair = dataset(volume)[3]
    assert pair.lr.shape == (1, 8, 8) and pair.hr.shape == (1, 16, 16)
    lr = degrade(slice_range(volume, slices=(2, 8)), Degradation((2, 2, 1))).array[0]
    hr = volume.array[0, :, :, 2:8]
    found = False
    for variant_lr, variant_hr in [(pair.lr[0], pair.hr[0]), (pair.lr[0].T, pair.hr[0].T)]:
        for flip in [(), (0,), (1,), (0, 1)]:
            lr_patch, hr_patch = (
                variant_lr.flip(flip) if flip else variant_lr,
                variant_hr.flip(flip) if flip else variant_hr,
            )
            for k in range(6):
                for x in range(lr.shape[0] - 7):
                    for y in range(lr.shape[1] - 7):
                        if torch.equal(lr[x : x + 8, y : y + 8, k], lr_patch):
                            found |= torch.equal(hr[2 * x : 2 * x + 16, 2 * y : 2 * y + 16, k], hr_patch)
    assert found


def test_patches_are_reproducible_and_change_with_epoch(volume):
    data = dataset(volume)
    first = data[4]
    assert torch.equal(dataset(volume)[4].hr, first.hr)
    data.set_epoch(1)
    assert not torch.equal(data[4].hr, first.hr)


def test_foreground_sampling_avoids_air():
    array = torch.zeros(1, 64, 64, 4)
    array[:, 32:] = 1.0  # tissue in one half only: a random patch is mostly air half the time
    data = dataset(Volume(array, np.eye(4)), slices=(0, 4), min_foreground=0.5, length=20)
    assert all((data[i].hr > 0.05).float().mean() >= 0.5 for i in range(20))


def test_crop_to_multiple_and_slice_range_keep_geometry(volume):
    cropped = crop_to_multiple(volume.replace(array=volume.array[:, :39, :35]), scale=(2, 2, 1))
    assert cropped.spatial_shape == (38, 34, 12)
    slab = slice_range(volume, slices=(3, 7))
    np.testing.assert_allclose(slab.affine[:3, 3], volume.affine[:3, :3] @ [0, 0, 3] + volume.affine[:3, 3])
    with pytest.raises(ValueError, match="outside"):
        slice_range(volume, slices=(5, 20))


def test_bad_settings_are_rejected(volume):
    with pytest.raises(ValueError, match="multiple of the scale"):
        dataset(volume, patch=15)
    with pytest.raises(ValueError, match="integer in-plane"):
        PairDataset([volume], Degradation((1.5, 2, 1)), slices=(0, 4), patch=16, length=1)


def test_prepare_scan_normalises_with_the_window_inference_will_see(volume):
    """Inference computes the window on its (LR) input; training pairs must use that same window."""
    degradation = Degradation((2, 2, 1))
    prepared = prepare_scan(volume.replace(array=volume.array[:, :39] * 300 + 20), degradation)
    assert prepared.spatial_shape == (38, 36, 12)
    lr_physical = degrade(
        crop_to_multiple(volume.replace(array=volume.array[:, :39] * 300 + 20), scale=(2, 2, 1)), degradation
    )
    expected = normalize(lr_physical, default_window(lr_physical)).array
    torch.testing.assert_close(degrade(prepared, degradation).array, expected, atol=1e-5, rtol=0)
