"""Data consistency: an SR output, acquired again by the known scanner model, should give back the LR it came from.

Nothing else ties a GAN's texture to the patient (the adversarial loss alone rewards anything that looks like
anatomy), so the LR-consistency error is reported for every method, and for MRI the measured data can be put back:
the k-space band the LR scan measured replaces the SR output's own (as in model-based MR reconstruction).
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from medsr.data import degrade_normalised
from medsr.degrade import Degradation
from medsr.degrade.sampling import kspace_truncate, kspace_upsample
from medsr.volume import Volume

KSPACE_ITERATIONS, KSPACE_TOLERANCE = 40, 1e-7  # relative to the LR's largest magnitude


def lr_rmse(sr: Volume, lr: Volume, degradation: Degradation) -> float:
    """RMSE between ``degrade(sr)`` (noise-free) and ``lr``, in the volumes' units: 0 for a fully consistent
    output; with a noisy ``lr`` its floor is the noise level, the same for every method.

    Args:
        sr: Output on the HR grid, (C, I, J, K), normalised as the data module normalises (``meta['window']``).
        lr: The input it was made from.
        degradation: The scanner model that made ``lr``.
    """
    again = degrade_normalised(sr, dataclasses.replace(degradation, noise="none"), rng=None)
    if again.spatial_shape != lr.spatial_shape:
        raise ValueError(f"sr degrades to {again.spatial_shape}, not the LR's {lr.spatial_shape}")
    return float((again.array.double() - lr.array.double()).pow(2).mean().sqrt())


def kspace_applies(degradation: Degradation) -> bool:
    """Whether :func:`kspace_consistency` can put a degradation's measured band back: MR k-space truncation with a
    rect window, in-plane factors only, no PSF and no slice profile (the band is then known exactly).

    >>> kspace_applies(Degradation(factors=(2, 2, 1), modality="MR")), kspace_applies(Degradation(factors=(1, 1, 4)))
    (True, False)
    """
    d = degradation
    return (
        d.modality == "MR"
        and d.kspace_window == "rect"
        and d.factors[2] == 1
        and not any(d.psf_fwhm)
        and not d.slice_thickness
    )


def kspace_consistency(sr: Volume, lr: Volume, degradation: Degradation) -> Volume:
    """MRI: replace the in-plane k-space band the LR scan measured by the measured values.

    ``sr + U(G^-1 (lr - T(sr)))`` with T the k-space truncation of the degradation, U its zero-filling inverse and
    G = T U, which is the identity but for the Nyquist bins of an even LR size (real signals share them between
    +-m/2: gain 1/2, 1/4 at a corner). G is a Fourier multiplier on the LR grid, so it is inverted in one pass; the
    result degrades to ``lr`` (checked, with plain passes as a fallback) and keeps the SR output's frequencies
    beyond the LR band. Only for plain truncation (rect window, no PSF) of in-plane factors, where the
    band is known exactly.
    """
    d = degradation
    if not kspace_applies(d):
        raise ValueError(
            "k-space consistency needs the MR model with a rect k-space window, no PSF, no slice profile and in-plane "
            f"factors only, got {d.modality}, {d.kspace_window!r}, PSF {d.psf_fwhm}, slice thickness "
            f"{d.slice_thickness}, factors {d.factors}"
        )
    target = lr.array.double()  # (C, I, J, K); the truncation acts on (I, J) of each slice (factor 1 along k)
    slices = [
        _consistent_slice(sr.array[..., k : k + 1].double(), target[..., k : k + 1], d)
        for k in range(lr.spatial_shape[2])
    ]
    return sr.replace(array=torch.cat(slices, dim=-1).to(sr.array.dtype))


def _consistent_slice(array: torch.Tensor, target: torch.Tensor, degradation: Degradation) -> torch.Tensor:
    """:func:`kspace_consistency` of one slice (C, I, J, 1), float64: slice by slice, a scan gives the same voxels
    in memory and streamed."""
    scale = float(target.abs().max()) or 1.0
    gain = _band_gain(tuple(target.shape[1:3]), tuple(array.shape[1:3]), tuple(degradation.factors))
    residual = target - kspace_truncate(array, degradation.factors)
    inverted = torch.fft.ifft2(torch.fft.fft2(residual, dim=(1, 2)) / gain[:, :, None], dim=(1, 2)).real
    array = array + kspace_upsample(inverted, array.shape[1:])
    for _ in range(KSPACE_ITERATIONS):  # a fallback: plain passes, each halving what is left at the Nyquist bins
        residual = target - kspace_truncate(array, degradation.factors)
        if float(residual.abs().max()) <= KSPACE_TOLERANCE * scale:
            break
        array = array + kspace_upsample(residual, array.shape[1:])
    return array


@functools.lru_cache(maxsize=16)
def _band_gain(lr_shape: tuple[int, int], hr_shape: tuple[int, int], factors: tuple[float, ...]) -> torch.Tensor:
    """G = T U on an (I, J) LR grid as its DFT (complex128, (I, J)): the transform of its impulse response."""
    impulse = torch.zeros((1, *lr_shape, 1), dtype=torch.float64)
    impulse[0, 0, 0, 0] = 1.0
    response = kspace_truncate(kspace_upsample(impulse, (*hr_shape, 1)), factors)
    return torch.fft.fft2(response[0, :, :, 0])
