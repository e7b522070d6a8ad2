"""Low-resolution simulation: how each scanner loses resolution, per axis, with the LR geometry to match.

- MR: k-space truncation in-plane (i, j), with Gibbs ringing and optional apodisation; thick slices along k
  with a slice profile and gap; Rician noise on the magnitude.
- CT: in HU. Focal-spot/detector blur (Gaussian PSF, FWHM in mm), detector-aperture sampling in-plane, slice
  thickness along k at a given increment; reconstruction-like correlated noise.
- CR/DX (X-ray): detector blur, pixel binning, quantum (Poisson) noise.
- US: see ``ultrasound.py``.

Every model samples on the same field of view, so the LR affine is ``scale_affine(affine, 1 / applied_factors)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch

from medsr.degrade.noise import correlated_gaussian, poisson, quanta_reference, rician
from medsr.degrade.sampling import (
    KSPACE_WINDOWS,
    PROFILES,
    aperture_sample,
    gaussian_blur,
    kspace_truncate,
    kspace_upsample,
    lr_shape,
    profile_sample,
    voxels,
)
from medsr.volume import Modality, Volume, scale_affine

NOISES = ("none", "rician", "gaussian", "poisson", "speckle")
# The noise each scanner model adds (none of them adds another).
NOISE_OF = {"MR": "rician", "CT": "gaussian", "CR": "poisson", "DX": "poisson", "US": "speckle"}
CT_NOISE_GRAIN = 1.5  # LR voxels: FWHM of the in-plane texture of CT noise


MAX_FACTOR = 16.0  # per axis: beyond it a scanner model is meaningless and the LR scan a few voxels


@dataclasses.dataclass(frozen=True)
class Degradation:
    """What is applied to make LR from HR; saved with every model so users know what it learned to invert.

    Args:
        factors: Resolution loss per voxel axis (i, j, k), >= 1, may be non-integer; the applied factor is
            ``n / round(n / factor)``. Use :func:`factors_for_spacing` for a target spacing in mm.
        modality: Scanner model to simulate ('MR', 'CT', 'US', 'CR'/'DX').
        kspace_window: MR in-plane apodisation: 'rect' (plain truncation), 'hann' or 'tukey'.
        slice_profile: Profile along k for MR/CT thick slices: 'rect' or 'gaussian'.
        slice_thickness: FWHM of the slice profile in mm; 0 means equal to the LR slice spacing (contiguous).
            Thinner than the spacing leaves a gap; thicker makes slices overlap.
        psf_fwhm: Gaussian blur per axis before sampling, FWHM in mm (CT focal spot/detector, X-ray detector,
            US beam width: lateral, axial).
        noise: 'none', 'rician' (MR), 'gaussian' (CT, correlated), 'poisson' (X-ray) or 'speckle' (US).
        noise_sigma: Standard deviation for 'rician'/'gaussian', in the image's units (HU for CT).
        photons: For 'poisson': detected quanta per pixel at the image's 99.9th percentile intensity.
        dynamic_range_db: US log-compression range used to go between B-mode and echo amplitude.
    """

    factors: tuple[float, float, float] = (2.0, 2.0, 1.0)
    modality: str = "MR"
    kspace_window: str = "rect"
    slice_profile: str = "rect"
    slice_thickness: float = 0.0
    psf_fwhm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    noise: str = "none"
    noise_sigma: float = 0.0
    photons: float = 0.0
    dynamic_range_db: float = 60.0

    def __post_init__(self) -> None:
        factors = tuple(float(f) for f in self.factors)
        if len(factors) != 3 or any(not math.isfinite(f) or not 1 <= f <= MAX_FACTOR for f in factors):
            raise ValueError(f"factors must be 3 numbers in [1, {MAX_FACTOR:g}] (i, j, k), got {self.factors}")
        psf = tuple(float(f) for f in self.psf_fwhm)
        if len(psf) != 3 or any(not math.isfinite(f) or f < 0 for f in psf):
            raise ValueError(f"psf_fwhm must be 3 widths >= 0 mm (i, j, k), got {self.psf_fwhm}")
        if Modality(self.modality) == Modality.OT:  # Modality() raises on an unknown name
            raise ValueError("modality OT has no scanner model; choose MR, CT, US, CR or DX")
        if self.kspace_window not in KSPACE_WINDOWS:
            raise ValueError(f"unknown kspace_window {self.kspace_window!r}; choose one of {KSPACE_WINDOWS}")
        if self.slice_profile not in PROFILES:
            raise ValueError(f"unknown slice_profile {self.slice_profile!r}; choose one of {PROFILES}")
        if self.noise not in NOISES:
            raise ValueError(f"unknown noise {self.noise!r}; choose one of {NOISES}")
        if self.slice_thickness < 0 or self.noise_sigma < 0 or self.photons < 0 or self.dynamic_range_db <= 0:
            raise ValueError("slice_thickness, noise_sigma and photons must be >= 0, dynamic_range_db > 0")
        if self.noise != "none" and NOISE_OF.get(self.modality) != self.noise:
            raise ValueError(
                f"noise {self.noise!r} is not part of the {self.modality} scanner model; "
                f"{self.modality} takes {NOISE_OF.get(self.modality, 'no noise')!r}"
            )
        if self.noise in ("rician", "gaussian") and self.noise_sigma == 0:
            raise ValueError(f"noise {self.noise!r} needs noise_sigma > 0")
        if self.noise == "poisson" and self.photons == 0:
            raise ValueError("noise 'poisson' needs photons > 0")
        if self.noise == "speckle" and min(psf[:2]) <= 0:
            raise ValueError("noise 'speckle' needs a PSF: psf_fwhm > 0 mm laterally and axially (i, j)")
        object.__setattr__(self, "factors", factors)
        object.__setattr__(self, "psf_fwhm", psf)

    @property
    def is_random(self) -> bool:
        """Whether :func:`degrade` needs an ``rng`` (noise or speckle)."""
        return self.noise != "none"


def explain(d: Degradation) -> str:
    """The degradation in words, for model cards: what the scanner model does along which axes."""
    factors = "x".join(f"{f:g}" for f in d.factors)
    in_plane = max(d.factors[:2]) > 1
    parts = []
    if any(d.psf_fwhm):
        psf = "x".join(f"{f:g}" for f in d.psf_fwhm)
        kind = "beam PSF (incoherent, no new speckle)" if d.modality == "US" and d.noise != "speckle" else "PSF"
        parts.append(f"Gaussian {kind} of FWHM {psf} mm (i x j x k)")
    if in_plane:
        sampling = {
            "MR": f"k-space truncation {factors} ({d.kspace_window} window: a smaller acquisition matrix, same FOV)",
            "US": f"sampling on a {factors} coarser display grid (each LR pixel the mean of the HR pixels it covers)",
        }.get(d.modality, f"detector-aperture sampling {factors} (each LR pixel the mean of the HR pixels it covers)")
        parts.append(sampling)
    if d.factors[2] > 1 or d.slice_thickness:
        thickness = f"{d.slice_thickness:g} mm" if d.slice_thickness else "the LR slice spacing (contiguous)"
        parts.append(f"slices {d.factors[2]:g}x thicker along k, {d.slice_profile} profile, FWHM = {thickness}")
    noise = {
        "none": "no added noise",
        "rician": f"Rician noise sigma {d.noise_sigma:g}",
        "gaussian": f"correlated Gaussian noise sigma {d.noise_sigma:g} HU",
        "poisson": f"quantum noise, {d.photons:g} quanta per pixel at full intensity",
        "speckle": "new speckle from the wider PSF",
    }[d.noise]
    return f"{d.modality}: " + "; ".join([*parts, noise])


def summary(d: Degradation) -> str:
    """The modality, the factors and the fields that differ from the defaults, for titles and table captions.

    >>> summary(Degradation(factors=(2, 2, 1), modality="MR"))
    'factors=(2.0, 2.0, 1.0), modality=MR'
    """
    defaults = Degradation()
    changed = [
        f"{f.name}={getattr(d, f.name)}"
        for f in dataclasses.fields(d)
        if getattr(d, f.name) != getattr(defaults, f.name) or f.name in ("modality", "factors")
    ]
    return ", ".join(changed)


def factors_for_spacing(volume: Volume, spacing_mm: Sequence[float]) -> tuple[float, float, float]:
    """Per-axis factors that turn the volume's spacing into ``spacing_mm`` (i, j, k); each must be >= 1."""
    factors = tuple(t / s for t, s in zip(spacing_mm, volume.spacing, strict=True))
    if any(f < 1 - 1e-6 for f in factors):
        raise ValueError(f"target spacing {tuple(spacing_mm)} mm is finer than the scan's {volume.spacing} mm")
    return tuple(max(1.0, f) for f in factors)


