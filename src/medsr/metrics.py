"""Image quality metrics for 2D and 3D batches, torch-native and checked against scikit-image and SciPy.

* PSNR and SSIM. SSIM is the Gaussian-window index of Wang, Bovik, Sheikh and Simoncelli, "Image quality
  assessment: from error visibility to structural similarity", IEEE TIP 13(4), 2004, with the constants and window
  of scikit-image. On (N, C, I, J, K) input it is the 3D SSIM (3D window).
* HFEN, the high-frequency error norm of Ravishankar and Bresler, "MR image reconstruction from highly
  undersampled k-space data by dictionary learning", IEEE TMI 30(5), 2011: how much edge and fine detail differ.
* ``paired_difference``: mean difference of two methods' scores on the same items, with a Student t interval.

All metrics take ``(pred, target)`` (the torch order). PSNR and SSIM require ``data_range``: the intensity range of
the data cannot be guessed for CT (HU) or MR, and a wrong one silently changes both scores (HFEN, a ratio, has
none). An optional body/FOV ``mask`` restricts the scores to the anatomy, since background air dominates medical
volumes and inflates them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

_SIGMA = 1.5  # Gaussian window sigma in voxels (Wang et al.)
_TRUNCATE = 3.5  # scikit-image's truncation, in sigmas
_RADIUS = int(_TRUNCATE * _SIGMA + 0.5)  # 5, rounded as scipy.ndimage.gaussian_filter does
_WIN_SIZE = 2 * _RADIUS + 1  # 11 taps
_K1, _K2 = 0.01, 0.03
_HFEN_TRUNCATE = 7 / 1.5  # Ravishankar and Bresler's 15-tap LoG at sigma 1.5: radius 7 voxels


def _check(pred: torch.Tensor, target: torch.Tensor, data_range: float | None) -> None:
    """Validate a (pred, target) pair; ``data_range`` is checked unless None (HFEN is a ratio and has none)."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.ndim not in (4, 5):
        raise ValueError(f"expected (N, C, *spatial) with 2 or 3 spatial dims, got shape {tuple(pred.shape)}")
    if not (pred.is_floating_point() and target.is_floating_point()):
        raise TypeError(f"pred and target must be floating point, got {pred.dtype} and {target.dtype}")
    if data_range is not None and not data_range > 0:
        raise ValueError(f"data_range must be > 0 (max minus min of the possible intensities), got {data_range}")
    if torch.isnan(pred).any() or torch.isnan(target).any():
        raise ValueError("pred or target contains NaN")


