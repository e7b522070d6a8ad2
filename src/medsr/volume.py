"""The one data type: an image plus the geometry that puts it back in the patient's space.

Geometry lives in the affine only (as in nibabel and TorchIO); spacing and orientation are derived from it.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from nibabel.affines import voxel_sizes
from nibabel.orientations import aff2axcodes

# The largest scan read whole into memory (io.read_volume): 4 GiB of float32, 2^30 voxels (a 1024^3 scan). A header
# declaring more is refused before anything is allocated or decompressed; larger scans stream (io.open_volume).
MAX_VOLUME_BYTES = 2**32


class Modality(enum.StrEnum):
    """Which scanner produced the intensities, spelled as the DICOM Modality tag (0008,0060)."""

    MR = "MR"
    CT = "CT"
    US = "US"
    CR = "CR"  # computed radiography (X-ray)
    DX = "DX"  # digital radiography (X-ray)
    OT = "OT"  # other / unknown: formats without a modality tag (NIfTI, PNG) until the user says


@dataclasses.dataclass(frozen=True)
class Volume:
    """An image and the geometry needed to put it back in the scanner's space.

    Args:
        array: float32 tensor of shape (C, I, J, K). A 2D image has K == 1.
        affine: 4x4 float64 matrix mapping voxel indices (i, j, k, 1) to RAS+ world coordinates in millimetres
            (the NIfTI/nibabel convention). Voxel indices refer to voxel centres.
        modality: Which scanner produced the intensities.
        meta: What a writer needs to write the source format back (e.g. the DICOM header of the source series).

    Functions return new volumes (``volume.replace(array=...)``) and never write into ``array`` in place.
    """

    array: torch.Tensor
    affine: np.ndarray
    modality: Modality = Modality.OT
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.array, torch.Tensor) or self.array.ndim != 4:
            shape = tuple(getattr(self.array, "shape", ()))
            raise ValueError(f"array must be a (C, I, J, K) tensor, got shape {shape}")
        if not self.array.is_floating_point():
            raise ValueError(f"array must be floating point, got {self.array.dtype}")
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise ValueError(f"affine must be a finite 4x4 matrix, got {affine.shape}")
        if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise ValueError("affine is singular: voxel axes do not span 3D space")
        object.__setattr__(self, "affine", affine)
        object.__setattr__(self, "modality", Modality(self.modality))

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        """(I, J, K) in voxels."""
        return tuple(int(n) for n in self.array.shape[1:])

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k; derived from the affine, never stored."""
        return tuple(float(s) for s in voxel_sizes(self.affine))

    @property
    def orientation(self) -> tuple[str, str, str]:
        """Axis codes of i, j, k in RAS+ terms, e.g. ('R', 'A', 'S')."""
        return tuple(aff2axcodes(self.affine))

    def replace(self, **changes: Any) -> Volume:
        """A copy with some fields changed (the volume itself is frozen)."""
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:
        spacing = ", ".join(f"{s:.3g}" for s in self.spacing)
        return (
            f"Volume(modality={self.modality.value}, channels={self.array.shape[0]}, shape={self.spatial_shape}, "
            f"spacing=({spacing}) mm, orientation={''.join(self.orientation)}, dtype={self.array.dtype})"
        )