def acquisition(
    volume: Volume,
    *,
    factors: Sequence[float] = (1.0, 1.0, 1.0),
    spacing: Sequence[float] | None = None,
    slice_thickness: float = 0.0,
    **fields,
) -> Degradation:
    """The :class:`Degradation` of a scanner that would measure ``volume`` at ``factors`` (or a target ``spacing``
    in mm); a ``slice_thickness`` alone means contiguous slices that thick. ``fields``: the other Degradation fields.

    >>> import torch
    >>> scan = Volume(torch.zeros(1, 8, 8, 8), np.eye(4), Modality.MR)
    >>> acquisition(scan, slice_thickness=4.0).factors
    (1.0, 1.0, 4.0)
    """
    if volume.modality is Modality.OT:
        raise ValueError("the scan names no modality; pass one (--modality MR, CT, US, CR or DX)")
    factors = factors_for_spacing(volume, spacing) if spacing else tuple(factors)
    if slice_thickness and factors[2] == 1 and not spacing:
        factors = (*factors[:2], max(1.0, slice_thickness / volume.spacing[2]))
    return Degradation(
        factors=factors, modality=volume.modality.value, slice_thickness=slice_thickness or 0.0, **fields
    )


def degrade(volume: Volume, degradation: Degradation, *, rng: np.random.Generator | None = None) -> Volume:
    """Simulate the LR acquisition of ``volume``; the returned affine covers the same field of view.

    Args:
        volume: HR volume in physical units (HU for CT), array (C, I, J, K).
        degradation: What to apply; factors are per voxel axis (i, j, k).
        rng: Required when ``degradation.is_random``.
    """
    if volume.spatial_shape[2] == 1 and degradation.factors[2] != 1:
        raise ValueError(f"a 2D image (K == 1) cannot be degraded along k (factors {degradation.factors})")
    if degradation.is_random and rng is None:
        raise ValueError(f"noise {degradation.noise!r} is random: pass rng=np.random.default_rng(seed)")
    pipeline = _PIPELINES[Modality(degradation.modality)]
    array = pipeline(volume.array, volume.spacing, degradation, rng)
    applied = [n / m for n, m in zip(volume.spatial_shape, array.shape[1:], strict=True)]
    return volume.replace(array=array, affine=scale_affine(volume.affine, [1.0 / f for f in applied]))


