"""Training pairs from real scans: find and split scans, then cut aligned LR/HR patches in 2D or 3D.

The LR of each scan is simulated from the whole HR scan (or the slab of it given by ``slices``), not per
patch, so patches carry exactly what a real LR acquisition of that region contains, Gibbs ringing from distant
edges included. Train, validation and test data are kept apart by scan (:func:`split_scans`) or, with a single
scan, by a range of slices along one axis (``data.split_axis``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from scipy.interpolate import PchipInterpolator
from scipy.ndimage import gaussian_filter
from torch.utils.data import Dataset

from medsr.degrade import Degradation, degrade
from medsr.degrade.noise import poisson, quanta_reference, rician
from medsr.degrade.sampling import FWHM_PER_SIGMA, kspace_upsample
from medsr.intensity import Window, denormalize, normalize, volume_range, window_from_range
from medsr.io import IMAGE_SUFFIXES, NIFTI_SUFFIXES, is_dicom_file
from medsr.volume import Volume, crop, integer_scale, scale_affine

FOREGROUND_LEVEL = 0.05  # normalised intensity above which a voxel counts as tissue, not air
FOREGROUND_TRIES = 20  # patch draws per item to meet ``min_foreground``; the last draw is kept regardless
WINDOW_MARGIN = 4  # LR voxels around a patch degraded on the fly; >= the reach of CT noise grain (3 LR voxels)
PHYSICAL = Window(0.0, 1.0)  # the window of a volume that was never normalised (no ``meta['window']``)


class Pair(NamedTuple):
    """One training example. DataLoader's default collate keeps the field names."""

    lr: torch.Tensor  # (C, *patch / scale)
    hr: torch.Tensor  # (C, *patch)


