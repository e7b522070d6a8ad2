"""Data consistency: an SR output, acquired again by the known scanner model, should give back the LR it came from.

Nothing else ties a GAN's texture to the patient (the adversarial loss alone rewards anything that looks like
anatomy), so the LR-consistency error is reported for every method, and for MRI the measured data can be put back:
the k-space band the LR scan measured replaces the SR output's own (as in model-based MR reconstruction).
"""

from __future__ import annotations

import dataclasses

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

    ``sr + U(lr - T(sr))`` with T the k-space truncation of the degradation and U its zero-filling inverse,
    repeated until ``T(sr) = lr`` (``T(U(x)) = x`` but for the Nyquist bin of an even LR size, which real signals
    share between +-m/2: each pass halves its residual). The result degrades to ``lr`` and keeps the SR output's
    frequencies beyond the LR band. Only for plain truncation (rect window, no PSF) of in-plane factors, where the
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
    for _ in range(KSPACE_ITERATIONS):  # an even LR size's Nyquist bin is only half restored per pass
        residual = target - kspace_truncate(array, degradation.factors)
        if float(residual.abs().max()) <= KSPACE_TOLERANCE * scale:
            break
        array = array + kspace_upsample(residual, array.shape[1:])
    return array
