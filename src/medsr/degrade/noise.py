"""Noise models, each applied in the image's own units. Randomness comes in as an ``np.random.Generator``."""

from __future__ import annotations

import numpy as np
import torch

from medsr.degrade.sampling import gaussian_blur


def _normal(rng: np.random.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape)).to(dtype)


def rician(array: torch.Tensor, sigma: float, rng: np.random.Generator) -> torch.Tensor:
    """MR magnitude noise: ``|x + n_re + i n_im|`` with ``n ~ N(0, sigma^2)`` on each channel (Gudbjartsson 1995).

    In air (x = 0) this is Rayleigh with mean ``sigma * sqrt(pi / 2)``; at high SNR it tends to ``N(x, sigma^2)``.
    """
    real = array + sigma * _normal(rng, tuple(array.shape), array.dtype)
    imaginary = sigma * _normal(rng, tuple(array.shape), array.dtype)
    return torch.sqrt(real**2 + imaginary**2)


def correlated_gaussian(array: torch.Tensor, sigma: float, rng: np.random.Generator, *, grain: float) -> torch.Tensor:
    """Additive Gaussian noise of standard deviation ``sigma`` with an in-plane grain (CT reconstruction noise).

    White noise is blurred in the first two spatial axes with a Gaussian of FWHM ``grain`` voxels, then rescaled
    so its standard deviation is exactly ``sigma`` (filtered back-projection gives CT noise such a texture).

    Args:
        array: (C, I, J, K) in HU.
    """
    white = _normal(rng, tuple(array.shape), torch.float64)
    if grain > 0:
        white = gaussian_blur(white, (grain, grain, 0.0))
        white = white / white.std()
    return array + (sigma * white).to(array.dtype)


def poisson(array: torch.Tensor, photons: float, rng: np.random.Generator, *, reference: float) -> torch.Tensor:
    """Quantum noise: intensity ``reference`` is ``photons`` detected quanta per pixel, counts are Poisson.

    Treats pixel values as proportional to detected quanta (a raw, "for processing" radiograph).
    """
    counts = (array.clamp(min=0) / reference * photons).double().numpy()
    return torch.from_numpy(rng.poisson(counts) * (reference / photons)).to(array.dtype)
