"""Where models meet volumes: tiled inference (tensor -> tensor) and ``predict_volume`` (Volume -> Volume).

Tiles overlap and cross-fade linearly in the middle half of each overlap; voxels within a quarter overlap of a
shared tile edge are never used, so a model whose receptive radius fits there gives exactly its whole-image
output. (Written here rather than taken from MONAI: MONAI is a large dependency for 80 lines, and its blending
weights never reach zero, so its tiled output is never exactly the whole-image output.)
"""

from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from medsr.degrade import Degradation
from medsr.intensity import Window, default_window, denormalize, normalize
from medsr.progress import progress_bar
from medsr.volume import Volume, integer_scale, scale_affine

Predictor = Callable[[torch.Tensor], torch.Tensor]
DEFAULT_TILE = {2: 128, 3: 48}  # tile edge in input voxels per spatial_dims; a 48^3 tile's 64-channel map is 28 MB

# oneDNN ISA names (ONEDNN_MAX_CPU_ISA) that include bf16 arithmetic: AVX512_CORE_BF16, AVX512_CORE_FP16,
# AVX512_CORE_AMX(_FP16), AVX10_1_512(_AMX(_FP16)), AVX10_2_512(_AMX_2).
PRECISIONS = ("auto", "fp32", "bf16")  # inference precision: see resolve_precision
BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10")


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


def blend_weights(size: int, overlap: int, *, fade_in: bool, fade_out: bool) -> torch.Tensor:
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
        weights = blend_weights(t * s, o * s, fade_in=a > 0, fade_out=a + t < n)
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


def native_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX) and oneDNN may use them. Without them oneDNN
    emulates bf16, and autocast is 4x slower than float32 (measured with ONEDNN_MAX_CPU_ISA=AVX2); with them it is
    about 2x faster. ``ONEDNN_MAX_CPU_ISA`` below AVX512_CORE_BF16 (e.g. AVX2, AVX512_CORE) counts as no bf16.
    """
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    if limit != "ALL" and not limit.startswith(BF16_ISAS):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no way to ask without private torch APIs; float32 is the safe choice
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device for a ``--device`` value: 'cpu', 'cuda' or 'cuda:N', 'mps', or 'auto' (the first CUDA GPU
    when there is one, else the CPU). A device this machine lacks is a ValueError saying so.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device {device!r}: expected auto, cpu, cuda, cuda:N or mps") from error
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r}: this machine has no CUDA GPU that torch can use (torch {torch.__version__})"
        )
    if chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: no Apple GPU (MPS) here")
    if chosen.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r}: expected auto, cpu, cuda, cuda:N or mps")
    return chosen


def network_device(network: torch.nn.Module) -> torch.device:
    """Where a network's weights are; the CPU for a parameterless one (an interpolation baseline)."""
    return next(network.parameters(), torch.empty(0)).device