def _broadcast_mask(mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Broadcast a boolean mask to (N, 1, *spatial) for images of the given (N, C, *spatial) shape."""
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a boolean tensor, got {mask.dtype}")
    target_shape = (shape[0], 1, *shape[2:])
    try:
        return torch.broadcast_to(mask, target_shape)
    except RuntimeError:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to {target_shape}") from None


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over all non-batch dims of (N, C, *spatial) values, over masked voxels only if a mask is given."""
    if mask is None:
        return values.flatten(1).mean(1)
    mask = mask.expand_as(values).flatten(1)  # (N, C * prod(spatial)), same voxels in every channel
    count = mask.sum(1)
    if (count == 0).any():
        empty = torch.nonzero(count == 0).flatten().tolist()
        raise ValueError(f"mask selects no voxels for batch item(s) {empty}")
    # where, not a product: an inf outside the mask (e.g. scanner padding) must not turn the sum into NaN
    return torch.where(mask, values.flatten(1), 0).sum(1) / count


def _gaussian_kernel(sigma: float, radius: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tap positions -radius..radius and the sampled Gaussian, normalised after truncation as scipy.ndimage does."""
    taps = torch.arange(-radius, radius + 1, dtype=like.dtype, device=like.device)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    return taps, kernel / kernel.sum()


def _separable_filter(x: torch.Tensor, kernels: list[torch.Tensor]) -> torch.Tensor:
    """Valid convolution with the outer product of one 1D kernel per spatial axis, each channel on its own.

    Args:
        x: (N, C, *spatial) with 2 or 3 spatial dims.
        kernels: One odd-length 1D kernel per spatial axis.

    Returns:
        (N, C, *(s - len(k) + 1)): only the voxels whose whole window lies inside the image.
    """
    spatial_dims = x.ndim - 2
    conv = F.conv2d if spatial_dims == 2 else F.conv3d
    channels = x.shape[1]
    for axis, kernel in zip(range(spatial_dims), kernels, strict=True):
        shape = [1] * spatial_dims
        shape[axis] = kernel.numel()
        # depthwise: (C, 1, 1, 11, 1)-like kernel filters each channel along one axis
        x = conv(x, kernel.view(1, 1, *shape).expand(channels, 1, *shape), groups=channels)
    return x


def _gaussian_filter(x: torch.Tensor) -> torch.Tensor:
    """SSIM's Gaussian window (sigma 1.5, 11 taps) with valid padding: (N, C, *spatial) -> (N, C, *(s - 10))."""
    _, kernel = _gaussian_kernel(_SIGMA, _RADIUS, x)
    return _separable_filter(x, [kernel] * (x.ndim - 2))


def _laplacian_of_gaussian(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Laplacian of Gaussian, the sum over axes of the second Gaussian derivative along that axis.

    It reproduces ``scipy.ndimage.gaussian_laplace(x, sigma, mode="mirror", truncate=14 / 3)`` per channel: the
    same sampled kernels (the 1D second derivative is (t^2 / sigma^4 - 1 / sigma^2) g(t), with g normalised after
    truncation), 15 taps at sigma 1.5 as in Ravishankar and Bresler. Unlike MATLAB's ``fspecial("log")`` used in
    the paper, the kernel is not shifted to sum to zero; the offset is negligible (each 1D second derivative sums
    to -4e-6 at sigma 1.5, against a centre tap of -0.12). The image is mirrored at its borders (d c b | a b c d |
    c b a), so that the borders make no edges of their own.

    Args:
        x: (N, C, *spatial) with 2 or 3 spatial dims, each longer than the kernel radius.
        sigma: Gaussian sigma in voxels.

    Returns:
        (N, C, *spatial).
    """
    radius = int(_HFEN_TRUNCATE * sigma + 0.5)  # rounded as scipy.ndimage does
    spatial_dims = x.ndim - 2
    if min(x.shape[2:]) <= radius:
        raise ValueError(
            f"HFEN at sigma {sigma} needs more than {radius} voxels along each spatial axis, got shape {tuple(x.shape)}"
        )
    padded = F.pad(x, [radius] * (2 * spatial_dims), mode="reflect")  # torch "reflect" is scipy "mirror"
    taps, gauss = _gaussian_kernel(sigma, radius, x)
    second = (taps**2 / sigma**4 - 1 / sigma**2) * gauss
    return sum(
        _separable_filter(padded, [second if axis == other else gauss for other in range(spatial_dims)])
        for axis in range(spatial_dims)
    )


def psnr(
    pred: torch.Tensor, target: torch.Tensor, *, data_range: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, one value per batch item: 10 log10(data_range^2 / MSE).

    The MSE is over all channels and voxels (the masked voxels only, with a mask), computed in float64. It
    reproduces ``skimage.metrics.peak_signal_noise_ratio(target, pred, data_range=data_range)`` per item
    (skimage takes ``(image_true, image_test)``, the other way round). Identical images give ``+inf``.

    Args:
        pred: (N, C, *spatial) prediction, 2 or 3 spatial dims.
        target: (N, C, *spatial) reference, same shape.
        data_range: Max minus min of the possible intensities (e.g. 1.0 after normalising to [0, 1], 4000 for
            CT in HU). Required: it cannot be guessed for CT or MR.
        mask: Optional boolean tensor broadcastable to (N, 1, *spatial), e.g. a body mask.

    Returns:
        (N,) tensor in the dtype of ``pred``.
    """
    _check(pred, target, data_range)
    m = None if mask is None else _broadcast_mask(mask, pred.shape)
    mse = _masked_mean((pred.double() - target.double()) ** 2, m)  # (N,)
    return (10 * torch.log10(data_range**2 / mse)).to(pred.dtype)


def ssim_map(pred: torch.Tensor, target: torch.Tensor, *, data_range: float) -> torch.Tensor:
    """Local SSIM (Wang et al. 2004) with a Gaussian window, at every voxel whose window fits in the image.

    Computed in the dtype of the inputs (``ssim`` passes float64); differentiable, for use in a loss.
    Covariances are population (not sample) ones; C1 = (0.01 data_range)^2, C2 = (0.03 data_range)^2.

    Args:
        pred: (N, C, *spatial) prediction, 2 or 3 spatial dims, each at least 11 voxels.
        target: (N, C, *spatial) reference, same shape.
        data_range: Max minus min of the possible intensities. Required.

    Returns:
        (N, C, *(s - 10 for s in spatial)): the map without a border of 5 voxels on each side, the same
        region that scikit-image averages over.
    """
    _check(pred, target, data_range)
    if min(pred.shape[2:]) < _WIN_SIZE:
        raise ValueError(
            f"SSIM needs at least {_WIN_SIZE} voxels along each spatial axis, got shape {tuple(pred.shape)}"
        )
    c1 = (_K1 * data_range) ** 2
    c2 = (_K2 * data_range) ** 2
    channels = pred.shape[1]
    # filter all five moments in one pass: (N, 5C, *spatial) -> (N, 5C, *valid)
    moments = _gaussian_filter(torch.cat([pred, target, pred * pred, target * target, pred * target], dim=1))
    mu_p, mu_t, e_pp, e_tt, e_pt = moments.split(channels, dim=1)
    var_p = e_pp - mu_p * mu_p
    var_t = e_tt - mu_t * mu_t
    cov = e_pt - mu_p * mu_t
    return ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))


def ssim(
    pred: torch.Tensor, target: torch.Tensor, *, data_range: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean structural similarity (Wang et al. 2004), one value per batch item, computed in float64.

    For each item ``n`` it reproduces (to 1e-6; note skimage's ``(image_true, image_test)`` order)::

        skimage.metrics.structural_similarity(
            image_true=target[n], image_test=pred[n], gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, data_range=data_range, channel_axis=0)

    skimage filters with reflect padding and then drops a border of (11 - 1) // 2 = 5 voxels; the valid
    convolution of ``ssim_map`` yields exactly that cropped region. Several channels are averaged, as skimage does.

    Args:
        pred: (N, C, *spatial) prediction, 2 or 3 spatial dims, each at least 11 voxels.
        target: (N, C, *spatial) reference, same shape.
        data_range: Max minus min of the possible intensities. Required.
        mask: Optional boolean tensor broadcastable to (N, 1, *spatial), e.g. a body mask. The map is averaged
            over the masked voxels of the cropped region (the mask is cropped like the map).

    Returns:
        (N,) tensor in the dtype of ``pred``.
    """
    _check(pred, target, data_range)
    smap = ssim_map(pred.double(), target.double(), data_range=data_range)  # (N, C, *valid)
    m = None if mask is None else ssim_interior(_broadcast_mask(mask, pred.shape))  # (N, 1, *valid)
    return _masked_mean(smap, m).to(pred.dtype)


def ssim_interior(array: torch.Tensor) -> torch.Tensor:
    """The voxels of a (N, C, *spatial) array that :func:`ssim` scores: all but a border of 5 (its window's radius).

    >>> ssim_interior(torch.zeros(2, 1, 16, 12)).shape
    torch.Size([2, 1, 6, 2])
    """
    return array[(slice(None), slice(None), *(slice(_RADIUS, s - _RADIUS) for s in array.shape[2:]))]


def hfen(
    pred: torch.Tensor, target: torch.Tensor, *, sigma: float = 1.5, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """High-frequency error norm (Ravishankar and Bresler 2011), one value per batch item; 0 is perfect.

    HFEN = ||LoG(pred) - LoG(target)|| / ||LoG(target)||, L2 norms over all channels and voxels, with a 15-tap
    Laplacian of Gaussian at sigma 1.5 voxels (15^3 taps in 3D). The LoG keeps edges and fine texture and drops
    smooth shading, so HFEN measures how much of the detail that SR is meant to restore is wrong. It is a ratio,
    invariant to the intensity scale: unlike PSNR and SSIM it needs no ``data_range``. Computed in float64. A
    target without any LoG response (a constant image) gives inf, or NaN when ``pred`` equals it.

    Args:
        pred: (N, C, *spatial) prediction, 2 or 3 spatial dims, each at least 8 voxels (at sigma 1.5).
        target: (N, C, *spatial) reference, same shape.
        sigma: LoG sigma in voxels; the kernel has 2 round(14 sigma / 3) + 1 taps.
        mask: Optional boolean tensor broadcastable to (N, 1, *spatial): both norms over the masked voxels only
            (the LoG itself is computed on the whole image).

    Returns:
        (N,) tensor in the dtype of ``pred``.
    """
    _check(pred, target, None)
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0 voxels, got {sigma}")
    channels = pred.shape[1]
    # LoG is linear, so LoG(pred) - LoG(target) = LoG(pred - target): filter the difference and the target at once
    both = torch.cat([pred.double() - target.double(), target.double()], dim=1)  # (N, 2C, *spatial)
    error, reference = _laplacian_of_gaussian(both, sigma).split(channels, dim=1)
    m = None if mask is None else _broadcast_mask(mask, pred.shape)
    # the voxel count of the two means cancels: a ratio of means of squares is the squared ratio of the norms
    return torch.sqrt(_masked_mean(error**2, m) / _masked_mean(reference**2, m)).to(pred.dtype)


def hf_energy_ratio(pred: torch.Tensor, target: torch.Tensor, *, factors: Sequence[float]) -> torch.Tensor:
    """Sharpness relative to the reference: spectral energy beyond the LR band, pred's over target's, per item.

    The band an LR scan of ``factors`` (per spatial axis) keeps is ``|f| <= 1 / (2 factor)`` cycles per voxel along
    each axis; everything outside it is detail that super-resolution has to supply. 1 is as much of it as HR,
    below 1 blurrier (interpolation, PSNR-trained models), above 1 more (noise, GAN texture). It says how much
    detail there is, not whether it is right: read it next to PSNR/HFEN (the perception-distortion trade-off,
    Blau & Michaeli, CVPR 2018). Float64 FFTs over all spatial axes at once.

    Args:
        pred, target: (N, C, *spatial), 2 or 3 spatial dims, same shape.
        factors: The resolution loss per spatial axis; at least one > 1.
    """
    _check(pred, target, None)
    spatial = pred.shape[2:]
    if len(factors) != len(spatial) or max(factors) <= 1:
        raise ValueError(f"factors must give each of the {len(spatial)} spatial axes a loss, one > 1; got {factors}")
    inside = torch.ones(spatial, dtype=torch.bool)
    for axis, (n, factor) in enumerate(zip(spatial, factors, strict=True)):
        kept = torch.fft.fftfreq(n, dtype=torch.float64).abs() <= 0.5 / factor + 1e-12
        inside = inside & kept.reshape([-1 if a == axis else 1 for a in range(len(spatial))])
    dims = tuple(range(2, pred.ndim))
    energy = [
        (torch.fft.fftn(x.double(), dim=dims).abs() ** 2).masked_fill(inside, 0).flatten(1).sum(1)
        for x in (pred, target)
    ]
    return (energy[0] / energy[1]).to(pred.dtype)


@torch.no_grad()
def evaluate(
    pred: torch.Tensor, target: torch.Tensor, *, data_range: float, mask: torch.Tensor | None = None
) -> dict[str, float]:
    """Score one image or volume: a ``Scores`` row ``{"psnr": dB, "ssim": ..., "hfen": ...}`` of plain floats.

    Args:
        pred: (C, *spatial) prediction (the SR output), 2 or 3 spatial dims.
        target: (C, *spatial) reference (the HR truth), same shape.
        data_range: Max minus min of the possible intensities. Required.
        mask: Optional boolean tensor broadcastable to (1, *spatial), e.g. a body mask.
    """
    pred, target = pred.unsqueeze(0), target.unsqueeze(0)  # (1, C, *spatial)
    return {
        "psnr": float(psnr(pred, target, data_range=data_range, mask=mask)[0]),
        "ssim": float(ssim(pred, target, data_range=data_range, mask=mask)[0]),
        "hfen": float(hfen(pred, target, mask=mask)[0]),
    }


class PairedDifference(NamedTuple):
    """Mean and sample standard deviation of paired differences a - b, and a confidence interval of the mean."""

    mean: float
    std: float
    low: float
    high: float
    n: int


def paired_difference(a, b, *, confidence: float = 0.95) -> PairedDifference:
    """Mean of a - b over paired items (e.g. model minus bicubic PSNR, scan by scan) with a Student t interval.

    The interval is mean ± t_{(1 + confidence) / 2, n - 1} std / sqrt(n), as
    ``scipy.stats.t.interval(confidence, n - 1, loc=mean, scale=std / sqrt(n))`` (std with n - 1 in the
    denominator). It assumes the differences are independent draws: for neighbouring slices of one scan they are
    not, and the interval is then narrower than the uncertainty about new scans.

    Args:
        a: (n,) scores of one method, any sequence of numbers (list, array, CPU tensor).
        b: (n,) scores of the other method on the same items in the same order.
        confidence: Coverage of the interval, in (0, 1).
    """
    from scipy.stats import t  # a medsr dependency; imported here so that importing metrics stays light

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"a and b must be 1-D with the same length, got shapes {a.shape} and {b.shape}")
    if a.size < 2:
        raise ValueError(f"a confidence interval needs at least 2 pairs, got {a.size}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("a or b contains inf or NaN (e.g. the PSNR of identical images); drop those items first")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    difference = a - b
    mean, std = float(difference.mean()), float(difference.std(ddof=1))
    half_width = float(t.ppf((1 + confidence) / 2, difference.size - 1)) * std / np.sqrt(difference.size)
    return PairedDifference(mean, std, mean - half_width, mean + half_width, int(difference.size))
