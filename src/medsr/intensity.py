"""Intensity windows: physical units (HU for CT, scanner units for MR) to [0, 1] and back.

Models see [0, 1] intensities, so metrics on normalised data use ``data_range=1.0``. The window is kept with
the data so the output returns to the source's units.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from medsr.volume import Modality, Volume

CT_WINDOW_HU = (-1024.0, 3071.0)  # the 12-bit range most CT scanners store
# MR units are arbitrary: map robust low/high percentiles, insensitive to a few hot voxels or Gibbs undershoot.
LOWER_PERCENTILE, UPPER_PERCENTILE = 0.5, 99.9


@dataclasses.dataclass(frozen=True)
class Window:
    """An intensity interval ``[lo, hi]`` in physical units mapped to [0, 1]; values outside are kept, not clipped."""

    lo: float
    hi: float

    def __post_init__(self) -> None:
        if not np.isfinite([self.lo, self.hi]).all() or self.hi <= self.lo:
            raise ValueError(f"window needs finite lo < hi, got ({self.lo}, {self.hi})")

    def to_unit(self, values: torch.Tensor) -> torch.Tensor:
        """Physical units -> [0, 1] (lo -> 0, hi -> 1), any shape."""
        return (values - self.lo) / (self.hi - self.lo)

    def to_physical(self, values: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_unit`."""
        return values * (self.hi - self.lo) + self.lo


def default_window(volume: Volume) -> Window:
    """The window a model for this modality was trained with.

    CT: fixed HU range, so the same tissue maps to the same value in every scan. Others (MR, US, X-ray,
    unknown): the 0.5th to 99.9th percentile of this scan, since their units are arbitrary. Models are trained
    with the window of the *low-resolution* scan, so inference computes it exactly as training did.
    """
    if volume.modality == Modality.CT:
        return Window(*CT_WINDOW_HU)
    lo, hi = (float(p) for p in np.percentile(volume.array.numpy(), [LOWER_PERCENTILE, UPPER_PERCENTILE]))
    if hi <= lo:
        raise ValueError(f"volume is constant ({lo}): nothing to super-resolve")
    return Window(lo, hi)


def normalize(volume: Volume, window: Window) -> Volume:
    """Map ``window.lo -> 0`` and ``window.hi -> 1`` linearly."""
    return volume.replace(array=window.to_unit(volume.array))


def denormalize(volume: Volume, window: Window) -> Volume:
    """Inverse of :func:`normalize`: back to physical units."""
    return volume.replace(array=window.to_physical(volume.array))
