"""Intensity windows: physical units (HU for CT, scanner units for MR) to [0, 1] and back.

Models see [0, 1] intensities, so metrics on normalised data use ``data_range=1.0``. The window is kept with
the data so the output returns to the source's units.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from medsr.volume import Modality, Volume

CT_WINDOW_HU = (-1024.0, 3071.0)  # the 12-bit range most CT scanners store
# MR units are arbitrary: map robust low/high percentiles, insensitive to a few hot voxels or Gibbs undershoot.
LOWER_PERCENTILE, UPPER_PERCENTILE = 0.5, 99.9


@dataclasses.dataclass(frozen=True)
class Window:
    """An intensity interval ``[lo, hi]`` in physical units mapped to [0, 1]; values outside are kept, not clipped,
    except below ``floor`` (if set): those are raised to it first. CT's floor is air, -1024 HU: nothing in a
    patient is below it, and scanners store the padding outside the reconstruction circle there (often -2000 or
    -3024); a model trained on tissue would take that step for an edge, so it sees air instead."""

    lo: float
    hi: float
    floor: float | None = None

    def __post_init__(self) -> None:
        if not np.isfinite([self.lo, self.hi]).all() or self.hi <= self.lo:
            raise ValueError(f"window needs finite lo < hi, got ({self.lo}, {self.hi})")

    def to_unit(self, values: torch.Tensor) -> torch.Tensor:
        """Physical units -> [0, 1] (lo -> 0, hi -> 1), any shape."""
        if self.floor is not None:
            values = values.clamp(min=self.floor)
        return (values - self.lo) / (self.hi - self.lo)

    def to_physical(self, values: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_unit`."""
        return values * (self.hi - self.lo) + self.lo


CT_WINDOW = Window(*CT_WINDOW_HU, floor=CT_WINDOW_HU[0])


def default_window(volume: Volume) -> Window:
    """The window a model for this modality was trained with.

    CT: fixed HU range, so the same tissue maps to the same value in every scan. Others (MR, US, X-ray,
    unknown): the 0.5th to 99.9th percentile of this scan, since their units are arbitrary. Models are trained
    with the window of the *low-resolution* scan, so inference computes it exactly as training did.
    """
    return window_from_slices(volume.modality, lambda: [volume.array.detach().cpu().numpy()])


def window_from_slices(modality: Modality | str, slices: Callable[[], Iterable[np.ndarray]]) -> Window:
    """:func:`default_window` of a scan too large for memory, given as slices (any shapes) in physical units.

    ``slices()`` must yield the same values each time it is called; it is called twice for non-CT modalities (see
    :func:`percentiles`), never for CT. The window equals ``default_window`` of the whole scan exactly.
    """
    if Modality(modality) == Modality.CT:
        return CT_WINDOW  # fixed: no pass over the slices
    return window_from_range(modality, intensity_range(slices))


def window_from_range(modality: Modality | str, value_range: tuple[float, float]) -> Window:
    """:func:`default_window` given the scan's :func:`intensity_range` (for callers that need the range anyway)."""
    if Modality(modality) == Modality.CT:
        return CT_WINDOW
    lo, hi = value_range
    if hi <= lo:
        raise ValueError(f"volume is constant ({lo}): nothing to super-resolve")
    return Window(lo, hi)


def intensity_range(slices: Callable[[], Iterable[np.ndarray]]) -> tuple[float, float]:
    """The (0.5th, 99.9th) percentiles of a scan given as slices in physical units (see :func:`percentiles`)."""
    low, high = percentiles(slices, (LOWER_PERCENTILE, UPPER_PERCENTILE))
    return low, high


def volume_range(volume: Volume) -> tuple[float, float]:
    """:func:`intensity_range` of a volume in memory."""
    return intensity_range(lambda: [volume.array.detach().cpu().numpy()])


_DIGIT_BITS = 16  # each pass of the selection resolves 16 bits of each sought value
_CHUNK = 1 << 18  # values histogrammed at once: bincount's int64 copy of the digits stays small and in cache


