"""Resolution loss along one axis at a time, on the same field of view: the samplers every scanner model uses.

All of them put LR sample ``m`` at HR position ``(m + 1/2) * f - 1/2`` (in HR voxels, ``f = n / m_total``),
the centre of the HR block it replaces, so the LR affine is always ``scale_affine(affine, 1 / f)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

KSPACE_WINDOWS = ("rect", "hann", "tukey")
PROFILES = ("rect", "gaussian")
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))  # 2.3548


def lr_shape(shape: Sequence[int], factors: Sequence[float]) -> tuple[int, ...]:
    """LR size per axis: ``round(n / factor)``, at least 1. The applied factor is then ``n / m``."""
    return tuple(max(1, round(n / f)) for n, f in zip(shape, factors, strict=True))


def lr_centres(n: int, m: int) -> torch.Tensor:
    """HR positions (in HR voxels) of the ``m`` LR samples that replace ``n`` HR voxels, shape (m,), float64."""
    return (torch.arange(m, dtype=torch.float64) + 0.5) * (n / m) - 0.5


def kspace_band(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``m`` LR k-space bins along an axis of ``n`` HR voxels, in integer cycles per field of view (FFT order,
    (m,) int64; HR bin ``frequency % n``), and the block-centre phase :func:`kspace_truncate` gives them (radians,
    (m,) float64: a shift by ``(n / m - 1) / 2`` HR voxels; :func:`kspace_upsample` undoes it).

    >>> kspace_band(8, 4)[0].tolist()
    [0, 1, -2, -1]
    """
    frequencies = torch.fft.fftfreq(m, d=1.0 / m).round().to(torch.int64)
    return frequencies, 2 * math.pi * frequencies.double() * (n / m - 1.0) / 2.0 / n


def _kspace_gain(frequencies: torch.Tensor, m: int, window: str) -> torch.Tensor:
    """Apodisation over the retained band |k| <= m / 2 (rect: none; hann: raised cosine; tukey: flat middle half)."""
    x = frequencies.double().abs() / (m / 2)  # 0 at DC, 1 at the LR Nyquist frequency
    if window == "hann":
        return 0.5 + 0.5 * torch.cos(math.pi * x)
    if window == "tukey":  # alpha = 0.5: flat up to half the band, cosine taper above
        return torch.where(x <= 0.5, torch.ones_like(x), 0.5 + 0.5 * torch.cos(math.pi * (x - 0.5) / 0.5))
    return torch.ones_like(x)


def kspace_truncate(array: torch.Tensor, factors: Sequence[float], *, window: str = "rect") -> torch.Tensor:
    """Keep the central ``1 / factor`` of k-space along each of the last ``len(factors)`` axes (MRI in-plane).

    A band-limited shift by ``(f - 1) / 2`` HR voxels (a linear phase in k-space) puts the LR samples at the
    centres of the HR blocks. Every retained frequency ``|k| < m / 2`` is kept exactly with the rect window;
    the result is scaled by ``m / n`` so the mean intensity is unchanged.

    Args:
        array: Real tensor (..., *spatial); the last ``len(factors)`` axes are transformed.
        factors: Resolution loss per transformed axis (>= 1, may be non-integer).
        window: 'rect', 'hann' or 'tukey' apodisation over the retained band.

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
        frequencies, phase = kspace_band(n, m)
        weights = torch.polar(_kspace_gain(frequencies, m, window), phase).to(spectrum.dtype)
        kept = torch.fft.fft(spectrum, dim=axis).index_select(axis, frequencies % n)
        shape = [1] * array.ndim
        shape[axis] = m
        spectrum = torch.fft.ifft(kept * weights.reshape(shape), dim=axis) * (m / n)
    return spectrum.real.to(array.dtype)


def kspace_upsample(array: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The ideal upsampler of :func:`kspace_truncate` (rect): zero-filling k-space to ``shape`` (sinc interpolation).

    Args:
        array: Real tensor (..., *lr_spatial); the last ``len(shape)`` axes are upsampled.
        shape: HR size per transformed axis.
    """
    spectrum = array.to(torch.complex128 if array.dtype == torch.float64 else torch.complex64)
    first_axis = array.ndim - len(shape)
    for axis, n in enumerate(shape, start=first_axis):
        m = array.shape[axis]
        if m == n:
            continue
        frequencies, phase = kspace_band(n, m)
        weights = torch.polar(torch.ones(m, dtype=torch.float64), -phase).to(spectrum.dtype)  # undo the shift
        out_shape = list(spectrum.shape)
        out_shape[axis] = n
        full = torch.zeros(out_shape, dtype=spectrum.dtype)
        shape_w = [1] * array.ndim
        shape_w[axis] = m
        values = torch.fft.fft(spectrum, dim=axis) * weights.reshape(shape_w)
        full.index_copy_(axis, frequencies % n, values)
        spectrum = torch.fft.ifft(full, dim=axis) * (n / m)
    return spectrum.real.to(array.dtype)


def _second_integral(t: torch.Tensor, *, profile: str, fwhm: float) -> torch.Tensor:
    """``P1(t) = integral of the profile's CDF up to t``, for a unit-area profile of the given FWHM centred at 0."""
    if profile == "rect":
        half = fwhm / 2
        return torch.where(t < -half, torch.zeros_like(t), torch.where(t > half, t, (t + half) ** 2 / (2 * fwhm)))
    sigma = fwhm / FWHM_PER_SIGMA
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    return t * normal.cdf(t / sigma) + sigma * torch.exp(normal.log_prob(t / sigma))


