"""Training pairs from real scans: degrade each HR scan once, then cut aligned 2D LR/HR patches.

The LR scan is simulated from the whole HR scan (not per patch), so patches carry exactly what a real LR
acquisition of that region contains, Gibbs ringing from distant edges included. Only slices (along k) inside
a given range are used, which is how train, validation and test regions are kept apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from medsr.degrade import Degradation, degrade
from medsr.intensity import default_window, normalize
from medsr.volume import Volume, integer_scale

FOREGROUND_LEVEL = 0.05  # normalised intensity above which a voxel counts as tissue, not air


class Pair(NamedTuple):
    """One training example. DataLoader's default collate keeps the field names."""

    lr: torch.Tensor  # (C, *patch / scale)
    hr: torch.Tensor  # (C, *patch)


def crop_to_multiple(volume: Volume, *, scale: Sequence[int]) -> Volume:
    """Drop trailing voxels so each axis is a multiple of its scale; the affine is unchanged (same origin)."""
    i, j, k = (n - n % s for n, s in zip(volume.spatial_shape, scale, strict=True))
    return volume.replace(array=volume.array[:, :i, :j, :k])


def prepare_scan(volume: Volume, degradation: Degradation) -> Volume:
    """An HR scan ready for training or evaluation: cropped to the scale, normalised with its LR's window.

    The window is computed on the simulated LR scan because that is all inference sees
    (``infer.super_resolve`` computes it on its input), so training, evaluation and use agree exactly.
    """
    cropped = crop_to_multiple(volume, scale=integer_scale(degradation.factors))
    return normalize(cropped, default_window(degrade(cropped, degradation)))


def slice_range(volume: Volume, *, slices: tuple[int, int]) -> Volume:
    """Slab ``[start, stop)`` along k, with the affine moved to its first slice."""
    start, stop = slices
    if not 0 <= start < stop <= volume.spatial_shape[2]:
        raise ValueError(f"slices [{start}, {stop}) outside the volume's {volume.spatial_shape[2]} slices")
    shift = np.eye(4)
    shift[2, 3] = start
    return volume.replace(array=volume.array[..., start:stop], affine=volume.affine @ shift)


class PairDataset(Dataset[Pair]):
    """Random aligned 2D patches from in-plane (i, j) slices of normalised HR scans and their simulated LR.

    Args:
        volumes: HR volumes from :func:`prepare_scan` (normalised, cropped to a multiple of the scale).
        degradation: The LR simulation; factors must be integers in-plane and 1 along k.
        slices: ``[start, stop)`` along k to draw slices from (the training region).
        patch: HR patch edge in voxels (a multiple of the scale).
        length: Items per epoch.
        seed: Each item is drawn from ``default_rng((seed, epoch, index))``: replayable and worker-safe.
        min_foreground: Fraction of HR patch voxels that must be tissue; up to 20 draws try to meet it.
    """

    def __init__(
        self,
        volumes: Sequence[Volume],
        degradation: Degradation,
        *,
        slices: tuple[int, int],
        patch: int,
        length: int,
        seed: int = 0,
        min_foreground: float = 0.3,
    ) -> None:
        scale = degradation.factors
        if scale[2] != 1 or any(f != int(f) for f in scale):
            raise ValueError(f"2D training pairs need integer in-plane factors and 1 along k, got {scale}")
        self.scale = (int(scale[0]), int(scale[1]))
        if patch % self.scale[0] or patch % self.scale[1]:
            raise ValueError(f"patch {patch} is not a multiple of the scale {self.scale}")
        self.hr = [slice_range(v, slices=slices).array for v in volumes]  # (C, I, J, K_region)
        self.lr = [degrade(slice_range(v, slices=slices), degradation).array for v in volumes]
        for hr in self.hr:
            if min(hr.shape[1:3]) < patch:
                raise ValueError(f"patch {patch} is larger than a slice {tuple(hr.shape[1:3])}")
        self.patch, self.length, self.seed, self.min_foreground = patch, length, seed, min_foreground
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch (as timm's train.py does) so patches change."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Pair:
        rng = np.random.default_rng((self.seed, self.epoch, index))
        scan = int(rng.integers(len(self.hr)))
        hr, lr = self.hr[scan], self.lr[scan]
        sx, sy = self.scale
        px, py = self.patch // sx, self.patch // sy  # LR patch size
        for _ in range(20):
            k = int(rng.integers(hr.shape[3]))
            x = int(rng.integers(lr.shape[1] - px + 1))
            y = int(rng.integers(lr.shape[2] - py + 1))
            hr_patch = hr[:, x * sx : (x + px) * sx, y * sy : (y + py) * sy, k]  # LR voxel m covers HR [m*s, m*s+s)
            if (hr_patch > FOREGROUND_LEVEL).float().mean() >= self.min_foreground:
                break
        lr_patch = lr[:, x : x + px, y : y + py, k]
        # Flips and transposes map the block-centred LR grid onto itself, so the pair stays aligned.
        if rng.random() < 0.5:
            hr_patch, lr_patch = hr_patch.flip(1), lr_patch.flip(1)
        if rng.random() < 0.5:
            hr_patch, lr_patch = hr_patch.flip(2), lr_patch.flip(2)
        if sx == sy and rng.random() < 0.5:
            hr_patch, lr_patch = hr_patch.transpose(1, 2), lr_patch.transpose(1, 2)
        return Pair(lr=lr_patch.contiguous(), hr=hr_patch.contiguous())