def percentiles(slices: Callable[[], Iterable[np.ndarray]], q: Sequence[float]) -> list[float]:
    """``np.percentile(all_values, q)`` (its default 'linear' method), bitwise, in memory bounded by one slice.

    Exact selection by radix: each value maps to an unsigned integer key of the same width whose order is the
    values' order. Pass 1 counts the values and histograms the top 16 bits of every key, which pins down the top 16
    bits of each sought order statistic (its rank is known once the count is); each further pass histograms the
    next 16 bits of the keys sharing the prefixes found so far. So float32 values take 2 passes, float64 4; ties
    need nothing special, and memory is one slice plus 2**16 counters per distinct prefix. The order statistics
    are interpolated with numpy's operations in numpy's order, so the result equals ``np.percentile``'s.

    Args:
        slices: Called once per pass; yields float32 (or float64; integers are widened as ``np.result_type``
            with float32 does) arrays of any shape, the same values every call.
        q: Percentiles in [0, 100].

    Raises:
        ValueError: no values, or some are NaN or infinite.
    """
    count, dtype, top_counts = 0, None, np.zeros(1 << _DIGIT_BITS, dtype=np.int64)
    for values in _chunks(slices):
        if dtype is None:
            dtype = np.result_type(values, np.float32)
        bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
        if bad:
            raise ValueError(f"{bad} voxels are NaN or infinite")
        count += np.size(values)
        top_counts += np.bincount(_digits(_keys(values, dtype), 0), minlength=1 << _DIGIT_BITS)
    if not count:
        raise ValueError("no values to take percentiles of")
    virtual = (count - 1) * np.true_divide(np.asarray(q, dtype=np.float64), 100)  # numpy's fractional rank
    below = np.minimum(np.floor(virtual), count - 1).astype(np.int64)
    above = np.minimum(below + 1, count - 1)
    ranks = np.unique(np.concatenate([below, above]))
    value = dict(zip(ranks.tolist(), _select(slices, ranks, dtype, top_counts), strict=True))
    return [
        _lerp(value[int(b)], value[int(a)], v - np.floor(v)) if v < count - 1 else float(value[count - 1])
        for b, a, v in zip(below, above, virtual, strict=True)
    ]


def _chunks(slices: Callable[[], Iterable[np.ndarray]]) -> Iterator[np.ndarray]:
    """One pass over the values of ``slices()``, flat, in runs of at most ``_CHUNK``."""
    for values in slices():
        flat = np.ravel(values)
        for start in range(0, flat.size, _CHUNK):
            yield flat[start : start + _CHUNK]


def _lerp(lower: np.floating, upper: np.floating, weight: np.float64) -> float:
    """numpy's ``_lerp`` for one pair, its operations in its order (its two forms meet at ``weight`` 0.5)."""
    difference = upper - lower  # in the data's dtype, as numpy computes it
    return float(upper - difference * (1 - weight) if weight >= 0.5 else lower + difference * weight)


def _keys(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Flat unsigned keys of ``values`` as ``dtype``, ordered as the values: negatives get all bits flipped (larger
    magnitude, smaller key), the others their sign bit set (so they sort above every negative)."""
    bits = np.dtype(dtype).itemsize * 8
    keys = np.ascontiguousarray(values, dtype=dtype).reshape(-1).view(f"uint{bits}")
    sign = keys >> keys.dtype.type(bits - 1)  # 1 for negatives
    return keys ^ (np.negative(sign) | keys.dtype.type(1 << (bits - 1)))


def _digits(keys: np.ndarray, known: int) -> np.ndarray:
    """The 16 key bits after the ``known`` leading ones."""
    bits = keys.dtype.itemsize * 8
    return (keys >> keys.dtype.type(bits - known - _DIGIT_BITS)) & keys.dtype.type((1 << _DIGIT_BITS) - 1)


def _select(
    slices: Callable[[], Iterable[np.ndarray]], ranks: np.ndarray, dtype: np.dtype, top_counts: np.ndarray
) -> list[np.floating]:
    """The values of 0-based ``ranks`` among all sorted values, given the histogram of the top 16 key bits."""
    unsigned = np.dtype(f"uint{np.dtype(dtype).itemsize * 8}")
    bits = unsigned.itemsize * 8
    prefixes = np.zeros(len(ranks), dtype=unsigned)  # the leading key bits found so far, per rank
    remaining = np.asarray(ranks, dtype=np.int64)  # its rank among the values sharing that prefix
    wanted, counts = np.zeros(1, dtype=unsigned), top_counts[np.newaxis]  # digit histograms (prefixes, 2**16)
    for known in range(0, bits, _DIGIT_BITS):
        if known:
            wanted = np.unique(prefixes)
            counts = np.zeros((len(wanted), 1 << _DIGIT_BITS), dtype=np.int64)
            for values in _chunks(slices):
                keys = _keys(values, dtype)
                heads, digits = keys >> unsigned.type(bits - known), _digits(keys, known)
                for row, prefix in enumerate(wanted):
                    counts[row] += np.bincount(digits[heads == prefix], minlength=1 << _DIGIT_BITS)
        for index, prefix in enumerate(prefixes):
            cumulative = np.cumsum(counts[np.searchsorted(wanted, prefix)])
            digit = int(np.searchsorted(cumulative, remaining[index], side="right"))  # first digit past the rank
            remaining[index] -= cumulative[digit - 1] if digit else 0
            prefixes[index] = (int(prefix) << _DIGIT_BITS) | digit
    top = unsigned.type(1 << (bits - 1))
    keys = prefixes ^ np.where(prefixes & top, top, unsigned.type(np.iinfo(unsigned).max))  # _keys backwards
    return list(keys.view(dtype))


def normalize(volume: Volume, window: Window) -> Volume:
    """Map ``window.lo -> 0`` and ``window.hi -> 1`` linearly."""
    return volume.replace(array=window.to_unit(volume.array))


def denormalize(volume: Volume, window: Window) -> Volume:
    """Inverse of :func:`normalize`: back to physical units."""
    return volume.replace(array=window.to_physical(volume.array))
