"""Noise models, each applied in the image's own units. Randomness comes in as an ``np.random.Generator``."""

from __future__ import annotations

import numpy as np
import torch

from medsr.degrade.sampling import gaussian_blur, gaussian_taps


def _normal(rng: np.random.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape)).to(dtype)


def rician(array: torch.Tensor, sigma: float, rng: np.random.Generator) -> torch.Tensor:
    """MR magnitude noise: ``|x + n_re + i n_im|`` with ``n ~ N(0, sigma^2)`` on each channel (Gudbjartsson 1995).

    ``array`` is a magnitude image of any shape; ``sigma`` is in its units. Returns the same shape.

    In air (x = 0) this is Rayleigh with mean ``sigma * sqrt(pi / 2)``; at high SNR it tends to ``N(x, sigma^2)``.
    """
    real = array + sigma * _normal(rng, tuple(array.shape), array.dtype)
    imaginary = sigma * _normal(rng, tuple(array.shape), array.dtype)
    return torch.sqrt(real**2 + imaginary**2)


def correlated_gaussian(array: torch.Tensor, sigma: float, rng: np.random.Generator, *, grain: float) -> torch.Tensor:
    """Additive Gaussian noise of standard deviation ``sigma`` with an in-plane grain (CT reconstruction noise).

    White noise is blurred in the first two spatial axes with a Gaussian of FWHM ``grain`` voxels and divided by
    the filter's noise gain ``sqrt(sum(taps^2))`` per axis, so its standard deviation is ``sigma`` at every voxel
    (filtered back-projection gives CT noise such a texture). The white field extends one kernel radius past the
    image so no voxel sees padding.

    Args:
        array: (C, I, J, K) in HU.
        sigma: Standard deviation in HU.
        grain: FWHM of the in-plane texture, in voxels (0: white noise).

    Returns:
        ``array`` plus the noise, same shape and dtype.
    """
    if grain <= 0:
        return array + (sigma * _normal(rng, tuple(array.shape), torch.float64)).to(array.dtype)
    taps = gaussian_taps(grain)
    r = taps.numel() // 2
    c, i, j, k = array.shape
    white = _normal(rng, (c, i + 2 * r, j + 2 * r, k), torch.float64)
    grainy = gaussian_blur(white, (grain, grain, 0.0))[:, r : r + i, r : r + j] / taps.pow(2).sum()  # two axes
    return array + (sigma * grainy).to(array.dtype)


QUANTA_PERCENTILE = 99.9  # the intensity that receives ``photons`` quanta: robust to a few saturated pixels


def quanta_reference(array: torch.Tensor) -> float:
    """The intensity (image units) that receives ``Degradation.photons`` quanta: the 99.9th percentile."""
    return float(np.percentile(array.numpy(), QUANTA_PERCENTILE))


def poisson(array: torch.Tensor, photons: float, rng: np.random.Generator, *, reference: float) -> torch.Tensor:
    """Quantum noise: intensity ``reference`` is ``photons`` detected quanta per pixel, counts are Poisson.

    Treats pixel values as proportional to detected quanta (a raw, "for processing" radiograph).

    Args:
        array: Intensities of any shape, >= 0 (negative values count as 0).
        photons: Detected quanta per pixel at intensity ``reference`` (> 0).
        reference: The intensity that receives ``photons`` quanta, in the image's units (> 0).
    """
    if reference <= 0 or photons <= 0:
        raise ValueError(f"Poisson noise needs photons > 0 and a reference intensity > 0, got {photons}, {reference}")
    counts = (array.clamp(min=0) / reference * photons).double().numpy()
    return torch.from_numpy(rng.poisson(counts) * (reference / photons)).to(array.dtype)
