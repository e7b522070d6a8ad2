"""Low-resolution simulation: how a scanner loses resolution, per axis, with the LR geometry to match.

MRI: a lower-resolution acquisition of the same field of view measures only the centre of k-space, so the LR
image is the HR image with its outer k-space cut away (truncation), reconstructed on a coarser grid. Gibbs
ringing is what truncation produces, not an add-on. Optional apodisation (Hann) trades ringing for blur.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from medsr.volume import Volume, scale_affine

KSPACE_WINDOWS = ("rect", "hann")


@dataclasses.dataclass(frozen=True)
class Degradation:
    """What was applied to make LR from HR.

    Args:
        factors: Resolution loss per voxel axis (i, j, k), e.g. (2, 2, 1) for x2 in-plane. The applied factor
            is ``n / round(n / factor)`` for an axis of ``n`` voxels; :func:`lr_shape` gives the LR size.
        kspace_window: 'rect' (plain truncation) or 'hann' (apodised truncation).
    """

    factors: tuple[float, float, float] = (2.0, 2.0, 1.0)
    kspace_window: str = "rect"

    def __post_init__(self) -> None:
        factors = tuple(float(f) for f in self.factors)
        if len(factors) != 3 or any(not math.isfinite(f) or f < 1 for f in factors):
            raise ValueError(f"factors must be 3 numbers >= 1 (i, j, k), got {self.factors}")
        if self.kspace_window not in KSPACE_WINDOWS:
            raise ValueError(f"unknown kspace_window {self.kspace_window!r}; choose one of {KSPACE_WINDOWS}")
        object.__setattr__(self, "factors", factors)


def lr_shape(shape: Sequence[int], factors: Sequence[float]) -> tuple[int, ...]:
    """LR size per axis: ``round(n / factor)``, at least 1."""
    return tuple(max(1, round(n / f)) for n, f in zip(shape, factors, strict=True))


def kspace_truncate(array: torch.Tensor, factors: Sequence[float], *, window: str = "rect") -> torch.Tensor:
    """Keep the central ``1 / factor`` of k-space along each of the last ``len(factors)`` axes.

    The LR samples sit at the centres of the HR blocks they replace (LR index ``m`` is HR position
    ``m * f + (f - 1) / 2``), so the field of view is unchanged and the LR affine is
    ``scale_affine(affine, 1 / f)``. A band-limited shift by ``(f - 1) / 2`` HR voxels (a linear phase in
    k-space) puts them there. Every retained frequency ``|k| < m / 2`` is kept exactly (rect window); the
    result is scaled by ``m / n`` so the mean intensity is unchanged.

    Args:
        array: Real tensor (..., *spatial); the last ``len(factors)`` axes are transformed.
        factors: Resolution loss per transformed axis (>= 1, may be non-integer).
        window: 'rect' or 'hann' apodisation over the retained band.

    Returns:
        Real tensor (..., *lr_shape(spatial, factors)) in the input's dtype.
    """
    if window not in KSPACE_WINDOWS:
        raise ValueError(f"unknown k-space window {window!r}; choose one of {KSPACE_WINDOWS}")
    spectrum = array.to(torch.complex128 if array.dtype == torch.float64 else torch.complex64)
    first_axis = array.ndim - len(factors)
    for axis, factor in enumerate(factors, start=first_axis):
        n = array.shape[axis]
        m = lr_shape([n], [factor])[0]
        if m == n:
            continue
        frequencies = torch.fft.fftfreq(m, d=1.0 / m).round().to(torch.int64)  # LR bins, integer cycles per FOV
        shift = (n / m - 1.0) / 2.0  # in HR voxels
        phase = 2 * math.pi * frequencies.double() * shift / n
        gain = 0.5 + 0.5 * torch.cos(2 * math.pi * frequencies.double() / m) if window == "hann" else torch.ones(m)
        weights = torch.polar(gain.double(), phase).to(spectrum.dtype)
        kept = torch.fft.fft(spectrum, dim=axis).index_select(axis, frequencies % n)
        shape = [1] * array.ndim
        shape[axis] = m
        spectrum = torch.fft.ifft(kept * weights.reshape(shape), dim=axis) * (m / n)
    return spectrum.real.to(array.dtype)


def degrade(volume: Volume, degradation: Degradation) -> Volume:
    """Simulate the LR acquisition of ``volume``; the returned affine covers the same field of view.

    Args:
        volume: HR volume, array (C, I, J, K).
        degradation: What to apply; factors are per voxel axis (i, j, k).
    """
    if volume.spatial_shape[2] == 1 and degradation.factors[2] != 1:
        raise ValueError(f"a 2D image (K == 1) cannot be degraded along k (factors {degradation.factors})")
    array = kspace_truncate(volume.array, degradation.factors, window=degradation.kspace_window)
    applied = [n / m for n, m in zip(volume.spatial_shape, array.shape[1:], strict=True)]
    return volume.replace(array=array, affine=scale_affine(volume.affine, [1.0 / f for f in applied]))
