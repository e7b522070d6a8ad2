import itertools

import numpy as np
import pytest
import torch

from medsr.data import (
    Pair,
    PairDataset,
    crop_to_multiple,
    find_scans,
    prepare_scan,
    slice_range,
    split_scans,
    zoomed,
)
from medsr.degrade import Degradation, degrade
from medsr.intensity import Window, default_window, normalize
from medsr.io import read_volume, write_volume
from medsr.volume import Modality, Volume, swap_into_k
from tests.test_dicom import _write_series


@pytest.fixture
def volume(rng) -> Volume:
    return Volume(torch.from_numpy(rng.random((1, 40, 36, 12), dtype=np.float32)), np.eye(4), Modality.MR)


X2 = Degradation((2, 2, 1))


def dataset(volume, degradation=X2, slices=(2, 8), axis=2, **kwargs) -> PairDataset:
    """Pairs from the slab ``slices`` of ``volume`` along ``axis`` (None: all of it), as training cuts them."""
    region = volume if slices is None else slice_range(volume, slices=slices, axis=axis)
    options = {"patch": 16, "length": 10, "seed": 0, "min_foreground": 0.0} | kwargs
    return PairDataset([region], degradation, **options)


def constant(value: float, shape=(1, 64, 64, 3), **kwargs) -> Volume:
    return Volume(torch.full(shape, value), np.eye(4), **kwargs)


def is_aligned_crop(pair, lr: torch.Tensor, hr: torch.Tensor, scale) -> bool:
    """Whether some flip/transpose of the pair is an LR crop of ``lr`` (C, I, J, K) with ``hr``'s matching block."""
    pair_lr, pair_hr = (x if x.ndim == 4 else x[..., None] for x in pair)
    size = pair_lr.shape[1:]
    for flips, transpose in itertools.product(itertools.product([False, True], repeat=3), [False, True]):
        axes = [axis for axis, flip in zip((1, 2, 3), flips, strict=True) if flip]
        lr_patch, hr_patch = (x.flip(axes) for x in (pair_lr, pair_hr))
        if transpose:
            lr_patch, hr_patch = lr_patch.transpose(1, 2), hr_patch.transpose(1, 2)
        if lr_patch.shape[1:] != size:
            continue
        for corner in itertools.product(*(range(n - p + 1) for n, p in zip(lr.shape[1:], size, strict=True))):
            box = tuple(slice(c, c + p) for c, p in zip(corner, size, strict=True))
            hr_box = tuple(slice(c * s, (c + p) * s) for c, p, s in zip(corner, size, scale, strict=True))
            if torch.equal(lr[(slice(None), *box)], lr_patch) and torch.equal(hr[(slice(None), *hr_box)], hr_patch):
                return True
    return False


def test_pairs_are_aligned_crops_of_the_whole_scan_lr(volume):
    """Every LR patch is a crop of the LR simulated from the whole slab, and its HR partner the matching block."""
    pair = dataset(volume)[3]
    assert pair.lr.shape == (1, 8, 8) and pair.hr.shape == (1, 16, 16)
    lr = degrade(slice_range(volume, slices=(2, 8)), Degradation((2, 2, 1))).array
    assert is_aligned_crop(pair, lr, volume.array[..., 2:8], (2, 2, 1))


@pytest.mark.parametrize("factors, patch, lr_shape", [((1, 1, 2), 8, (8, 8, 4)), ((2, 2, 2), (8, 4, 6), (4, 2, 3))])
def test_3d_pairs_are_aligned_blocks(rng, factors, patch, lr_shape):
    volume = Volume(torch.from_numpy(rng.random((1, 16, 12, 14), dtype=np.float32)), np.eye(4), Modality.MR)
    data = dataset(volume, Degradation(factors), slices=(2, 14), patch=patch, spatial_dims=3)
    lr = degrade(slice_range(volume, slices=(2, 14)), Degradation(factors)).array
    for index in range(3):
        pair = data[index]
        assert pair.lr.shape == (1, *lr_shape) and pair.hr.shape == (
            1,
            *(n * f for n, f in zip(lr_shape, factors, strict=True)),
        )
        assert is_aligned_crop(pair, lr, volume.array[..., 2:14], factors)


