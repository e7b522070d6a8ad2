"""Ultrasound B-mode at a lower probe frequency: a wider point-spread function and coarser speckle.

A B-mode image is the log-compressed envelope of the echo signal. The echo is the tissue's scatterers convolved
with the beam's point-spread function (PSF); many unresolved scatterers per resolution cell add with random
phases, and their interference is speckle, whose grain is the PSF's size [1, ch. 8]. A lower-frequency probe has
a wider PSF laterally (beam width ~ wavelength x f-number) and axially (pulse length ~ cycles x wavelength), so
its images are blurrier and its speckle is coarser. Simulated per pixel, with ``d`` the :class:`Degradation`:

1. Undo the log compression: echo amplitude ``A = 10 ** ((b / 255 - 1) * d.dynamic_range_db / 20)`` for the
   display value ``b`` in 0..255 (255 is 0 dB, 0+ is ``-dynamic_range_db`` dB); ``b = 0`` is below the
   displayed range and gets ``A = 0``.
2. ``noise='speckle'``: treat each HR pixel as a scatterer of amplitude ``A`` and independent phase
   ``phi ~ U(0, 2 pi)`` (from ``rng``), the complex field ``A exp(i phi)``. This keeps the HR image's
   echogenicity but lets the wider PSF make new speckle by interference. Otherwise (``noise='none'``) ``A`` itself
   is blurred: a deterministic, incoherent blur with no new speckle.
3. Convolve with a Gaussian PSF of FWHM ``d.psf_fwhm[0]`` mm laterally (i) and ``d.psf_fwhm[1]`` mm axially (j)
   (and ``d.psf_fwhm[2]`` along k for 3D). For speckle the PSF is scaled to unit energy (sum of squared taps 1),
   so the mean echo intensity ``E|field|^2`` of a region equals its HR mean ``A^2``; for the incoherent blur it
   has unit sum, so the mean amplitude is kept.
4. Envelope detection ``|field|`` and the same log compression back to 0..255 (clipped).
5. Sample on the LR grid: each LR pixel averages the HR pixels it covers (a rect aperture the LR pixel's width,
   as scan conversion onto a coarser display grid does), along each axis with factor != 1.

Where the PSF spans many HR pixels, the sum in step 3 has many random phasors, so the envelope is fully developed
speckle: Rayleigh distributed in a uniform region, with contrast ``std / mean = sqrt(4 / pi - 1) = 0.523`` [2],
and an autocorrelation as wide as the PSF. No Gaussian noise is added: B-mode noise is the speckle.

Because each HR pixel gets its own phase, the HR image's speckle pattern is not carried over (only its local
echo strength is): the LR speckle grain is ``psf_fwhm`` itself, whatever the HR grain. So set ``psf_fwhm`` to the
whole LR PSF, wider than the HR image's own speckle grain (measure it as the FWHM of the intensity
autocovariance in uniform tissue), or the LR speckle comes out finer than the HR's. With ``noise='none'`` the blur
adds to the HR PSF: FWHMs of Gaussians add in quadrature.

Axes: i is lateral (along the transducer face) and j axial (depth), as medsr reads a DICOM US frame: the array
is (1, Columns, Rows, 1), so i runs along the image's columns and j down its rows. Sector (curvilinear/phased)
images are treated on their display grid, so "lateral" is only exact near the centre line.

[1] T. L. Szabo, *Diagnostic Ultrasound Imaging: Inside Out*, 2nd ed., Academic Press, 2014 (ch. 7 beams, ch. 8
    scattering and speckle).
[2] C. B. Burckhardt, "Speckle in ultrasound B-mode scans", IEEE Trans. Sonics Ultrason. 25(1):1-6, 1978.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from medsr.degrade.sampling import aperture_sample, gaussian_blur, gaussian_taps, voxels

if TYPE_CHECKING:
    from medsr.degrade import Degradation

BMODE_MAX = 255.0  # display value of 0 dB (the brightest echo)
TOLERANCE = 1e-3  # display values this far outside 0..255 are rounding, clamped rather than refused


def to_amplitude(bmode: torch.Tensor, dynamic_range_db: float) -> torch.Tensor:
    """Undo log compression: display values 0..255 -> echo amplitude in [0, 1] (255 -> 1 = 0 dB, 0 -> 0).

    0 is below the displayed range (no echo, or clipped), so it maps to amplitude 0, not to ``-range`` dB: else a
    black background would come back as speckle at the noise floor.
    """
    amplitude = 10.0 ** ((bmode / BMODE_MAX - 1.0) * dynamic_range_db / 20.0)
    return torch.where(bmode > 0, amplitude, torch.zeros_like(amplitude))


def to_bmode(amplitude: torch.Tensor, dynamic_range_db: float) -> torch.Tensor:
    """Log compression: echo amplitude -> display values, clipped to 0..255 (amplitudes <= -range dB give 0)."""
    floor = 10.0 ** (-dynamic_range_db / 20.0)
    decibels = 20.0 * torch.log10(amplitude.clamp(min=floor))
    return (BMODE_MAX * (1.0 + decibels / dynamic_range_db)).clamp(0.0, BMODE_MAX)


def degrade_bmode(
    array: torch.Tensor, spacing: Sequence[float], d: Degradation, rng: np.random.Generator | None
) -> torch.Tensor:
    """The B-mode image of the same field of view from a lower-frequency probe (see the module docstring).

    Args:
        array: B-mode display values in 0..255 (log-compressed), shape (C, I, J, K); i lateral, j axial.
        spacing: HR voxel size in mm along i, j, k.
        d: Uses ``factors``, ``psf_fwhm`` (mm; lateral, axial, k), ``noise`` ('speckle' or 'none') and
            ``dynamic_range_db``.
        rng: Source of the scatterer phases; required for ``noise='speckle'``.

    Returns:
        B-mode values in 0..255, shape (C, *lr_shape((I, J, K), d.factors)), in the input's dtype.

    Raises:
        ValueError: speckle without ``rng``, or values outside 0..255 (``Degradation`` refuses other noises).
    """
    if d.noise == "speckle" and rng is None:
        raise ValueError("speckle is random: pass rng=np.random.default_rng(seed)")
    low, high = float(array.min()), float(array.max())
    if low < -TOLERANCE or high > BMODE_MAX + TOLERANCE:  # tolerance: float round trips through a window
        raise ValueError(
            f"ultrasound B-mode must hold display values in 0..255, got {low:.4g}..{high:.4g}; "
            "degrade before normalising intensities"
        )
    fwhm = voxels(d.psf_fwhm, spacing)
    amplitude = to_amplitude(array.double().clamp(0.0, BMODE_MAX), d.dynamic_range_db)
    envelope = _speckle(amplitude, fwhm, rng) if d.noise == "speckle" else gaussian_blur(amplitude, fwhm)
    return aperture_sample(to_bmode(envelope, d.dynamic_range_db), d.factors).to(array.dtype)  # k too (3D US)


def _speckle(amplitude: torch.Tensor, fwhm: Sequence[float], rng: np.random.Generator) -> torch.Tensor:
    """Envelope of random-phase scatterers of this amplitude seen through a unit-energy Gaussian PSF.

    The field extends one kernel radius past the image (amplitude replicated, phases fresh) and is cropped after
    blurring: padding the complex field by replication would repeat one phasor, which adds up coherently into
    bright borders. Unit energy (sum of squared taps 1) keeps each region's mean echo intensity.
    """
    taps = [gaussian_taps(w) if w > 0 else torch.ones(1, dtype=torch.float64) for w in fwhm]
    radii = [t.numel() // 2 for t in taps]
    padding = [p for r in reversed(radii) for p in (r, r)]  # F.pad order: last axis first
    extended = torch.nn.functional.pad(amplitude[None], padding, mode="replicate")[0]  # (C, I + 2 ri, ...)
    phase = torch.from_numpy(rng.uniform(0.0, 2.0 * math.pi, size=tuple(extended.shape)))
    gain = 1.0 / math.sqrt(math.prod(float(t.pow(2).sum()) for t in taps))
    real = gaussian_blur(extended * torch.cos(phase), fwhm) * gain
    imaginary = gaussian_blur(extended * torch.sin(phase), fwhm) * gain
    crop = (slice(None), *(slice(r, r + n) for r, n in zip(radii, amplitude.shape[1:], strict=True)))
    return torch.sqrt(real[crop] ** 2 + imaginary[crop] ** 2)