def find_scans(folder: Path) -> list[Path]:
    """The scans under ``folder``, sorted: NIfTI and PNG/TIFF files, and DICOM series folders.

    Every folder that directly holds DICOM files (``.dcm``, ``.dicom``, ``.ima``, or any other file with the
    'DICM' marker, since scanners often write files without a suffix) is one series, so a tree
    ``patient/study/series/*`` gives one scan per series. Hidden files and folders and DICOMDIR are skipped. A scan
    stored twice (a series and its NIfTI conversion) is found twice: keep one copy, or the split may leak.

    Raises:
        ValueError: ``folder`` is not a folder, or holds no scan.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    scans = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        names = [n for n in files if not n.startswith(".") and n.upper() != "DICOMDIR"]
        scans += [Path(root) / n for n in names if n.lower().endswith(NIFTI_SUFFIXES + IMAGE_SUFFIXES)]
        if any(is_dicom_file(Path(root) / n) for n in names):
            scans.append(Path(root))
    if not scans:
        raise ValueError(f"{folder}: no scans found (NIfTI or PNG/TIFF files, or folders of DICOM files)")
    return sorted(scans)


def split_scans(
    paths: Sequence[Path], *, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> tuple[list[Path], list[Path], list[Path]]:
    """Split scans into train, validation and test sets; a scan is never in two sets.

    The split depends only on the set of paths and ``seed``, not on their order: the sorted paths are shuffled
    with ``default_rng(seed)``. Validation and test get ``round(fraction * n)`` scans, at least one each when
    their fraction is > 0, and training the rest, at least one (test gives way first, then validation). So 3 scans
    give one per set, and 2 scans one for training, one for validation and none for test (score a held-out slab
    instead). One scan cannot be split by scan: split it by region (``data.train_slices``, ``val_slices``,
    ``test_slices``).

    Args:
        paths: The scans, e.g. from :func:`find_scans`; each listed once.
        fractions: Shares of train, validation and test, each >= 0, summing to 1; train's must be > 0.
        seed: Seed of the shuffle.

    Returns:
        The train, validation and test paths, each sorted.

    Raises:
        ValueError: A path is listed twice, ``fractions`` are invalid, or there are too few scans.
    """
    paths = sorted(Path(p) for p in paths)
    repeated = sorted(str(p) for p, count in Counter(p.resolve() for p in paths).items() if count > 1)
    if repeated:
        raise ValueError(f"scans listed more than once, which would put them in two sets: {repeated}")
    if len(fractions) != 3 or min(fractions) < 0 or fractions[0] <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be 3 shares (train, val, test) >= 0 summing to 1, train > 0; got {fractions}")
    n = len(paths)
    n_val, n_test = (max(1, round(f * n)) if f > 0 else 0 for f in fractions[1:])
    if n == 0 or (n == 1 and n_val + n_test):
        found = f"one scan ({paths[0]})" if paths else "no scans"
        raise ValueError(
            f"{found} cannot be split by scan; split one scan by region with data.train_slices, val_slices, test_slices"
        )
    n_test = min(n_test, max(0, n - 1 - n_val))
    n_val = min(n_val, n - 1 - n_test)
    shuffled = [paths[i] for i in np.random.default_rng(seed).permutation(n)]
    val, test, train = shuffled[:n_val], shuffled[n_val : n_val + n_test], shuffled[n_val + n_test :]
    return sorted(train), sorted(val), sorted(test)


def crop_to_multiple(volume: Volume, *, scale: Sequence[int]) -> Volume:
    """Drop trailing voxels so each axis is a multiple of its scale; the affine is unchanged (same origin)."""
    return crop(volume, (0, 0, 0), [n - n % s for n, s in zip(volume.spatial_shape, scale, strict=True)])


def prepare_scan(volume: Volume, degradation: Degradation) -> Volume:
    """An HR scan ready for training or evaluation: cropped to the scale, normalised with its LR's window.

    The window is computed on the simulated LR scan because that is all inference sees
    (``infer.super_resolve`` computes it on its input), so training, evaluation and use agree exactly. A random
    degradation's window comes from one LR draw with a fixed seed, since inference sees a noisy LR too. The window
    is kept in ``meta['window']`` so that :class:`PairDataset` adds noise in physical units; the LR's spacing and
    intensity range in ``meta['lr_spacing']`` and ``meta['lr_range']`` (what ``inputs.training_inputs`` records).
    """
    cropped = crop_to_multiple(volume, scale=integer_scale(degradation.factors))
    lr = degrade(cropped, degradation, rng=np.random.default_rng(0))
    lr_range = volume_range(lr)
    window = window_from_range(lr.modality, lr_range)  # default_window(lr), from the range computed once
    floor = -np.inf if window.floor is None else window.floor  # CT: what the model sees of padding is air
    meta = {"window": window, "lr_spacing": lr.spacing, "lr_range": tuple(max(v, floor) for v in lr_range)}
    return normalize(cropped, window).replace(meta={**cropped.meta, **meta})


def slice_range(volume: Volume, *, slices: tuple[int, int], axis: int = 2) -> Volume:
    """Slab ``[start, stop)`` along ``axis`` (0 = i, 1 = j, 2 = k), with the affine moved to its first voxel."""
    start, stop = slices
    size = volume.spatial_shape[axis]
    if not 0 <= start < stop <= size:
        raise ValueError(f"slices [{start}, {stop}) outside the volume's {size} voxels along {'ijk'[axis]}")
    first, last = [0, 0, 0], list(volume.spatial_shape)
    first[axis], last[axis] = start, stop
    return crop(volume, first, last)


GAMMA_COPIES = 5  # intensity-augmented copies of each training scan (data.gamma)


def gamma_copies(volume: Volume, gamma: tuple[float, float]) -> list[Volume]:
    """The scan at ``GAMMA_COPIES`` gammas log-spaced in ``[low, high]``: its normalised intensities (from
    :func:`prepare_scan`) clamped at 0 and raised to each power; ``(1, 1)`` gives ``[volume]``.

    A random gamma is the contrast augmentation of e.g. nnU-Net and TorchIO's ``RandomGamma``: it bends the
    intensity curve so that one T1 scan also shows the model darker and brighter tissue contrasts. Each copy is
    degraded as a whole later (its LR is exact), so copies are made here rather than per patch.

    >>> import torch
    >>> from medsr.volume import Volume
    >>> copies = gamma_copies(Volume(torch.full((1, 2, 2, 1), 0.25), torch.eye(4)), (0.5, 2.0))
    >>> [round(float(c.array.max()), 4) for c in copies]
    [0.5, 0.3752, 0.25, 0.1408, 0.0625]
    """
    low, high = gamma
    if (low, high) == (1.0, 1.0):
        return [volume]
    powers = np.exp(np.linspace(np.log(low), np.log(high), GAMMA_COPIES))
    return [volume.replace(array=volume.array.clamp(min=0) ** float(p)) for p in powers]


CONTRAST_KNOTS = 6  # control points of a random intensity curve (data.contrasts), evenly spaced over [0, 1]


def contrast_copies(volume: Volume, count: int, rng: np.random.Generator) -> list[Volume]:
    """``count`` copies of the scan, each with a random smooth intensity curve: a shape-preserving cubic (PCHIP)
    through 0 at 0 and ``CONTRAST_KNOTS - 1`` levels drawn from U(0.05, 1) at 0.2, 0.4, ..., 1 of the window,
    applied to the normalised intensities (from :func:`prepare_scan`) clamped to [0, 1].

    The curves need not be monotonic, so tissues swap brightness as they do between T1, T2 and proton-density
    scans, while air stays dark: SynthSR's random contrasts (Iglesias et al. 2023), made from the scan's own
    intensities instead of a segmentation, so its texture and noise are kept. Each copy is degraded as a whole
    later, like :func:`gamma_copies`.

    >>> import torch
    >>> from medsr.volume import Volume
    >>> ramp = Volume(torch.linspace(0, 1, 6).reshape(1, 6, 1, 1), torch.eye(4))
    >>> [round(v, 2) for v in contrast_copies(ramp, 1, np.random.default_rng(0))[0].array.flatten().tolist()]
    [0.0, 0.66, 0.31, 0.09, 0.07, 0.82]
    """
    knots = np.linspace(0.0, 1.0, CONTRAST_KNOTS)
    intensities = volume.array.clamp(0, 1).numpy()
    copies = []
    for _ in range(count):
        curve = PchipInterpolator(knots, np.concatenate([[0.0], rng.uniform(0.05, 1.0, CONTRAST_KNOTS - 1)]))
        copies.append(volume.replace(array=torch.from_numpy(curve(intensities).astype(np.float32))))
    return copies


def zoomed(volume: Volume, zoom: float) -> Volume:
    """The scan on a grid ``zoom`` times coarser along every axis longer than one voxel (the same field of view),
    ``zoom`` 1 gives the scan itself. Coarser (``zoom`` > 1): antialiased bilinear resampling, separable; a copy at
    1.5 makes a model that learnt on 1 mm voxels also meet anatomy, and a blur given in mm, at 1.5 mm voxels: the
    sizes other scanners' voxels have. Finer (``zoom`` < 1): zero-filled k-space (sinc interpolation,
    ``degrade.kspace_upsample``), as MR scanners interpolate their images ("ZIP") and as any scan whose pixels are
    finer than its resolution looks.

    >>> import torch
    >>> from medsr.volume import Volume
    >>> coarse = zoomed(Volume(torch.rand(1, 30, 24, 1), np.eye(4)), 1.5)
    >>> coarse.spatial_shape, coarse.spacing
    ((20, 16, 1), (1.5, 1.5, 1.0))
    >>> zoomed(Volume(torch.rand(1, 30, 24, 1), np.eye(4)), 0.5).spatial_shape
    (60, 48, 1)
    """
    if zoom == 1:
        return volume
    channels, size_i, size_j, size_k = volume.array.shape
    shape = [max(1, round(n / zoom)) if n > 1 else 1 for n in (size_i, size_j, size_k)]
    if zoom < 1:
        array = kspace_upsample(volume.array, shape)
    else:
        resize = functools.partial(
            torch.nn.functional.interpolate, mode="bilinear", antialias=True, align_corners=False
        )
        array = resize(volume.array.permute(3, 0, 1, 2), size=shape[:2]).permute(1, 2, 3, 0)  # (i, j) of each k
        if shape[2] != size_k:  # then k, on (j, k) planes
            planes = array.reshape(channels * shape[0], 1, shape[1], size_k)
            array = resize(planes, size=shape[1:]).reshape(channels, *shape)
    factors = [m / n for m, n in zip(shape, (size_i, size_j, size_k), strict=True)]
    return volume.replace(array=array.contiguous(), affine=scale_affine(volume.affine, factors))


def blurred(volume: Volume, sigma: float) -> Volume:
    """The scan smoothed by a Gaussian of ``sigma`` voxels along every axis longer than one voxel (reflected at the
    edges); ``sigma`` 0 gives the scan itself. Copies at 0.6 and 1.2 voxels show a model objects whose detail stops
    short of the grid, as in scans whose voxels are finer than their resolution (a smooth CT kernel on a small
    field of view, an oversampled or zero-filled MR matrix), so it does not invent detail where there is none.

    >>> import torch
    >>> from medsr.volume import Volume
    >>> edge = Volume(torch.tensor([0.0, 0, 0, 1, 1, 1]).reshape(1, 6, 1, 1), np.eye(4))
    >>> [round(float(x), 2) for x in blurred(edge, 1.0).array.flatten()]
    [0.0, 0.06, 0.3, 0.7, 0.94, 1.0]
    """
    if sigma == 0:
        return volume
    sigmas = [0.0] + [sigma if n > 1 else 0.0 for n in volume.spatial_shape]
    array = gaussian_filter(volume.array.numpy(), sigma=sigmas, mode="reflect")
    return volume.replace(array=torch.from_numpy(array))


def _box(corner: Sequence[int], size: Sequence[int], scale: Sequence[int] = (1, 1, 1)) -> tuple[slice, ...]:
    """Index of the block of ``size`` LR voxels at ``corner`` in a (C, I, J, K) array ``scale`` times finer."""
    return (slice(None), *(slice(c * s, (c + n) * s) for c, n, s in zip(corner, size, scale, strict=True)))


def degrade_normalised(volume: Volume, degradation: Degradation, *, rng: np.random.Generator | None) -> Volume:
    """``degrade`` a normalised volume in its physical units (noise levels and log compression are defined
    there), then normalise back with the same window (``meta['window']``; none: already physical)."""
    window = volume.meta.get("window", PHYSICAL)
    physical = denormalize(volume, window)
    if degradation.modality == "US":  # B-mode lives in 0..255; a float round trip can leave 255.00002
        physical = physical.replace(array=physical.array.clamp(0, 255))
    return normalize(degrade(physical, degradation, rng=rng), window)


def _margin(degradation: Degradation, spacing: Sequence[float], scale: Sequence[int]) -> tuple[int, ...]:
    """LR voxels per axis beyond which a patch's LR no longer depends on the HR: PSF (4 sigma), slice profile."""
    reach = [4 * fwhm / step / FWHM_PER_SIGMA for fwhm, step in zip(degradation.psf_fwhm, spacing, strict=True)]
    reach[2] += 2 * (degradation.slice_thickness / spacing[2] or scale[2])  # a Gaussian profile reaches 1.7 FWHM
    return tuple(math.ceil(r / s) + WINDOW_MARGIN for r, s in zip(reach, scale, strict=True))