def test_through_plane_2d_pairs_are_aligned_ik_and_jk_planes(rng):
    """Factors (1, 1, c) with a 2D model: each item is an (i, k) or a (j, k) plane of the slab and its LR."""
    volume = Volume(torch.from_numpy(rng.random((1, 16, 12, 14), dtype=np.float32)), np.eye(4), Modality.MR)
    degradation = Degradation((1, 1, 2), slice_profile="gaussian")
    data = dataset(volume, degradation, slices=(2, 14), patch=(8, 6))
    lr = degrade(slice_range(volume, slices=(2, 14)), degradation).array
    orientations = set()
    for index in range(8):
        pair = data[index]
        assert pair.lr.shape == (1, 8, 3) and pair.hr.shape == (1, 8, 6)
        matches = [
            axis
            for axis in (1, 2)  # the plane's normal: i (a (j, k) plane) or j (an (i, k) plane)
            if is_aligned_crop(
                Pair(pair.lr.unsqueeze(axis), pair.hr.unsqueeze(axis)), lr, volume.array[..., 2:14], (1, 1, 2)
            )
        ]
        assert matches
        orientations.update(matches)
    assert orientations == {1, 2}


def test_region_split_along_i_draws_only_from_that_region(rng):
    """``axis=0``: the slab [8, 16) along i; every HR patch comes from it, with its LR simulated from it alone."""
    volume = Volume(torch.from_numpy(rng.random((1, 24, 20, 1), dtype=np.float32)), np.eye(4), Modality.MR)
    data = dataset(volume, slices=(8, 16), patch=8, axis=0)
    region = slice_range(volume, slices=(8, 16), axis=0)
    assert region.spatial_shape == (8, 20, 1) and np.allclose(region.affine[:3, 3], (8, 0, 0))
    lr = degrade(region, X2).array
    for index in range(3):
        assert is_aligned_crop(data[index], lr, region.array, (2, 2, 1))


def test_2d_pairs_from_a_2d_image(rng):
    image = Volume(torch.from_numpy(rng.random((1, 32, 24, 1), dtype=np.float32)), np.eye(4), Modality.MR)
    pair = dataset(image, slices=(0, 1), patch=8)[0]
    assert pair.lr.shape == (1, 4, 4) and pair.hr.shape == (1, 8, 8)
    assert is_aligned_crop(pair, degrade(image, Degradation((2, 2, 1))).array, image.array, (2, 2, 1))


def test_patches_are_reproducible_and_change_with_epoch(volume):
    data = dataset(volume)
    first = data[4]
    assert torch.equal(dataset(volume)[4].hr, first.hr)
    data.set_epoch(1)
    assert not torch.equal(data[4].hr, first.hr)


@pytest.mark.parametrize(
    "degradation",
    [
        Degradation((2, 2, 1), noise="rician", noise_sigma=5.0),
        Degradation((2, 2, 1), modality="CT", noise="gaussian", noise_sigma=10.0),
        Degradation((2, 2, 1), modality="DX", noise="poisson", photons=100.0),
        Degradation((2, 2, 1), modality="US", noise="speckle", psf_fwhm=(3.0, 2.0, 0.0)),
    ],
    ids=lambda d: d.noise,
)
def test_random_noise_is_reproducible_per_item_and_changes_with_epoch(degradation):
    scan = constant(100.0, modality=degradation.modality)
    data = dataset(scan, degradation, slices=(0, 3))
    first = data[2]
    assert first.lr.shape == (1, 8, 8) and first.lr.std() > 0
    assert torch.equal(dataset(scan, degradation, slices=(0, 3))[2].lr, first.lr)
    data.set_epoch(1)
    assert not torch.equal(data[2].lr, first.lr)
    assert torch.equal(data[2].hr, first.hr)  # a constant scan: only the noise tells epochs apart


@pytest.mark.parametrize(
    "degradation, modality, std",
    [
        (Degradation((2, 2, 1), noise="rician", noise_sigma=2.0), "MR", 0.02),  # high SNR: Rician ~ N(x, sigma^2)
        (Degradation((2, 2, 1), modality="DX", noise="poisson", photons=400.0), "DX", 0.5 / 20),  # x / sqrt(N)
    ],
)
def test_pointwise_noise_has_its_level_in_physical_units(degradation, modality, std):
    """Scan at 50 (physical) normalised with window (0, 100) to 0.5: noise of sigma 2 must show as 0.02."""
    scan = constant(0.5, modality=modality, meta={"window": Window(0.0, 100.0)})
    lr = torch.stack([dataset(scan, degradation, slices=(0, 3), patch=32)[i].lr for i in range(8)])  # (8, 1, 16, 16)
    assert lr.mean().item() == pytest.approx(0.5, abs=0.005)
    assert lr.std().item() == pytest.approx(std, rel=0.1)


