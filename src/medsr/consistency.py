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
from medsr.degrade.sampling import kspace_band, kspace_truncate, kspace_upsample
from medsr.volume import Volume

KSPACE_ITERATIONS, KSPACE_TOLERANCE = 40, 1e-7  # relative to the LR's largest magnitude (float32: 64 eps, 7.6e-6)


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
    dtype = torch.float64 if sr.array.dtype == torch.float64 else torch.float32  # float32 output: float32 FFTs
    target = lr.array.to(dtype)  # (C, I, J, K); the truncation acts on (I, J) of each slice (factor 1 along k)
    slices = [
        _consistent_slice(sr.array[..., k : k + 1].to(dtype), target[..., k : k + 1], d)
        for k in range(lr.spatial_shape[2])
    ]
    return sr.replace(array=torch.cat(slices, dim=-1).to(sr.array.dtype))


def _consistent_slice(array: torch.Tensor, target: torch.Tensor, degradation: Degradation) -> torch.Tensor:
    """:func:`kspace_consistency` of one slice (C, I, J, 1), float32 or float64 (its precision): slice by slice, a
    scan gives the same voxels in memory and streamed.

    One pass in k-space, two FFTs of the HR slice: with A its spectrum and B = W A[band] the LR band T reads (W the
    block-centre phase), T(sr) has the spectrum c (B + conj(B(-k))) / 2 (c = m / n per axis; the real part T takes
    folds the unpaired Nyquist bins); the residual's spectrum over the gain G goes back into A's band through
    conj(W) / c (U), and the inverse FFT of A is the output. What the output leaves is computed from its spectrum
    (the real part's spectrum is (A + conj(A(-k))) / 2); above the tolerance, plain passes through T and U follow.
    """
    complex_type = torch.complex128 if array.dtype == torch.float64 else torch.complex64
    tolerance = max(KSPACE_TOLERANCE, 64 * torch.finfo(array.dtype).eps) * (float(target.abs().max()) or 1.0)
    hr_shape, lr_shape = tuple(array.shape[1:3]), tuple(target.shape[1:3])
    gain = _band_gain(lr_shape, hr_shape, tuple(degradation.factors)).to(complex_type)
    (rows, row_phase), (columns, column_phase) = (_band(n, m) for n, m in zip(hr_shape, lr_shape, strict=True))
    phase = (row_phase[:, None] * column_phase[None, :]).to(complex_type)  # W, (m_i, m_j)
    c = (lr_shape[0] * lr_shape[1]) / (hr_shape[0] * hr_shape[1])
    band = (slice(None), rows[:, None], columns[None, :])
    mirror = (slice(None), (-rows % hr_shape[0])[:, None], (-columns % hr_shape[1])[None, :])

    def read(spectrum: torch.Tensor) -> torch.Tensor:  # the spectrum of T(x) on the LR grid, x = Re(ifft2(spectrum))
        measured = phase * (spectrum[band] + spectrum[mirror].conj()) / 2  # W (fft2 of the real part)[band]
        return c * (measured + measured.flip(1, 2).roll((1, 1), dims=(1, 2)).conj()) / 2

    measured = torch.fft.fft2(target[..., 0].contiguous())  # contiguous: FFTs of a view can round differently
    spectrum = torch.fft.fft2(
        array[..., 0].to(complex_type, memory_format=torch.contiguous_format)
    )  # A, (C, n_i, n_j): Hermitian, sr is real
    spectrum[band] += phase.conj() * (measured - read(spectrum)) / gain / c
    left = torch.fft.ifft2(measured - read(spectrum)).real  # the residual the output leaves, checked in k-space
    array = torch.fft.ifft2(spectrum).real[..., None]
    if float(left.abs().max()) <= tolerance:
        return array
    for _ in range(KSPACE_ITERATIONS):  # a fallback: plain passes, each halving what is left at the Nyquist bins
        residual = target - kspace_truncate(array, degradation.factors)
        if float(residual.abs().max()) <= tolerance:
            break
        array = array + kspace_upsample(residual, array.shape[1:])
    return array


@functools.lru_cache(maxsize=16)
def _band(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The HR bins (FFT order, (m,) int64) of the m LR bins along an axis of n HR voxels, and the block-centre
    phase (complex128, (m,)) :func:`~medsr.degrade.sampling.kspace_truncate` applies to them."""
    frequencies, phase = kspace_band(n, m)
    return frequencies % n, torch.polar(torch.ones(m, dtype=torch.float64), phase)


@functools.lru_cache(maxsize=16)
def _band_gain(lr_shape: tuple[int, int], hr_shape: tuple[int, int], factors: tuple[float, ...]) -> torch.Tensor:
    """G = T U on an (I, J) LR grid as its DFT (complex128, (I, J)): the transform of its impulse response."""
    impulse = torch.zeros((1, *lr_shape, 1), dtype=torch.float64)
    impulse[0, 0, 0, 0] = 1.0
    response = kspace_truncate(kspace_upsample(impulse, (*hr_shape, 1)), factors)
    return torch.fft.fft2(response[0, :, :, 0])