def scale_affine(affine: np.ndarray, scale: Sequence[float]) -> np.ndarray:
    """Affine of the grid that samples the same field of view ``scale`` times more densely per axis.

    Voxel centres of the new grid divide each old voxel into ``scale`` equal parts (``scale < 1`` merges
    voxels, as in downsampling). The field of view, from the first voxel's outer edge to the last's, stays put.

    Derivation, per axis with old index ``x`` and new index ``y``: old voxel ``x`` spans ``[x - 1/2, x + 1/2]``,
    so its edges in new indices are ``s * x`` and ``s * (x + 1)`` shifted by ``-1/2``, giving
    ``x = (y + 1/2) / s - 1/2 = y / s + (1/s - 1) / 2``. Hence
    ``new_affine = affine @ [[diag(1/s), (1/s - 1) / 2], [0, 1]]``.
    PyTorch's ``interpolate(..., align_corners=False)`` uses the same convention.

    Args:
        affine: 4x4 voxel->world matrix.
        scale: Upsampling factor per voxel axis (i, j, k); may be non-integer, and < 1 to downsample.
    """
    scale = np.asarray(scale, dtype=np.float64)
    if scale.shape != (3,) or np.any(scale <= 0):
        raise ValueError(f"scale must be 3 positive factors (i, j, k), got {scale.tolist()}")
    step = 1.0 / scale
    new_to_old = np.eye(4)
    new_to_old[:3, :3] = np.diag(step)
    new_to_old[:3, 3] = (step - 1.0) / 2.0
    return np.asarray(affine, dtype=np.float64) @ new_to_old


def crop(volume: Volume, start: Sequence[int], stop: Sequence[int]) -> Volume:
    """The voxels ``[start, stop)`` per axis (i, j, k), with the affine's origin moved to the first of them.

    The array is a view of ``volume.array``; the world position of every kept voxel is unchanged.
    """
    if any(not 0 <= a < b <= n for a, b, n in zip(start, stop, volume.spatial_shape, strict=True)):
        raise ValueError(f"crop [{tuple(start)}, {tuple(stop)}) is outside the volume's {volume.spatial_shape} voxels")
    affine = volume.affine.copy()
    affine[:3, 3] = volume.affine[:3, :3] @ np.asarray(start, dtype=np.float64) + volume.affine[:3, 3]
    array = volume.array[(slice(None), *(slice(a, b) for a, b in zip(start, stop, strict=True)))]
    return volume.replace(array=array, affine=affine)


def permute_axes(volume: Volume, order: Sequence[int]) -> Volume:
    """The same voxels with the voxel axes reordered: new axis ``n`` is old axis ``order[n]`` (the affine's
    columns follow, so every voxel keeps its world position). ``permute_axes(v, (2, 0, 1))`` puts k first."""
    if sorted(order) != [0, 1, 2]:
        raise ValueError(f"order must be a permutation of (0, 1, 2), got {tuple(order)}")
    array = volume.array.permute(0, *[a + 1 for a in order]).contiguous()
    return volume.replace(array=array, affine=volume.affine[:, [*order, 3]])


def swap_into_k(volume: Volume, axis: int) -> Volume:
    """The same voxels with voxel axis ``axis`` and k swapped (the volume itself for ``axis`` 2): how a coronal
    image's rows become the slices a through-plane model thins out and restores.

    >>> swap_into_k(Volume(torch.zeros(1, 8, 6, 1), np.eye(4)), 1).spatial_shape
    (8, 1, 6)
    """
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0 (i), 1 (j) or 2 (k), got {axis}")
    return volume if axis == 2 else permute_axes(volume, [2 if a == axis else axis if a == 2 else a for a in range(3)])


def integer_scale(factors: Sequence[float]) -> tuple[int, ...]:
    """Factors as integers, e.g. (2.0, 2.0, 1.0) -> (2, 2, 1); a non-integer factor is an error, not truncated."""
    scale = tuple(int(round(f)) for f in factors)
    if any(abs(f - s) > 1e-9 or s < 1 for f, s in zip(factors, scale, strict=True)):
        raise ValueError(f"this model path needs integer factors >= 1 per axis, got {tuple(factors)}")
    return scale


def world_coordinates(affine: np.ndarray, spatial_shape: Sequence[int]) -> np.ndarray:
    """World (RAS+ mm) position of every voxel centre, shape (3, I, J, K)."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in spatial_shape], indexing="ij"))  # (3, I, J, K)
    return np.einsum("ab,b...->a...", affine[:3, :3], grid) + affine[:3, 3].reshape(3, 1, 1, 1)