class PairDataset(Dataset[Pair]):
    """Random aligned LR/HR patches from normalised HR scans: planes in 2D or blocks in 3D.

    A 2D model learns in-plane, on (i, j) patches, when the factor along k is 1, or through-plane when the
    factors are (1, 1, c): then each item is an (i, k) or a (j, k) patch (either, at random), the planes
    ``infer.predict_orthogonal_planes`` runs the model on.

    LR voxel ``m`` covers HR voxels ``[m * s, (m + 1) * s)`` along each axis, and every pair is cut on that grid.
    Each scan's region is degraded once without noise. Noise is drawn per item from the item's rng, in physical
    units (through the window :func:`prepare_scan` keeps in ``meta['window']``; a volume without one is taken to be
    in physical units), and has the distribution the whole-scan simulation gives the patch:

    - 'rician' (MR) and 'poisson' (X-ray) act voxel by voxel, so they are applied to the noise-free LR patch.
      Poisson's reference intensity is the region's, as :func:`degrade` computes it on the whole LR.
    - 'gaussian' (CT, grain in-plane) and 'speckle' (US, formed inside the scanner model) are spatially correlated,
      and degrading the bare HR patch would pad noise and PSF at the patch's edges. So the HR patch plus a margin
      (PSF and slice-profile reach plus ``WINDOW_MARGIN`` LR voxels) is degraded with the item's rng, and the LR
      patch is cut from its middle. Margins stop at the region's edges, where the whole-scan simulation has its
      own. This assumes the scanner model is local; the CT noise is scaled to ``noise_sigma`` over the window, not
      the whole scan.

    Args:
        volumes: The training regions: HR volumes from :func:`prepare_scan`, (C, I, J, K) each, cut to their
            training slabs (:func:`slice_range`) and augmented by the caller; each is cropped to a multiple of the
            scale.
        degradation: The LR simulation. Factors must be integers (the model scale); in 2D, (a, b, 1) or (1, 1, c).
        patch: HR patch size in voxels: one edge (square or cube) or one per model axis ((i, j), (i or j, k)
            through-plane, or (i, j, k)); multiples of the scale.
        length: Items per epoch.
        seed: Each item is drawn from ``default_rng((seed, epoch, index))``: replayable and worker-safe.
        min_foreground: Fraction of HR patch voxels that must be tissue; up to ``FOREGROUND_TRIES`` draws try.
        spatial_dims: 2 for (C, Pi, Pj) slice patches (or (C, P, Pk) through-plane), 3 for (C, Pi, Pj, Pk) blocks.
    """

    def __init__(
        self,
        volumes: Sequence[Volume],
        degradation: Degradation,
        *,
        patch: int | Sequence[int],
        length: int,
        seed: int = 0,
        min_foreground: float = 0.3,
        spatial_dims: int = 2,
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.scale = integer_scale(degradation.factors)
        self.through_plane = spatial_dims == 2 and self.scale[2] != 1
        if self.through_plane and self.scale[:2] != (1, 1):
            raise ValueError(f"2D training pairs need factors (a, b, 1) or (1, 1, c), got {degradation.factors}")
        size = tuple(patch) if isinstance(patch, Sequence) else (patch,)
        size = size * spatial_dims if len(size) == 1 else size
        if len(size) != spatial_dims:
            raise ValueError(f"patch {patch} needs 1 or {spatial_dims} sizes")
        # The HR (i, j, k) shapes an item may take; the singleton axis of a 2D one is dropped.
        if self.through_plane:
            self.patches = [(size[0], 1, size[1]), (1, size[0], size[1])]
        else:
            self.patches = [(*size, 1) if spatial_dims == 2 else size]
        if any(p < 1 or p % s for shape in self.patches for p, s in zip(shape, self.scale, strict=True)):
            raise ValueError(f"patch {patch}: each size must be a multiple of the scale {self.scale} (i, j, k)")
        self.regions = [crop_to_multiple(v, scale=self.scale) for v in volumes]
        # The patch shapes each region holds (through-plane: a region thinner than the patch along i or j, e.g. a
        # single coronal image, gives only the other orientation).
        self.fitting = [
            [shape for shape in self.patches if all(p <= n for p, n in zip(shape, region.spatial_shape, strict=True))]
            for region in self.regions
        ]
        for index, (region, fitting) in enumerate(zip(self.regions, self.fitting, strict=True)):
            if not fitting:
                raise ValueError(
                    f"patch {self.patches[0]} (i, j, k) is larger than scan {index}: {region.spatial_shape}"
                )
        self.degradation, self.spatial_dims = degradation, spatial_dims
        self.on_the_fly = degradation.noise in ("gaussian", "speckle")
        # Swapping i and j is a valid augmentation only if the scanner blurs and samples them alike (not for US,
        # lateral vs axial; not for unequal PSFs, scales or spacings).
        self.transposable = (
            degradation.modality != "US"
            and not self.through_plane
            and self.scale[0] == self.scale[1]
            and self.patches[0][0] == self.patches[0][1]
            and degradation.psf_fwhm[0] == degradation.psf_fwhm[1]
            and all(abs(r.spacing[0] - r.spacing[1]) < 1e-6 for r in self.regions)
        )
        self.windows = [r.meta.get("window", PHYSICAL) for r in self.regions]
        quiet = dataclasses.replace(degradation, noise="none")
        self.lr = [] if self.on_the_fly else [degrade_normalised(r, quiet, rng=None).array for r in self.regions]
        self.reference = (  # physical intensity that gets ``photons`` quanta, as in degrade's X-ray model
            [quanta_reference(w.to_physical(lr)) for lr, w in zip(self.lr, self.windows, strict=True)]
            if degradation.noise == "poisson"
            else []
        )
        self.length, self.seed, self.min_foreground = length, seed, min_foreground
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch (as timm's train.py does) so patches and noise change."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Pair:
        rng = np.random.default_rng((self.seed, self.epoch, index))
        scan = int(rng.integers(len(self.regions)))
        hr = self.regions[scan].array
        fitting = self.fitting[scan]
        shape = fitting[int(rng.integers(2))] if len(fitting) == 2 else fitting[0]
        size = [p // s for p, s in zip(shape, self.scale, strict=True)]  # LR patch
        grid = [n // s for n, s in zip(hr.shape[1:], self.scale, strict=True)]  # LR region
        for _ in range(FOREGROUND_TRIES):
            corner = [int(rng.integers(n - p + 1)) for n, p in zip(grid, size, strict=True)]
            hr_patch = hr[_box(corner, size, self.scale)]
            if (hr_patch > FOREGROUND_LEVEL).float().mean() >= self.min_foreground:
                break
        lr_patch = self._lr_patch(scan, corner, size, rng)
        # Flips map the block-centred LR grid onto itself, so the pair stays aligned. Transposes swap i and j only
        # where the scanner treats them alike (along k it never does: slice profile, noise grain).
        for axis in (1, 2, 3):
            if rng.random() < 0.5:
                hr_patch, lr_patch = hr_patch.flip(axis), lr_patch.flip(axis)
        if self.transposable and rng.random() < 0.5:
            hr_patch, lr_patch = hr_patch.transpose(1, 2), lr_patch.transpose(1, 2)
        if self.spatial_dims == 2:  # drop the singleton axis: k in-plane, i or j through-plane
            dropped = 1 + (shape.index(1) if self.through_plane else 2)
            hr_patch, lr_patch = hr_patch.squeeze(dropped), lr_patch.squeeze(dropped)
        return Pair(lr=lr_patch.contiguous(), hr=hr_patch.contiguous())

    def _lr_patch(self, scan: int, corner: list[int], size: list[int], rng: np.random.Generator) -> torch.Tensor:
        """The noisy LR patch (C, *size) at LR ``corner`` of scan ``scan``, normalised like its HR."""
        region, noise = self.regions[scan], self.degradation.noise
        if self.on_the_fly:
            margin = _margin(self.degradation, region.spacing, self.scale)
            grid = [n // s for n, s in zip(region.spatial_shape, self.scale, strict=True)]
            start = [max(0, c - m) for c, m in zip(corner, margin, strict=True)]
            stop = [min(n, c + p + m) for n, c, p, m in zip(grid, corner, size, margin, strict=True)]
            hr_start = [a * s for a, s in zip(start, self.scale, strict=True)]
            block = crop(region, hr_start, [b * s for b, s in zip(stop, self.scale, strict=True)])
            lr = degrade_normalised(block, self.degradation, rng=rng).array
            return lr[_box([c - a for c, a in zip(corner, start, strict=True)], size)]
        lr = self.lr[scan][_box(corner, size)]
        if noise == "none":
            return lr
        window = self.windows[scan]
        physical = window.to_physical(lr)
        if noise == "rician":
            noisy = rician(physical, self.degradation.noise_sigma, rng)
        else:
            noisy = poisson(physical, self.degradation.photons, rng, reference=self.reference[scan])
        return window.to_unit(noisy)
