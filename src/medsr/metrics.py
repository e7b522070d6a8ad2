"""Image quality metrics: PSNR and SSIM for 2D and 3D batches, torch-native, checked against scikit-image.

SSIM is the Gaussian-window index of Wang, Bovik, Sheikh and Simoncelli, "Image quality assessment: from error
visibility to structural similarity", IEEE TIP 13(4), 2004, with the constants and window of scikit-image.

All metrics take ``(pred, target)`` (the torch order) and a required ``data_range``: the intensity range of the
data cannot be guessed for CT (HU) or MR, and a wrong one silently changes both scores. An optional body/FOV
``mask`` restricts the scores to the anatomy, since background air dominates medical volumes and inflates them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_SIGMA = 1.5  # Gaussian window sigma in voxels (Wang et al.)
_TRUNCATE = 3.5  # scikit-image's truncation, in sigmas
_RADIUS = int(_TRUNCATE * _SIGMA + 0.5)  # 5, rounded as scipy.ndimage.gaussian_filter does
_WIN_SIZE = 2 * _RADIUS + 1  # 11 taps
_K1, _K2 = 0.01, 0.03


def _check(pred: torch.Tensor, target: torch.Tensor, data_range: float) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.ndim not in (4, 5):
        raise ValueError(f"expected (N, C, *spatial) with 2 or 3 spatial dims, got shape {tuple(pred.shape)}")
    if not (pred.is_floating_point() and target.is_floating_point()):
        raise TypeError(f"pred and target must be floating point, got {pred.dtype} and {target.dtype}")
    if not data_range > 0:
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


def _gaussian_filter(x: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter (sigma 1.5, 11 taps) with valid padding, one channel at a time.

    Args:
        x: (N, C, *spatial) with 2 or 3 spatial dims, each at least 11.

    Returns:
        (N, C, *(s - 10 for s in spatial)): only the voxels whose whole window lies inside the image.
    """
    spatial_dims = x.ndim - 2
    conv = F.conv2d if spatial_dims == 2 else F.conv3d
    taps = torch.arange(-_RADIUS, _RADIUS + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (taps / _SIGMA) ** 2)
    kernel = kernel / kernel.sum()  # normalised after truncation, as scipy.ndimage does
    channels = x.shape[1]
    for axis in range(spatial_dims):
        shape = [1] * spatial_dims
        shape[axis] = _WIN_SIZE
        # depthwise: (C, 1, 1, 11, 1)-like kernel filters each channel along one axis
        x = conv(x, kernel.view(1, 1, *shape).expand(channels, 1, *shape), groups=channels)
    return x


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
    m = None
    if mask is not None:
        crop = (slice(None), slice(None), *(slice(_RADIUS, s - _RADIUS) for s in pred.shape[2:]))
        m = _broadcast_mask(mask, pred.shape)[crop]  # (N, 1, *valid)
    return _masked_mean(smap, m).to(pred.dtype)


@torch.no_grad()
def evaluate(
    pred: torch.Tensor, target: torch.Tensor, *, data_range: float, mask: torch.Tensor | None = None
) -> dict[str, float]:
    """Score one image or volume: a ``Scores`` row ``{"psnr": dB, "ssim": ...}`` of plain floats.

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
    }
