"""Where models meet volumes: tiled inference (tensor -> tensor) and ``predict_volume`` (Volume -> Volume).

Tiles overlap and cross-fade linearly in the middle half of each overlap; voxels within a quarter overlap of a
shared tile edge are never used, so a model whose receptive radius fits there gives exactly its whole-image
output. (Written here rather than taken from MONAI: MONAI is a large dependency for 80 lines, and its blending
weights never reach zero, so its tiled output is never exactly the whole-image output.)
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from tqdm import tqdm

from medsr.intensity import default_window, denormalize, normalize
from medsr.volume import Volume, integer_scale, scale_affine

Predictor = Callable[[torch.Tensor], torch.Tensor]


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start indices covering ``[0, size)`` with tiles of ``tile`` overlapping by at least ``overlap``.

    The last tile is shifted back to end at the border instead of padding the image.
    """
    if tile >= size:
        return [0]
    if not 0 <= 2 * overlap <= tile:
        raise ValueError(f"overlap {overlap} must be in [0, tile / 2] (tile {tile})")
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def _blend_weights(size: int, overlap: int, *, fade_in: bool, fade_out: bool) -> torch.Tensor:
    """Per-voxel weights (size,) of one tile along one axis, in output voxels.

    At a border shared with another tile, the weight is 0 within ``overlap / 4`` of the edge, then rises
    linearly to 1 at ``3 * overlap / 4``. Two neighbours overlapping by ``overlap`` therefore cross-fade with
    weights summing to 1, and no voxel closer than ``overlap / 4`` to a tile edge is used: a model whose
    receptive radius is at most ``overlap / 4`` gives exactly its whole-image output. Image borders get weight 1.
    """
    distance = torch.arange(size, dtype=torch.float64) + 0.5  # from the tile's first edge

    def ramp(d: torch.Tensor) -> torch.Tensor:
        return ((d - overlap / 4) / (overlap / 2)).clamp(0, 1) if overlap else torch.ones_like(d)

    weights = torch.ones(size, dtype=torch.float64)
    if fade_in:
        weights = weights * ramp(distance)
    if fade_out:
        weights = weights * ramp(size - distance)
    return weights


def _tile_window(
    corner: Sequence[int], tile: Sequence[int], spatial: Sequence[int], scale: Sequence[int], overlap: Sequence[int]
) -> torch.Tensor:
    """Separable blending weights of the tile at ``corner``, shape (*(tile * scale))."""
    window = torch.ones([t * s for t, s in zip(tile, scale, strict=True)], dtype=torch.float64)
    for axis, (a, t, n, s, o) in enumerate(zip(corner, tile, spatial, scale, overlap, strict=True)):
        weights = _blend_weights(t * s, o * s, fade_in=a > 0, fade_out=a + t < n)
        window = window * weights.reshape([-1 if d == axis else 1 for d in range(len(tile))])
    return window


@torch.no_grad()
def predict_tiled(
    predictor: Predictor,
    image: torch.Tensor,
    *,
    scale: Sequence[int],
    tile: Sequence[int],
    overlap: Sequence[int],
    batch_size: int = 4,
) -> torch.Tensor:
    """Apply ``predictor`` tile by tile and blend the upsampled tiles.

    Args:
        predictor: Maps (N, C, *tile) to (N, C_out, *(tile * scale)).
        image: Input of shape (C, *spatial).
        scale: Integer upsampling factor per spatial axis, e.g. (2, 2).
        tile: Tile size per axis in input voxels (clipped to the image).
        overlap: Overlap per axis in input voxels. Tiled equals whole-image output exactly when the model's
            receptive radius (in input voxels) is at most ``overlap / 4``; beyond that, seams stay faint.
        batch_size: Tiles per predictor call.

    Returns:
        (C_out, *(spatial * scale)) float32.
    """
    spatial = tuple(image.shape[1:])
    tile = tuple(min(t, n) for t, n in zip(tile, spatial, strict=True))
    starts = list(itertools.product(*(tile_starts(n, t, o) for n, t, o in zip(spatial, tile, overlap, strict=True))))
    out_tile = tuple(t * s for t, s in zip(tile, scale, strict=True))
    output = None
    weight = torch.zeros([n * s for n, s in zip(spatial, scale, strict=True)], dtype=torch.float64)
    for first in range(0, len(starts), batch_size):
        chunk = starts[first : first + batch_size]
        tiles = torch.stack(
            [image[(slice(None), *(slice(a, a + t) for a, t in zip(c, tile, strict=True)))] for c in chunk]
        )  # (B, C, *tile)
        predicted = predictor(tiles).to(torch.float64)  # (B, C_out, *out_tile)
        if output is None:
            output = torch.zeros((predicted.shape[1], *weight.shape), dtype=torch.float64)
        for corner, values in zip(chunk, predicted, strict=True):
            region = tuple(slice(a * s, a * s + n) for a, s, n in zip(corner, scale, out_tile, strict=True))
            window = _tile_window(corner, tile, spatial, scale, overlap)  # (*out_tile)
            output[(slice(None), *region)] += values * window
            weight[region] += window
    return (output / weight).to(torch.float32)


