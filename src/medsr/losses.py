"""Training losses: plain functions ``(pred, target) -> scalar``, for 2D and 3D batches.

Every loss takes ``pred`` (the SR output) and ``target`` (the HR truth) of shape (N, C, *spatial) with 2 or 3
spatial dims, returns the mean over the batch as a 0-dim tensor, and is differentiable in ``pred``. Weights
live outside the losses, in :func:`combined` (no ``loss_weight`` inside each loss, unlike BasicSR).

* ``charbonnier``: a smooth L1 (Charbonnier et al., "Two deterministic half-quadratic regularization
  algorithms for computed imaging", ICIP 1994), the pixel loss of LapSRN (Lai et al., CVPR 2017).
* ``ssim_loss``: 1 - SSIM (Wang et al. 2004), reusing :func:`medsr.metrics.ssim_map`, as MONAI's ``SSIMLoss``.
* ``gradient_loss``: L1 between finite-difference gradients, for edge fidelity.
* ``frequency_loss``: L1 distance of the spectra, after the focal frequency loss (Jiang et al., "Focal Frequency
  Loss for Image Reconstruction and Synthesis", ICCV 2021) without its adaptive spectrum weights.

``LOSSES`` maps the config names to functions of ``(pred, target)`` only; ``combined`` builds a weighted sum.

Adversarial losses take a discriminator's logits instead (:func:`discriminator_loss`, :func:`generator_loss`):
'vanilla' (the non-saturating GAN of Goodfellow et al. 2014), 'ragan' (relativistic average, Jolicoeur-Martineau
2019, as in ESRGAN) and 'hinge' (Lim & Ye 2017; Miyato et al. 2018).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from medsr.metrics import ssim_map

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check(pred: torch.Tensor, target: torch.Tensor) -> None:
    # F.l1_loss only warns on a shape mismatch and then broadcasts, e.g. (N, 1, ...) against (N, C, ...)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.ndim not in (4, 5):
        raise ValueError(f"expected (N, C, *spatial) with 2 or 3 spatial dims, got shape {tuple(pred.shape)}")


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half precision (e.g. under autocast) loses SSIM's E[x^2] - E[x]^2 to cancellation, and CPU FFTs refuse it."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error of (N, C, *spatial) tensors."""
    _check(pred, target)
    return F.l1_loss(pred, target)


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of (N, C, *spatial) tensors."""
    _check(pred, target)
    return F.mse_loss(pred, target)


def charbonnier(pred: torch.Tensor, target: torch.Tensor, *, eps: float = 1e-3) -> torch.Tensor:
    """Mean of ``sqrt((pred - target)^2 + eps^2) - eps``: quadratic below ``eps``, L1 above.

    ``eps`` is subtracted so that a perfect prediction gives 0 and logged values compare with L1 (which this
    approaches as eps -> 0); the constant changes no gradient. Without it (LapSRN, BasicSR) the minimum is eps.

    Args:
        pred: (N, C, *spatial) prediction.
        target: (N, C, *spatial) reference.
        eps: Width of the quadratic zone, in intensity units (1e-3 of the [0, 1] range, as LapSRN).
    """
    _check(pred, target)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return (torch.sqrt((pred - target) ** 2 + eps**2) - eps).mean()


def ssim_loss(pred: torch.Tensor, target: torch.Tensor, *, data_range: float) -> torch.Tensor:
    """``1 - mean SSIM`` (as MONAI's ``SSIMLoss``); 0 for identical inputs, at most 2.

    The mean runs over batch, channels and the valid SSIM map (the border of 5 voxels is dropped, see
    :func:`medsr.metrics.ssim_map`), so it equals ``1 - metrics.ssim(...).mean()``, in the inputs' precision
    (at least float32) instead of float64.

    Args:
        pred: (N, C, *spatial) prediction, each spatial size at least 11.
        target: (N, C, *spatial) reference.
        data_range: Max minus min of the possible intensities. Required, as in the metrics; ``LOSSES["ssim"]``
            binds 1.0 because training patches are normalised to [0, 1] (see ``train.describe``).
    """
    dtype = pred.dtype
    smap = ssim_map(_at_least_float32(pred), _at_least_float32(target), data_range=data_range)  # (N, C, *valid)
    return (1 - smap.mean()).to(dtype)


def gradient_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between forward differences along each spatial axis, averaged over the axes.

    Blind to a constant intensity offset (which the differences cancel), so pair it with a pixel loss.
    Averaging, not summing, over axes keeps 2D and 3D values on the scale of L1.

    Args:
        pred: (N, C, *spatial) prediction, each spatial size at least 2.
        target: (N, C, *spatial) reference.
    """
    _check(pred, target)
    if min(pred.shape[2:]) < 2:
        raise ValueError(f"gradient_loss needs at least 2 voxels along each spatial axis, got {tuple(pred.shape)}")
    # the difference operator is linear: diff(pred) - diff(target) == diff(pred - target)
    error = pred - target  # (N, C, *spatial)
    axes = range(2, pred.ndim)
    return torch.stack([torch.diff(error, dim=axis).abs().mean() for axis in axes]).mean()


def frequency_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean modulus of the complex spectrum difference, ``mean |FFT(pred) - FFT(target)|``, over spatial axes.

    Complex values, not magnitudes: a magnitude-only loss ignores phase, so it is zero for a shifted (or
    mirrored) prediction and cannot pin down where edges are; Jiang et al. also compare complex values.
    The FFT is orthonormal (``norm="ortho"``) and the moduli are averaged over the frequencies, i.e. divided
    by the number of voxels. By Parseval a white error of std sigma then gives about 0.89 sigma at any patch
    size, close to L1 (0.80 sigma), while a constant offset c gives only c / sqrt(voxels): the loss weights all
    frequencies alike where L1 in image space is dominated by smooth errors.

    Args:
        pred: (N, C, *spatial) prediction.
        target: (N, C, *spatial) reference.

    Returns:
        Scalar in the real dtype of the spectrum (float32, or float64 for float64 inputs), cast back to
        ``pred.dtype``.
    """
    _check(pred, target)
    dims = tuple(range(2, pred.ndim))
    # the FFT is linear: FFT(pred) - FFT(target) == FFT(pred - target), one transform instead of two
    spectrum = torch.fft.fftn(_at_least_float32(pred - target), dim=dims, norm="ortho")  # (N, C, *spatial) complex
    return spectrum.abs().mean().to(pred.dtype)


LOSSES: dict[str, Loss] = {
    "l1": l1,
    "mse": mse,
    "charbonnier": charbonnier,
    # training data are normalised to [0, 1] per scan (train.describe), so the range is 1 by construction
    "ssim": functools.partial(ssim_loss, data_range=1.0),
    "gradient": gradient_loss,
    "frequency": frequency_loss,
}


def combined(terms: Mapping[str, float]) -> Loss:
    """A loss ``sum(weight * LOSSES[name](pred, target))``, e.g. ``combined({"l1": 1.0, "ssim": 0.1})``.

    Raises:
        ValueError: no terms, an unknown name, or a weight that is not a finite number > 0 (drop a term
            instead of giving it weight 0).
    """
    terms = dict(terms)  # a copy: later edits of the caller's dict do not change the loss
    if not terms:
        raise ValueError(f"combined() needs at least one term, e.g. {{'l1': 1.0}}; known: {sorted(LOSSES)}")
    unknown = sorted(set(terms) - set(LOSSES))
    if unknown:
        raise ValueError(f"unknown loss(es) {unknown}; known: {sorted(LOSSES)}")
    bad = {name: w for name, w in terms.items() if not _is_positive_weight(w)}
    if bad:
        raise ValueError(f"loss weights must be finite numbers > 0, got {bad}")

    weighted = [(float(weight), LOSSES[name]) for name, weight in terms.items()]

    def loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = weighted[0][0] * weighted[0][1](pred, target)
        for weight, fn in weighted[1:]:
            total = total + weight * fn(pred, target)
        return total

    return loss


def _is_positive_weight(weight: object) -> bool:
    # bool is an int: a YAML "yes" must not silently become weight 1
    return isinstance(weight, int | float) and not isinstance(weight, bool) and math.isfinite(weight) and weight > 0


ADVERSARIAL = ("vanilla", "ragan", "hinge")


def _relativistic(real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of 'real is more realistic than the average fake' and the other way round."""
    return real - fake.mean(), fake - real.mean()


def discriminator_loss(real: torch.Tensor, fake: torch.Tensor, kind: str) -> torch.Tensor:
    """The discriminator's loss from its logits on HR (``real``) and SR (``fake``) batches, any equal shapes."""
    real, fake = _at_least_float32(real), _at_least_float32(fake)
    bce = F.binary_cross_entropy_with_logits
    if kind == "vanilla":
        return bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake))
    if kind == "ragan":
        real_vs_fake, fake_vs_real = _relativistic(real, fake)
        return (bce(real_vs_fake, torch.ones_like(real)) + bce(fake_vs_real, torch.zeros_like(fake))) / 2
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    raise ValueError(f"unknown adversarial loss {kind!r}; choose one of {ADVERSARIAL}")


def generator_loss(real: torch.Tensor, fake: torch.Tensor, kind: str) -> torch.Tensor:
    """The generator's adversarial loss from the discriminator's logits (``real`` is only used by 'ragan', where
    the generator also pushes the real images to look less real than the fakes)."""
    fake = _at_least_float32(fake)
    if kind == "vanilla":
        return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
    if kind == "ragan":
        return discriminator_loss(fake, real.detach(), "ragan")  # the same game with the roles swapped
    if kind == "hinge":
        return -fake.mean()
    raise ValueError(f"unknown adversarial loss {kind!r}; choose one of {ADVERSARIAL}")