def profile_matrix(n: int, m: int, *, profile: str, fwhm: float) -> torch.Tensor:
    """Weights (m, n) of HR voxels in each LR sample: the profile centred on the LR sample, integrated against
    the linear interpolant of the HR samples.

    Integrating against the hat function of each HR sample (rather than its voxel box) makes every symmetric
    profile exact for linear signals at any factor: a ramp's average over a slice is the ramp at its centre.
    With ``P1`` the second integral of the profile, the weight of voxel ``n`` is the second difference
    ``P1(t + 1) - 2 P1(t) + P1(t - 1)`` at ``t = n - centre``. ``profile`` is 'rect' of width ``fwhm`` (a slice
    or detector aperture) or 'gaussian' of that FWHM, in HR voxels. Rows are normalised to sum 1, so a
    profile reaching past the volume's edge averages what exists.
    """
    return profile_weights(n, lr_centres(n, m), profile=profile, fwhm=fwhm)


def profile_weights(n: int, centres: torch.Tensor, *, profile: str, fwhm: float) -> torch.Tensor:
    """:func:`profile_matrix` for samples at any ``centres`` (HR voxel positions, shape (m,)): weights (m, n)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {PROFILES}")
    if fwhm <= 0:
        raise ValueError(f"profile FWHM must be > 0 HR voxels, got {fwhm}")
    t = torch.arange(n, dtype=torch.float64)[None, :] - centres.double()[:, None]  # (m, n)
    weights = sum(
        c * _second_integral(t + shift, profile=profile, fwhm=fwhm) for c, shift in ((1, 1), (-2, 0), (1, -1))
    )
    weights = weights.clamp(min=0)  # rounding can leave -1e-17 where the profile does not reach
    return weights / weights.sum(dim=1, keepdim=True)


def profile_sample(array: torch.Tensor, axis: int, factor: float, *, profile: str, fwhm: float) -> torch.Tensor:
    """Sample ``array`` along ``axis`` at ``1 / factor`` the density, each sample a profile-weighted average.

    Args:
        array: Real tensor of any shape.
        axis: The axis to sample.
        factor: Resolution loss (>= 1, may be non-integer); the LR spacing is ``factor`` HR voxels.
        profile: 'rect' or 'gaussian'.
        fwhm: Profile width in HR voxels (slice thickness / spacing along the axis); smaller than ``factor``
            leaves a gap between slices, larger makes them overlap.
    """
    n = array.shape[axis]
    m = lr_shape([n], [factor])[0]
    return apply_along_axis(profile_matrix(n, m, profile=profile, fwhm=fwhm), array, axis)


def apply_along_axis(weights: torch.Tensor, array: torch.Tensor, axis: int) -> torch.Tensor:
    """Apply a linear map along one axis: ``weights`` (m, n) takes ``array``'s axis of length n to length m
    (a sampler or an interpolator written as a matrix); in ``array``'s dtype, the other axes untouched."""
    moved = torch.tensordot(weights.to(array.dtype), torch.movedim(array, axis, 0), dims=1)
    return torch.movedim(moved, 0, axis)


def voxels(lengths_mm: Sequence[float], spacing: Sequence[float]) -> tuple[float, ...]:
    """Lengths in mm (e.g. PSF FWHMs per axis) as lengths in voxels of the given spacing."""
    return tuple(length / step for length, step in zip(lengths_mm, spacing, strict=True))


def aperture_sample(array: torch.Tensor, factors: Sequence[float]) -> torch.Tensor:
    """Detector-aperture sampling of axes 1, 2, ... of (C, *spatial): each LR pixel averages what it covers.

    The aperture is a rect as wide as the LR pixel (``n / m`` HR voxels). Axes with factor 1 are untouched.
    """
    for axis, factor in enumerate(factors, start=1):
        if factor != 1:
            n = array.shape[axis]
            array = profile_sample(array, axis, factor, profile="rect", fwhm=n / lr_shape([n], [factor])[0])
    return array


def gaussian_taps(fwhm: float) -> torch.Tensor:
    """Normalised 1D Gaussian kernel of FWHM ``fwhm`` voxels, truncated at 4 sigma; shape (2 r + 1,), float64."""
    sigma = fwhm / FWHM_PER_SIGMA
    radius = max(1, math.ceil(4 * sigma))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float64) / sigma) ** 2)
    return taps / taps.sum()


def gaussian_blur(array: torch.Tensor, fwhm: Sequence[float]) -> torch.Tensor:
    """Blur the last ``len(fwhm)`` axes with a Gaussian of the given FWHM per axis (HR voxels; 0 = none).

    Separable, truncated at 4 sigma, edges replicated. A point-spread function (focal spot, detector, beam).
    """
    first_axis = array.ndim - len(fwhm)
    for axis, width in enumerate(fwhm, start=first_axis):
        if width <= 0:
            continue
        taps = gaussian_taps(width).to(array.dtype)
        radius = taps.numel() // 2
        moved = torch.movedim(array, axis, -1)
        flat = moved.reshape(-1, 1, moved.shape[-1])
        padded = torch.nn.functional.pad(flat, (radius, radius), mode="replicate")
        blurred = torch.nn.functional.conv1d(padded, taps.reshape(1, 1, -1))
        array = torch.movedim(blurred.reshape(moved.shape), -1, axis)
    return array