def model_predictor(model: torch.nn.Module) -> Predictor:
    """Wrap a model for inference: eval mode, no gradients, float32 on the model's device."""
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device  # parameterless models (interpolation) run on CPU

    @torch.no_grad()
    def predict(batch: torch.Tensor) -> torch.Tensor:
        return model(batch.to(device, torch.float32)).cpu()

    return predict


def predict_volume(
    predictor: Predictor,
    volume: Volume,
    *,
    scale: Sequence[int],
    spatial_dims: int,
    tile: int = 128,
    overlap: int = 8,
    batch_size: int = 4,
    progress: bool = True,
) -> Volume:
    """Super-resolve a volume; the output covers the same field of view with ``scale`` times more voxels.

    Args:
        predictor: A 2D (N, C, I, J) or 3D (N, C, I, J, K) upsampler, see :func:`model_predictor`.
        volume: Input, array (C, I, J, K), intensities as the predictor expects them.
        scale: Per voxel axis (i, j, k). A 2D predictor runs on each (i, j) slice and needs ``scale[2] == 1``.
        spatial_dims: 2 or 3, what the predictor takes.
        tile, overlap: Tile edge and overlap in input voxels.
    """
    scale = integer_scale(scale)
    if spatial_dims == 2:
        if scale[2] != 1:
            raise ValueError(f"a 2D model upsamples in-plane only; scale along k must be 1, got {scale}")
        slices = [
            predict_tiled(
                predictor,
                volume.array[..., k],
                scale=scale[:2],
                tile=(tile, tile),
                overlap=(overlap, overlap),
                batch_size=batch_size,
            )
            for k in tqdm(range(volume.spatial_shape[2]), desc="upscale", unit="slice", disable=not progress)
        ]
        array = torch.stack(slices, dim=-1)  # (C, I * si, J * sj, K)
    elif spatial_dims == 3:
        array = predict_tiled(
            predictor, volume.array, scale=scale, tile=(tile,) * 3, overlap=(overlap,) * 3, batch_size=batch_size
        )
    else:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return volume.replace(array=array, affine=scale_affine(volume.affine, scale))


def super_resolve(
    volume: Volume,
    model: torch.nn.Module,
    *,
    scale: Sequence[int],
    spatial_dims: int,
    tile: int = 128,
    overlap: int = 8,
    progress: bool = True,
) -> Volume:
    """Super-resolve a volume in physical units: normalise with its default window, predict, map back.

    Args:
        volume: Input in physical units (HU, scanner units), array (C, I, J, K).
        model: A trained upsampler taking [0, 1] intensities, as the checkpoints are trained.
        scale: Per voxel axis (i, j, k).
    """
    window = default_window(volume)
    sr = predict_volume(
        model_predictor(model),
        normalize(volume, window),
        scale=scale,
        spatial_dims=spatial_dims,
        tile=tile,
        overlap=overlap,
        progress=progress,
    )
    return denormalize(sr, window)