def _slices(array: torch.Tensor, spacing: Sequence[float], d: Degradation) -> torch.Tensor:
    """Thick slices along k: the slice profile of FWHM ``slice_thickness`` every ``factors[2]`` HR slices."""
    if d.factors[2] == 1 and d.slice_thickness == 0:
        return array
    thickness = (
        d.slice_thickness / spacing[2]
        if d.slice_thickness
        else array.shape[3] / lr_shape([array.shape[3]], [d.factors[2]])[0]
    )
    return profile_sample(array, 3, d.factors[2], profile=d.slice_profile, fwhm=thickness)


def _mr(array: torch.Tensor, spacing: Sequence[float], d: Degradation, rng) -> torch.Tensor:
    array = gaussian_blur(array, voxels(d.psf_fwhm, spacing))
    in_plane = kspace_truncate(array, (*d.factors[:2], 1.0), window=d.kspace_window)  # (C, I', J', K)
    array = _slices(in_plane, spacing, d)
    return rician(array, d.noise_sigma, rng) if d.noise == "rician" else array


def _ct(array: torch.Tensor, spacing: Sequence[float], d: Degradation, rng) -> torch.Tensor:
    array = gaussian_blur(array, voxels(d.psf_fwhm, spacing))
    array = _slices(aperture_sample(array, d.factors[:2]), spacing, d)
    if d.noise == "gaussian":
        array = correlated_gaussian(array, d.noise_sigma, rng, grain=CT_NOISE_GRAIN)
    return array


def _xray(array: torch.Tensor, spacing: Sequence[float], d: Degradation, rng) -> torch.Tensor:
    array = aperture_sample(gaussian_blur(array, voxels(d.psf_fwhm, spacing)), d.factors[:2])
    if d.noise == "poisson":
        array = poisson(array, d.photons, rng, reference=quanta_reference(array))
    return array


def _ultrasound(array: torch.Tensor, spacing: Sequence[float], d: Degradation, rng) -> torch.Tensor:
    from medsr.degrade.ultrasound import degrade_bmode

    return degrade_bmode(array, spacing, d, rng)


_PIPELINES = {
    Modality.MR: _mr,
    Modality.CT: _ct,
    Modality.CR: _xray,
    Modality.DX: _xray,
    Modality.US: _ultrasound,
}

__all__ = ["Degradation", "degrade", "explain", "factors_for_spacing", "kspace_truncate", "kspace_upsample", "lr_shape"]