def on_device(network: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``network`` if it is on ``device`` already, else a copy moved there (the caller's network stays put).

    >>> net = torch.nn.Conv2d(1, 1, 3)
    >>> on_device(net, torch.device("cpu")) is net
    True
    """
    return network if network_device(network) == device else copy.deepcopy(network).to(device)


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """'fp32' or 'bf16' for a requested 'auto', 'fp32' or 'bf16': 'auto' is bf16 where ``device`` runs it natively."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    if precision != "auto":
        return precision
    native = torch.cuda.is_bf16_supported() if torch.device(device).type == "cuda" else native_bf16()
    return "bf16" if native else "fp32"


def model_predictor(model: torch.nn.Module, *, precision: str = "auto") -> Predictor:
    """Wrap a model for inference: eval mode, no gradients, float32 in and out, on the model's device.

    Args:
        precision: 'fp32'; 'bf16' (bfloat16 autocast with channels-last memory, about 2x faster on CPUs with bf16
            instructions, within 0.01 dB PSNR of float32 on the shipped MR model); 'auto' picks bf16 where the CPU
            (or CUDA GPU) supports it natively, fp32 elsewhere.

    bf16 runs a channels-last copy made at the first batch: ``model`` itself is never changed (but for eval mode),
    so build a new predictor after changing its weights.
    """
    model.eval()
    device = network_device(model)
    bf16 = resolve_precision(precision, device) == "bf16"
    layouts = {}  # batch ndim -> a channels-last copy of the model (bf16 only)

    @torch.no_grad()
    def predict(batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(device, torch.float32)
        net = model
        if bf16:  # channels-last alone can be slower (pixel shuffle reshapes); with bf16 it pays
            layout = torch.channels_last if batch.ndim == 4 else torch.channels_last_3d
            batch = batch.contiguous(memory_format=layout)
            # A copy: the caller's model keeps its layout. Converted in place, a model validated during training
            # would train on in channels-last weights, which take other kernels (other roundings) than the
            # contiguous weights a resumed run loads.
            if batch.ndim not in layouts:
                layouts[batch.ndim] = copy.deepcopy(model).to(memory_format=layout)
            net = layouts[batch.ndim]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return net(batch).float().contiguous().cpu()

    return predict


def model_plan(factors: Sequence[float], model_scale: Sequence[int]) -> tuple[int, int, int]:
    """The per-axis (i, j, k) scale a model applies to a volume when the user asks for ``factors``.

    A 3D model applies its scale. A 2D model of scale (a, b) works in-plane, giving (a, b, 1), unless a factor
    along k is asked for: then it must upsample one axis only, (1, c) or (c, 1), and runs through-plane, giving
    (1, 1, c) (see :func:`predict_volume`). What the model does not reach, :func:`resample` does.
    """
    model_scale = tuple(model_scale)
    if len(model_scale) == 3:
        return model_scale
    if factors[2] <= 1 + 1e-6:
        return (*model_scale, 1)
    if 1 not in model_scale:
        raise ValueError(
            f"a 2D model of scale {model_scale} upsamples two axes of a plane; for a factor along k "
            f"({factors[2]:g}) use a 2D model of scale (1, s) (self-supervised mode) or a 3D model"
        )
    return (1, 1, max(model_scale))


def resample(volume: Volume, shape: Sequence[int]) -> Volume:
    """Resample to ``shape`` (I, J, K) over the same field of view, (tri)linearly: the step from a model's integer
    scale to a requested non-integer factor or spacing. Linear never overshoots, so HU stay in range."""
    if tuple(shape) == volume.spatial_shape:
        return volume
    if min(shape) < 1:
        raise ValueError(f"cannot resample {volume.spatial_shape} to {tuple(shape)}")
    array = torch.nn.functional.interpolate(
        volume.array[None], size=tuple(shape), mode="trilinear", align_corners=False
    )
    factors = [m / n for m, n in zip(shape, volume.spatial_shape, strict=True)]
    return volume.replace(array=array[0], affine=scale_affine(volume.affine, factors))


def predict_planes(
    predictor: Predictor,
    array: torch.Tensor,
    axes: tuple[int, int],
    scale: Sequence[int],
    *,
    tile: int,
    overlap: int,
    batch_size: int,
    progress: bool,
) -> torch.Tensor:
    """Run a 2D predictor on every plane spanned by two spatial ``axes`` of a (C, I, J, K) array.

    ``axes`` (a, b), a < b, name the plane's first and second axis (0 = i, 1 = j, 2 = k); ``scale`` is the 2D
    predictor's (sa, sb). Returns the array with axes a and b scaled, (C, I, J, K) layout kept.
    """
    (first, second), (normal,) = axes, {0, 1, 2} - set(axes)
    stack = array.permute(0, normal + 1, first + 1, second + 1)  # (C, N, A, B)
    name = "ijk"
    planes = [
        predict_tiled(
            predictor,
            stack[:, n],
            scale=tuple(scale),
            tile=(tile, tile),
            overlap=(overlap, overlap),
            batch_size=batch_size,
        )
        for n in progress_bar(
            range(stack.shape[1]), desc=f"planes ({name[first]}, {name[second]})", unit="plane", disable=not progress
        )
    ]
    order = [0, normal + 1, first + 1, second + 1]
    return torch.stack(planes, dim=1).permute(*[order.index(d) for d in range(4)])


def predict_orthogonal_planes(predictor: Predictor, array: torch.Tensor, scale: int, **run: int | bool) -> torch.Tensor:
    """Through-plane: a 2D predictor that scales its second axis by ``scale`` (1 = restoration only) runs on every
    (i, k) and every (j, k) plane of a (C, I, J, K) array; the two results are averaged (the orthogonal-planes
    scheme of Zhao et al., SMORE, IEEE TMI 2021). Returns (C, I, J, K * scale). ``run``: see :func:`predict_planes`.
    """
    along_i = predict_planes(predictor, array, (0, 2), (1, scale), **run)
    along_j = predict_planes(predictor, array, (1, 2), (1, scale), **run)
    return (along_i + along_j) / 2


def predict_volume(
    predictor: Predictor,
    volume: Volume,
    *,
    scale: Sequence[int],
    spatial_dims: int,
    tile: int | None = None,
    overlap: int = 8,
    batch_size: int = 4,
    progress: bool = True,
) -> Volume:
    """Super-resolve a volume; the output covers the same field of view with ``scale`` times more voxels.

    Args:
        predictor: A 2D (N, C, I, J) or 3D (N, C, I, J, K) upsampler, see :func:`model_predictor`.
        volume: Input, array (C, I, J, K), intensities as the predictor expects them.
        scale: Per voxel axis (i, j, k). A 2D predictor runs on each (i, j) slice when ``scale[2] == 1``. With
            ``scale == (1, 1, c)`` it must upsample its second axis by c, (N, C, n, K) -> (N, C, n, c K), and
            runs through-plane: on every (i, k) plane and every (j, k) plane, and the two results are averaged
            (the orthogonal-planes scheme of Zhao et al., SMORE, IEEE TMI 2021).
        tile, overlap: Tile edge and overlap in input voxels; tiles default to 128^2 in 2D and 48^3 in 3D (a
            64-channel feature map of a 48^3 tile is 28 MB in float32).
    """
    scale = integer_scale(scale)
    tile = tile or DEFAULT_TILE.get(spatial_dims, 0)
    if spatial_dims == 3:
        array = predict_tiled(
            predictor, volume.array, scale=scale, tile=(tile,) * 3, overlap=(overlap,) * 3, batch_size=batch_size
        )
        return volume.replace(array=array, affine=scale_affine(volume.affine, scale))
    if spatial_dims != 2:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")

    run = {"tile": tile, "overlap": overlap, "batch_size": batch_size, "progress": progress}
    if scale[2] == 1:
        array = predict_planes(predictor, volume.array, (0, 1), scale[:2], **run)
    elif scale[:2] == (1, 1):
        array = predict_orthogonal_planes(predictor, volume.array, scale[2], **run)
    else:
        raise ValueError(f"a 2D model upsamples in-plane or through-plane (1, 1, s), not both: got scale {scale}")
    return volume.replace(array=array, affine=scale_affine(volume.affine, scale))


def super_resolve(
    volume: Volume,
    model: torch.nn.Module,
    *,
    model_scale: Sequence[int],
    factors: Sequence[float] | None = None,
    tile: int | None = None,
    overlap: int = 8,
    precision: str = "auto",
    progress: bool = True,
    window: Window | None = None,
    consistency: Degradation | None = None,
) -> Volume:
    """Super-resolve a volume in physical units: normalise with its default window, predict, resample to the
    requested factors, map back.

    Args:
        volume: Input in physical units (HU, scanner units), array (C, I, J, K).
        model: A trained upsampler taking [0, 1] intensities, as the checkpoints are trained.
        model_scale: The model's scale per model axis: (a, b) for 2D models, (a, b, c) for 3D.
        factors: Output voxels per input voxel along (i, j, k), possibly non-integer (e.g. from a target spacing);
            default: the model's own scale (see :func:`model_plan`). The output has round(n * factor) voxels.
        precision: See :func:`model_predictor`.
        window: The volume's ``intensity.default_window`` when the caller has it already; computed otherwise.
        consistency: MR in-plane k-space degradation whose measured band the output gets back from the input
            (``consistency.kspace_consistency``; at the model's own scale only); None: off.
    """
    scale = model_plan(factors or (1, 1, 1), model_scale)
    factors = factors or scale
    window = window or default_window(volume)
    lr = normalize(volume, window)
    sr = predict_volume(
        model_predictor(model, precision=precision),
        lr,
        scale=scale,
        spatial_dims=len(model_scale),
        tile=tile,
        overlap=overlap,
        progress=progress,
    )
    if consistency is not None:
        from medsr.consistency import kspace_consistency  # consistency -> data -> io: kept out of infer's imports

        sr = kspace_consistency(sr, lr, consistency)
    shape = [max(1, round(n * f)) for n, f in zip(volume.spatial_shape, factors, strict=True)]
    return denormalize(resample(sr, shape), window)