def test_correlated_ct_noise_has_no_patch_border_artefact():
    """Each patch is cut from a larger degraded window, so noise at its border is like noise inside it."""
    ct = Degradation((2, 2, 1), modality="CT", noise="gaussian", noise_sigma=10.0)
    data = dataset(constant(0.0, modality=Modality.CT), ct, slices=(0, 3), patch=16, length=400)
    lr = torch.stack([data[i].lr[0] for i in range(400)])  # (400, 8, 8) in HU
    spread = lr.std(dim=0)  # per position, over items
    border = torch.cat([spread[0], spread[-1], spread[1:-1, 0], spread[1:-1, -1]])
    assert border.mean().item() == pytest.approx(spread[2:-2, 2:-2].mean().item(), rel=0.05)
    assert lr.std().item() == pytest.approx(10.0, rel=0.03)  # the noise model's gain is exact at every voxel
    neighbours = torch.corrcoef(torch.stack([lr[:, 3:5, 3].flatten(), lr[:, 3:5, 4].flatten()]))[0, 1]
    assert neighbours > 0.3  # in-plane grain, as degrade's CT model makes it


def test_foreground_sampling_avoids_air():
    array = torch.zeros(1, 64, 64, 4)
    array[:, 32:] = 1.0  # tissue in one half only: a random patch is mostly air half the time
    data = dataset(Volume(array, np.eye(4)), slices=(0, 4), min_foreground=0.5, length=20)
    assert all((data[i].hr > 0.05).float().mean() >= 0.5 for i in range(20))


def test_find_scans_lists_files_and_dicom_series(tmp_path):
    write_volume(Volume(torch.rand(1, 6, 5, 4), np.eye(4)), tmp_path / "head.nii.gz")
    write_volume(Volume(torch.rand(1, 6, 5, 1) * 255, np.eye(4), meta={"pixel_dtype": "uint8"}), tmp_path / "x.png")
    _write_series(tmp_path / "patient" / "study" / "series", n=3)  # files without a suffix
    (tmp_path / "notes.txt").write_text("not a scan")
    (tmp_path / ".hidden.nii.gz").write_bytes(b"")
    scans = find_scans(tmp_path)
    assert scans == [tmp_path / "head.nii.gz", tmp_path / "patient" / "study" / "series", tmp_path / "x.png"]
    assert [read_volume(scan).spatial_shape[2] for scan in scans] == [4, 3, 1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no scans"):
        find_scans(tmp_path / "empty")


def test_split_is_by_scan_reproducible_and_order_free(tmp_path):
    paths = [tmp_path / f"scan{i}.nii.gz" for i in range(10)]
    train, val, test = split_scans(paths, seed=3)
    assert (len(train), len(val), len(test)) == (8, 1, 1)
    assert sorted(train + val + test) == paths  # every scan in exactly one set
    assert split_scans(paths[::-1], seed=3) == (train, val, test)
    assert any(split_scans(paths, seed=seed) != (train, val, test) for seed in range(4, 8))
    assert [len(part) for part in split_scans(paths[:2])] == [1, 1, 0]
    assert [len(part) for part in split_scans(paths[:1], fractions=(1, 0, 0))] == [1, 0, 0]
    with pytest.raises(ValueError, match="by region"):
        split_scans(paths[:1])
    with pytest.raises(ValueError, match="more than once"):
        split_scans([paths[0], paths[1], tmp_path / "." / "scan0.nii.gz"])
    with pytest.raises(ValueError, match="fractions"):
        split_scans(paths, fractions=(0.5, 0.2, 0.2))


def test_crop_to_multiple_and_slice_range_keep_geometry(volume):
    cropped = crop_to_multiple(volume.replace(array=volume.array[:, :39, :35]), scale=(2, 2, 1))
    assert cropped.spatial_shape == (38, 34, 12)
    slab = slice_range(volume, slices=(3, 7))
    np.testing.assert_allclose(slab.affine[:3, 3], volume.affine[:3, :3] @ [0, 0, 3] + volume.affine[:3, 3])
    with pytest.raises(ValueError, match="outside"):
        slice_range(volume, slices=(5, 20))


@pytest.mark.parametrize(
    "degradation, options, message",
    [
        (Degradation((2, 2, 1)), {"patch": 15}, "multiple of the scale"),
        (Degradation((2, 2, 2)), {"patch": (8, 8), "spatial_dims": 3}, "needs 1 or 3 sizes"),
        (Degradation((2, 2, 1)), {"patch": 48}, "larger than scan 0"),
        (Degradation((1.5, 2, 1)), {}, "integer factors"),
        (Degradation((2, 2, 2)), {}, r"\(a, b, 1\) or \(1, 1, c\)"),
    ],
)
def test_bad_settings_are_rejected(volume, degradation, options, message):
    with pytest.raises(ValueError, match=message):
        dataset(volume, degradation, **options)


def test_prepare_scan_normalises_with_the_window_inference_will_see(volume):
    """Inference computes the window on its (LR) input; training pairs must use that same window."""
    degradation = Degradation((2, 2, 1))
    prepared = prepare_scan(volume.replace(array=volume.array[:, :39] * 300 + 20), degradation)
    assert prepared.spatial_shape == (38, 36, 12)
    lr_physical = degrade(
        crop_to_multiple(volume.replace(array=volume.array[:, :39] * 300 + 20), scale=(2, 2, 1)), degradation
    )
    assert prepared.meta["window"] == default_window(lr_physical)
    expected = normalize(lr_physical, default_window(lr_physical)).array
    torch.testing.assert_close(degrade(prepared, degradation).array, expected, atol=1e-5, rtol=0)
    rician, scan = Degradation((2, 2, 1), noise="rician", noise_sigma=5.0), volume.replace(array=volume.array * 300)
    assert prepare_scan(scan, rician).meta["window"] == prepare_scan(scan, rician).meta["window"]  # a fixed draw


def test_a_single_plane_across_the_slices_gives_only_its_own_orientation(rng):
    """An (i, k) image (J = 1, e.g. a coronal image turned by ``swap_into_k``) trains a through-plane model: every
    item is an (i, k) patch of it."""
    image = Volume(torch.from_numpy(rng.random((1, 16, 12, 1), dtype=np.float32)), np.eye(4), Modality.MR)
    turned = swap_into_k(image, 1)
    assert turned.spatial_shape == (16, 1, 12)
    degradation = Degradation((1, 1, 2), slice_profile="gaussian")
    data = dataset(turned, degradation, slices=None, patch=(8, 6))
    lr = degrade(turned, degradation).array
    for index in range(6):
        pair = data[index]
        assert pair.hr.shape == (1, 8, 6)
        assert is_aligned_crop(Pair(pair.lr.unsqueeze(2), pair.hr.unsqueeze(2)), lr, turned.array, (1, 1, 2))
    with pytest.raises(ValueError, match="larger than scan"):
        dataset(turned, degradation, slices=None, patch=(20, 6))


def test_a_zoomed_copy_keeps_the_field_of_view_and_world_positions():
    """A ramp in world x, on a grid 2x coarser in i, j and k: each new voxel holds the ramp at its own centre."""
    affine = np.diag([0.8, 0.8, 1.2, 1.0])
    affine[:3, 3] = (10.0, -4.0, 3.0)
    x = 10.0 + 0.8 * torch.arange(32.0)  # world x of each voxel centre along i
    ramp = Volume(x.reshape(1, 32, 1, 1).expand(1, 32, 24, 16).contiguous(), affine, Modality.MR)
    coarse = zoomed(ramp, 2.0)
    assert coarse.spatial_shape == (16, 12, 8) and coarse.spacing == pytest.approx((1.6, 1.6, 2.4))
    corners = [ramp.affine @ [-0.5, -0.5, -0.5, 1], coarse.affine @ [-0.5, -0.5, -0.5, 1]]
    np.testing.assert_allclose(*corners)  # the same field of view
    centres = coarse.affine[0, 0] * np.arange(16) + coarse.affine[0, 3]
    np.testing.assert_allclose(coarse.array[0, 1:-1, 5, 4].numpy(), centres[1:-1], atol=1e-4)
    assert zoomed(ramp, 1.0) is ramp


def test_a_finer_copy_is_the_zero_filled_interpolation_that_k_space_truncation_undoes():
    """zoom 0.5: a grid 2x finer over the same field of view, band-limited (sinc): truncating its k-space by 2 gives
    the scan back (odd sizes: no Nyquist bin to split), and a sinusoid of the scan's grid is sampled exactly at the
    new voxel centres."""
    from medsr.degrade.sampling import kspace_truncate

    affine = np.diag([0.8, 0.8, 1.2, 1.0])
    affine[:3, 3] = (10.0, -4.0, 3.0)
    scan = Volume(torch.rand(1, 21, 15, 7, dtype=torch.float64), affine, Modality.MR)
    fine = zoomed(scan, 0.5)
    assert fine.spatial_shape == (42, 30, 14) and fine.spacing == pytest.approx((0.4, 0.4, 0.6))
    corners = [scan.affine @ [-0.5, -0.5, -0.5, 1], fine.affine @ [-0.5, -0.5, -0.5, 1]]
    np.testing.assert_allclose(*corners)  # the same field of view
    torch.testing.assert_close(kspace_truncate(fine.array, (2, 2, 2)), scan.array)
    i = torch.arange(20.0, dtype=torch.float64)
    wave = Volume(torch.cos(2 * torch.pi * 3 * i / 20).reshape(1, 20, 1, 1), affine)  # 3 cycles across i
    fine_i = fine.affine[0, 0] * np.arange(40) + fine.affine[0, 3]  # world x of the new centres
    expected = np.cos(2 * np.pi * 3 * (fine_i - 10.0) / (0.8 * 20))
    np.testing.assert_allclose(zoomed(wave, 0.5).array[0, :, 0, 0].numpy(), expected, atol=1e-9)
