"""Where models meet volumes: tiled inference (tensor -> tensor) and ``predict_volume`` (Volume -> Volume).

Tiles come from a memory budget (:func:`volume_tiling`): the whole plane (2D models) or volume (3D) when one forward
of it fits, several planes stacked into one forward when they fit together, else the grid of tiles that fit with
the least work. Neighbouring tiles overlap by twice the model's receptive radius (measured once per model,
:func:`footprint`), and each keeps only its central part, cut in the middle of every overlap (:func:`tile_bounds`):
each kept voxel sees all it depends on, so the tiled output is the whole-image output up to float rounding, and
nothing is blended. (Written here rather than taken from MONAI: its sliding window blends with weights that never
reach zero, so its tiled output is never the whole-image output.)
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import logging
import math
import os
import re
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from medsr.degrade import Degradation
from medsr.intensity import Window, default_window, denormalize, normalize
from medsr.progress import progress_bar
from medsr.volume import Volume, integer_scale, scale_affine

if TYPE_CHECKING:
    from tqdm import tqdm

LOG = logging.getLogger("medsr")
Predictor = Callable[[torch.Tensor], torch.Tensor]
DEFAULT_MEMORY = 2 * 2**30  # bytes one forward may use (``--memory``): tiles and batches are sized to it
# A forward's peak working memory over its widest tensor in float32: measured 2.6-3.3 for EDSR (2D x2, x4; 3D x2),
# less with bf16 autocast (benchmarks/overhead.py prints the check).
MEMORY_FACTOR = 4
# On the CPU a forward runs out of cache beyond about this many bytes of its widest tensor (float32): edsr_mr_x2 runs
# fastest on forwards of 8k-32k input voxels (4-16 MiB), 1.3-1.5x slower per voxel at 64k and 2-2.5x at 256k (fp32
# and bf16, 2 cores), so planes or tiles are stacked only up to it. GPUs stack up to the memory budget.
CPU_CALL_BYTES = 8 * 2**20
MAX_RADIUS = 64  # receptive radii are probed up to this many input voxels; farther (global pooling) tiles approximately
MIN_CORE = 8  # input voxels a tile keeps beyond its overlap, at least (more when the overlap is large)

# oneDNN ISA names (ONEDNN_MAX_CPU_ISA) that include bf16 arithmetic: AVX512_CORE_BF16, AVX512_CORE_FP16,
# AVX512_CORE_AMX(_FP16), AVX10_1_512(_AMX(_FP16)), AVX10_2_512(_AMX_2).
PRECISIONS = ("auto", "fp32", "bf16")  # inference precision: see resolve_precision
BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10")
UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclasses.dataclass(frozen=True)
class Footprint:
    """What tiling needs to know about a model (see :func:`footprint`).

    Args:
        radius: Per model axis, how many input voxels on either side of an output voxel's own input voxel can change
            it: its receptive radius. Tiles overlapping by twice this give the whole-image output.
        widest: Elements per input voxel of the widest tensor one forward makes (128 for the 32-channel, x2 x2
            sub-pixel layer of edsr_small).
    """

    radius: tuple[int, ...]
    widest: float

    @property
    def bytes_per_voxel(self) -> float:
        """Working memory of one forward per input voxel: ``MEMORY_FACTOR`` times the widest tensor in float32 (bf16
        autocast takes less)."""
        return MEMORY_FACTOR * self.widest * 4


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How a (C, I, J, K) volume is cut for a model, per volume axis (i, j, k), in input voxels.

    Args:
        tile: Tile edge per axis. A 2D model upsampling in-plane tiles (i, j); ``tile[2]`` is then the planes stacked
            into one call. Through-plane, ``tile`` holds the (i, k) planes' and the (j, k) planes' tiles.
        overlap: Voxels shared by neighbouring tiles per axis (0 where nothing is tiled).
        batch: Tiles (or whole planes) per forward.
    """

    tile: tuple[int, int, int]
    overlap: tuple[int, int, int]
    batch: int


def parse_memory(text: str) -> int:
    """Bytes from a size like '2G', '512M', '1.5GiB' or '4096' (binary units: 1G = 2**30 bytes).

    >>> parse_memory("2G"), parse_memory("512MiB"), parse_memory("1e6")
    (2147483648, 536870912, 1000000)
    """
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(?:i?B)?\s*", str(text), flags=re.IGNORECASE)
    try:
        value = float(match[1]) * UNITS[match[2].upper()] if match else math.nan
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 1):
        raise ValueError(f"memory {text!r}: expected a size in bytes like 2G, 512M or 1.5GiB")
    return int(value)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start indices covering ``[0, size)`` with tiles of ``tile`` overlapping by at least ``overlap``.

    The last tile is shifted back to end at the border instead of padding the image.

    >>> tile_starts(100, 40, 10)
    [0, 30, 60]
    """
    if tile >= size:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"tile {tile} voxels must be larger than the overlap ({overlap} voxels)")
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def tile_bounds(starts: Sequence[int], tile: int, size: int) -> list[int]:
    """Where tiles hand over: tile n keeps ``[bounds[n], bounds[n + 1])``, cut in the middle of each overlap, so it
    keeps at least ``overlap // 2`` voxels away from a shared edge.

    >>> tile_bounds([0, 30, 60], 40, 100)
    [0, 35, 65, 100]
    """
    cuts = [(a + tile + b) // 2 for a, b in zip(starts, starts[1:], strict=False)]
    return [0, *cuts, size]


def predict_tiled(
    predictor: Predictor,
    image: torch.Tensor,
    *,
    scale: Sequence[int],
    tile: Sequence[int],
    overlap: Sequence[int],
    batch_size: int = 4,
) -> torch.Tensor:
    """Apply ``predictor`` tile by tile, each tile keeping its central part (see :func:`tile_bounds`).

    Args:
        predictor: Maps (N, C, *tile) to (N, C_out, *(tile * scale)).
        image: Input of shape (C, *spatial).
        scale: Integer upsampling factor per spatial axis, e.g. (2, 2).
        tile: Tile size per axis in input voxels (clipped to the image).
        overlap: Voxels neighbouring tiles share per axis. The output is the whole-image output (to float rounding)
            when it is at least twice the model's receptive radius (:func:`receptive_radius`).
        batch_size: Tiles per predictor call.

    Returns:
        (C_out, *(spatial * scale)) float32.

    >>> nearest = lambda x: x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    >>> predict_tiled(nearest, torch.ones(1, 50, 30), scale=(2, 2), tile=(20, 20), overlap=(4, 4)).shape
    torch.Size([1, 100, 60])
    """
    return _predict_stack(predictor, image[None], scale=scale, tile=tile, overlap=overlap, batch=batch_size)[0]


def _predict_stack(
    predictor: Predictor,
    stack: torch.Tensor,
    *,
    scale: Sequence[int],
    tile: Sequence[int],
    overlap: Sequence[int],
    batch: int,
    group: int = 1,
    bar: tqdm | None = None,
) -> torch.Tensor:
    """:func:`predict_tiled` of each image of a (N, C, *spatial) stack -> (N, C_out, *(spatial * scale)) float32.

    Images are taken ``group`` at a time, and their tiles go to the predictor ``batch`` at a time, row by row along
    the last axis: a slab of that axis (as streamed) makes the very calls it makes in the whole stack. ``bar``
    counts the images done.
    """
    spatial = tuple(stack.shape[2:])
    tile = tuple(min(t, n) for t, n in zip(tile, spatial, strict=True))
    starts = [tile_starts(n, t, o) for n, t, o in zip(spatial, tile, overlap, strict=True)]
    bounds = [tile_bounds(s, t, n) for s, t, n in zip(starts, tile, spatial, strict=True)]
    output = None
    for start, last in itertools.product(range(0, len(stack), group), range(len(starts[-1]))):
        images = range(start, min(start + group, len(stack)))
        items = list(itertools.product(images, *(range(len(s)) for s in starts[:-1])))
        for first in range(0, len(items), batch):
            chunk = [(*item, last) for item in items[first : first + batch]]
            tiles = torch.stack(
                [
                    stack[(n, slice(None), *(slice(s[i], s[i] + t) for s, i, t in zip(starts, at, tile, strict=True)))]
                    for n, *at in chunk
                ]
            )  # (B, C, *tile)
            predicted = predictor(tiles)  # (B, C_out, *(tile * scale))
            if output is None:
                shape = (len(stack), predicted.shape[1], *(n * s for n, s in zip(spatial, scale, strict=True)))
                output = torch.empty(shape, dtype=torch.float32)
            for (n, *at), values in zip(chunk, predicted, strict=True):
                kept = [(b[i], b[i + 1], s[i]) for b, s, i in zip(bounds, starts, at, strict=True)]
                target = tuple(slice(lo * f, hi * f) for (lo, hi, _), f in zip(kept, scale, strict=True))
                source = tuple(slice((lo - a) * f, (hi - a) * f) for (lo, hi, a), f in zip(kept, scale, strict=True))
                output[(n, slice(None), *target)] = values[(slice(None), *source)]
        if bar is not None and last == len(starts[-1]) - 1:
            bar.update(len(images))
    return output


def receptive_radius(
    function: Callable[[torch.Tensor], torch.Tensor], spatial_dims: int, channels: int = 1, dtype=torch.float64
) -> tuple[int, ...]:
    """Per axis, how many input voxels on either side of an output voxel's own input voxel can change it (output
    voxel o along an axis of scale s belongs to input voxel o // s).

    Measured on a random probe (``dtype``, 2 r + 1 voxels along the axis, 1 across): the input voxels where the
    gradient of the middle input voxel's output voxels is not zero (float64 shows even the weakest path of a deep
    network), or, for a function without gradients, the output voxels that change when the middle input voxel does.
    The probe grows up to ``MAX_RADIUS``; a model reaching that far (global pooling, as in RCAN's channel attention)
    gets ``MAX_RADIUS`` and a warning that its tiles only approximate it.

    >>> convs = torch.nn.Sequential(*[torch.nn.Conv2d(1, 1, 3, padding=1) for _ in range(5)]).double()
    >>> receptive_radius(convs, 2)
    (5, 5)
    """
    generator = torch.Generator().manual_seed(0)
    radii = []
    for axis in range(spatial_dims):
        reach = MAX_RADIUS // 2
        while True:
            radius = _reach(function, axis, reach, spatial_dims, channels, dtype, generator)
            if radius < reach - 2 or reach >= MAX_RADIUS:  # clear of the probe's edge (where the effect may vanish)
                break
            reach *= 2
        if radius >= MAX_RADIUS - 2:
            radius = MAX_RADIUS
            LOG.warning(
                "the model reaches beyond %d voxels along axis %d (global context?): tiled output only approximates "
                "the whole-image output; give a memory budget that holds whole images",
                MAX_RADIUS,
                axis,
            )
        radii.append(radius)
    return tuple(radii)


def _reach(function, axis: int, reach: int, spatial_dims: int, channels: int, dtype, generator) -> int:
    """The receptive radius along ``axis`` seen on a probe of 2 ``reach`` + 1 voxels (see :func:`receptive_radius`)."""
    shape = [1] * spatial_dims
    shape[axis] = 2 * reach + 1
    probe = torch.rand((1, channels, *shape), generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
    with torch.enable_grad():
        output = function(probe)
    if output.shape[2 + axis] % shape[axis]:
        raise ValueError(f"the model maps {shape[axis]} voxels to {output.shape[2 + axis]} along axis {axis}")
    scale = output.shape[2 + axis] // shape[axis]
    if output.requires_grad:
        output.narrow(2 + axis, reach * scale, scale).sum().backward()
        along = probe.grad.abs().amax(dim=(0, 1)).flatten()  # (2 reach + 1,) input voxels
    else:
        changed = probe.detach().clone()
        changed[(0, slice(None), *(n // 2 for n in shape))] += 1
        with torch.no_grad():
            difference = (function(changed) - output).abs().amax(dim=(0, 1))
        along = difference.flatten().reshape(-1, scale).amax(dim=1)  # (2 reach + 1,) by owning input voxel
    reached = torch.nonzero(along > 0)[:, 0]
    return int((reached - reach).abs().max()) if len(reached) else 0


_FOOTPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # predictor -> {(dims, C): Footprint}
_NETWORK_FOOTPRINTS: dict[str, dict] = {}  # network_digest -> {(dims, C): Footprint}, the last MAX_NETWORKS
MAX_NETWORKS = 16


def network_digest(network: torch.nn.Module) -> str:
    """SHA-256 of a network's class, parameter and buffer names, shapes, dtypes and values: equal for the same
    model loaded again (so what is measured of it is measured once per process, not once per load).

    >>> network_digest(torch.nn.Conv2d(1, 1, 3)) == network_digest(torch.nn.Conv2d(1, 1, 3))  # random weights
    False
    """
    digest = hashlib.sha256(f"{type(network).__module__}.{type(network).__qualname__}".encode())
    for name, tensor in itertools.chain(network.named_parameters(), network.named_buffers()):
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def footprint(predictor: Predictor, spatial_dims: int, channels: int = 1) -> Footprint:
    """The receptive radius and working memory of what ``predictor`` runs, measured once per network (the same
    weights loaded again count as the same network: :func:`network_digest`) or predictor.

    A :class:`ModelPredictor` is measured on a float64 CPU copy of its network: the radius by
    :func:`receptive_radius`, the widest tensor by forward hooks on all its modules during a small forward. Other
    predictors (interpolators, ONNX) are probed through themselves in float32; their widest tensor is taken to be
    their output.

    >>> footprint(model_predictor(torch.nn.Conv2d(1, 1, 3, padding=1)), 2)
    Footprint(radius=(1, 1), widest=1.0)
    """
    network = predictor.network if isinstance(predictor, ModelPredictor) else None
    if network is None:
        measured = _FOOTPRINTS.setdefault(predictor, {})
    else:
        measured = _NETWORK_FOOTPRINTS.setdefault(network_digest(network), {})
        while len(_NETWORK_FOOTPRINTS) > MAX_NETWORKS:
            del _NETWORK_FOOTPRINTS[next(iter(_NETWORK_FOOTPRINTS))]  # the oldest
    if (spatial_dims, channels) not in measured:
        if network is None:
            measured[spatial_dims, channels] = _measure(predictor, spatial_dims, channels, torch.float32, [])
        else:
            probe = copy.deepcopy(network).to("cpu", torch.float64).eval()
            measured[spatial_dims, channels] = _measure(probe, spatial_dims, channels, torch.float64, probe.modules())
    return measured[spatial_dims, channels]


def _measure(function: Predictor, spatial_dims: int, channels: int, dtype, modules) -> Footprint:
    """The :class:`Footprint` of ``function``; ``modules``: where forward hooks find the widest tensor (else the
    output)."""
    widest = 0
    probe = torch.rand((1, channels, *(8,) * spatial_dims), generator=torch.Generator().manual_seed(0)).to(dtype)

    def record(module, inputs, output) -> None:
        nonlocal widest
        widest = max(widest, output.numel() if isinstance(output, torch.Tensor) else 0)

    hooks = [module.register_forward_hook(record) for module in modules]
    try:
        with torch.no_grad():
            output = function(probe).numel()
        widest = max(widest, output)
    finally:
        for hook in hooks:
            hook.remove()
    radius = receptive_radius(function, spatial_dims, channels, dtype)
    return Footprint(radius, widest / 8**spatial_dims)


def choose_tiles(spatial: Sequence[int], overlap: Sequence[int], max_voxels: float) -> tuple[int, ...]:
    """Tile edges (input voxels per axis) for an image of ``spatial`` voxels and tiles of at most ``max_voxels``.

    The whole image when it fits. Else, among the grids of tiles that fit, the one computing the fewest voxels in all
    (ties: fewer tiles), each axis's tiles as small as their count allows (balanced, not the largest that fit). Tiles
    keep at least ``max(MIN_CORE, overlap / 2)`` voxels beyond the overlap; when not even those fit, the smallest
    such tiles, with a warning.

    >>> choose_tiles((256, 256), (40, 40), 256 * 256)
    (256, 256)
    >>> choose_tiles((256, 256), (40, 40), 256 * 160)
    (256, 148)
    """
    spatial = tuple(int(n) for n in spatial)
    if math.prod(spatial) <= max_voxels:
        return spatial
    options = [_axis_tilings(n, o) for n, o in zip(spatial, overlap, strict=True)]  # per axis: (edges, counts)
    grids = np.meshgrid(*(edges for edges, _ in options), indexing="ij")
    counts = np.meshgrid(*(c for _, c in options), indexing="ij")
    voxels = np.prod(grids, axis=0, dtype=np.float64)
    work = voxels * np.prod(counts, axis=0, dtype=np.float64)
    if not (voxels <= max_voxels).any():
        smallest = tuple(int(edges[-1]) for edges, _ in options)
        LOG.warning(
            "a memory budget for tiles of %d voxels is too small for overlaps of %s voxels; using tiles of %s",
            max_voxels,
            tuple(overlap),
            smallest,
        )
        return smallest
    order = np.lexsort((np.prod(counts, axis=0).ravel(), np.where(voxels <= max_voxels, work, np.inf).ravel()))
    best = np.unravel_index(order[0], voxels.shape)
    return tuple(int(grid[best]) for grid in grids)


def _axis_tilings(size: int, overlap: int) -> tuple[np.ndarray, np.ndarray]:
    """(edges, counts) of the balanced tilings of one axis: for each tile count, the smallest edge giving it."""
    smallest = min(size, overlap + max(MIN_CORE, overlap // 2))
    edges, counts = [], []
    for count in itertools.count(1):
        edge = min(size, math.ceil((size + (count - 1) * overlap) / count))
        if edge < smallest:
            break
        if not edges or edge < edges[-1]:
            edges.append(edge)
            counts.append(len(tile_starts(size, edge, overlap)))
    return np.array(edges), np.array(counts)


def volume_tiling(
    predictor: Predictor,
    shape: Sequence[int],
    *,
    spatial_dims: int,
    through_plane: bool = False,
    tile: int | Sequence[int] | None = None,
    overlap: int | Sequence[int] | None = None,
    memory: float = DEFAULT_MEMORY,
) -> Tiling:
    """How ``predict_volume`` cuts a (C, I, J, K) volume of ``shape`` for ``predictor``.

    Args:
        predictor, spatial_dims: As for :func:`predict_volume`.
        through_plane: A 2D model runs on the (i, k) and (j, k) planes (:func:`predict_orthogonal_planes`), not on
            the (i, j) planes.
        tile: Tile edge in input voxels, one for all tiled axes or per volume axis (i, j, k); default: from
            ``memory`` (:func:`choose_tiles`; a forward of a tile costs ``footprint(...).bytes_per_voxel`` per voxel).
        overlap: Voxels neighbouring tiles share, one or per volume axis; default: twice the receptive radius.
        memory: Bytes one forward may use: it bounds the tiles and the tiles (or planes) per call (on the CPU also
            ``CPU_CALL_BYTES`` of the widest tensor, beyond which forwards run out of cache).

    >>> tiling = volume_tiling(lambda x: x, (1, 300, 200, 10), spatial_dims=2)
    >>> tiling.tile, tiling.overlap
    ((300, 200, 10), (0, 0, 0))
    """
    channels, size_i, size_j, size_k = shape
    found = footprint(predictor, spatial_dims, channels)
    if spatial_dims == 3:
        plane, axes = (size_i, size_j, size_k), ((0,), (1,), (2,))
    elif not through_plane:  # (i, j) planes
        plane, axes = (size_i, size_j), ((0,), (1,))
    else:  # through-plane: the (i, k) and the (j, k) planes, tiled alike
        plane, axes = (max(size_i, size_j), size_k), ((0, 1), (2,))
    overlaps = _per_axis(overlap, axes) or tuple(2 * r for r in found.radius)
    max_voxels = memory / found.bytes_per_voxel
    given = _per_axis(tile, axes)
    if given is None:
        tiles = choose_tiles(plane, overlaps, max_voxels)
    else:
        tiles = tuple(min(t, n) for t, n in zip(given, plane, strict=True))
        for t, n, o in zip(tiles, plane, overlaps, strict=True):
            if t < n and t <= o:
                raise ValueError(f"tile {t} voxels must be larger than the overlap ({o} voxels); give a larger tile")
    batch = int(max_voxels // math.prod(tiles))
    if not isinstance(predictor, ModelPredictor) or predictor.device.type == "cpu":
        batch = min(batch, int(CPU_CALL_BYTES // (math.prod(tiles) * found.widest * 4)))
    batch = max(1, batch)
    if spatial_dims == 3:
        return Tiling(tiles, overlaps, batch)
    if not through_plane:
        return Tiling((*tiles, min(size_k, _planes_per_call(plane, tiles, overlaps, batch))), (*overlaps, 0), batch)
    first, last = tiles
    return Tiling((min(first, size_i), min(first, size_j), last), (overlaps[0], *overlaps), batch)


def _per_axis(value: int | Sequence[int] | None, axes: Sequence[Sequence[int]]) -> tuple[int, ...] | None:
    """``value`` (one for all, or per volume axis) on each group of volume ``axes`` (the largest in a group)."""
    if value is None:
        return None
    return tuple(value if isinstance(value, int) else max(int(value[a]) for a in group) for group in axes)


def _planes_per_call(plane: Sequence[int], tile: Sequence[int], overlap: Sequence[int], batch: int) -> int:
    """How many planes :func:`predict_planes` stacks per call of :func:`_predict_stack`: as many as put one row of
    tiles (along the plane's last axis) each into a batch of ``batch`` tiles, at least one."""
    rows = [len(tile_starts(n, min(t, n), o)) for n, t, o in zip(plane[:-1], tile[:-1], overlap[:-1], strict=True)]
    return max(1, batch // math.prod(rows))


class ModelPredictor:
    """A network run for inference (see :func:`model_predictor`): (N, C, *spatial) -> float32 on the CPU.

    Args:
        network: The network, in eval mode; tiling measures it (:func:`footprint`).
        bf16: Run under bfloat16 autocast with a channels-last copy of the network.
    """

    def __init__(self, network: torch.nn.Module, *, bf16: bool) -> None:
        self.network, self.bf16 = network.eval(), bf16
        self.device = network_device(network)
        self.layouts: dict[int, torch.nn.Module] = {}  # batch ndim -> a channels-last copy of the network (bf16 only)

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device, torch.float32)
        net = self.network
        if self.bf16:  # channels-last alone can be slower (pixel shuffle reshapes); with bf16 it pays
            layout = torch.channels_last if batch.ndim == 4 else torch.channels_last_3d
            batch = batch.contiguous(memory_format=layout)
            # A copy: the caller's model keeps its layout. Converted in place, a model validated during training
            # would train on in channels-last weights, which take other kernels (other roundings) than the
            # contiguous weights a resumed run loads.
            if batch.ndim not in self.layouts:
                self.layouts[batch.ndim] = copy.deepcopy(self.network).to(memory_format=layout)
            net = self.layouts[batch.ndim]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return net(batch).float().contiguous().cpu()


def model_predictor(model: torch.nn.Module, *, precision: str = "auto") -> ModelPredictor:
    """Wrap a model for inference: eval mode, no gradients, float32 in and out, on the model's device.

    Args:
        precision: 'fp32'; 'bf16' (bfloat16 autocast with channels-last memory, about 2x faster on CPUs with bf16
            instructions, within 0.01 dB PSNR of float32 on the shipped MR model); 'auto' picks bf16 where the CPU
            (or CUDA GPU) supports it natively, fp32 elsewhere.

    bf16 runs a channels-last copy made at the first batch: ``model`` itself is never changed (but for eval mode),
    so build a new predictor after changing its weights.

    >>> predict = model_predictor(torch.nn.Conv2d(1, 1, 3, padding=1), precision="fp32")
    >>> predict(torch.rand(2, 1, 8, 8)).shape
    torch.Size([2, 1, 8, 8])
    """
    return ModelPredictor(model, bf16=resolve_precision(precision, network_device(model)) == "bf16")


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
    tile: Sequence[int],
    overlap: Sequence[int],
    batch: int,
    progress: bool,
) -> torch.Tensor:
    """Run a 2D predictor on every plane spanned by two spatial ``axes`` of a (C, I, J, K) array.

    ``axes`` (a, b), a < b, name the plane's first and second axis (0 = i, 1 = j, 2 = k); ``scale`` is the 2D
    predictor's (sa, sb); ``tile`` and ``overlap`` the planes' (see :func:`predict_tiled`). Planes are stacked
    ``_planes_per_call`` at a time, ``batch`` tiles (or whole planes) per predictor call. Returns the array with
    axes a and b scaled, (C, I, J, K) layout kept.
    """
    (first, second), (normal,) = axes, {0, 1, 2} - set(axes)
    stack = array.permute(normal + 1, 0, first + 1, second + 1)  # (N, C, A, B)
    group = _planes_per_call(stack.shape[2:], tile, overlap, batch)
    name = "ijk"
    bar = progress_bar(
        total=len(stack), desc=f"planes ({name[first]}, {name[second]})", unit="plane", disable=not progress
    )
    output = _predict_stack(
        predictor, stack, scale=scale, tile=tile, overlap=overlap, batch=batch, group=group, bar=bar
    )
    bar.close()
    order = [normal + 1, 0, first + 1, second + 1]
    return output.permute(*[order.index(d) for d in range(4)])


def predict_orthogonal_planes(
    predictor: Predictor,
    array: torch.Tensor,
    scale: int,
    *,
    tile: int | Sequence[int] | None = None,
    overlap: int | Sequence[int] | None = None,
    memory: float = DEFAULT_MEMORY,
    progress: bool = True,
) -> torch.Tensor:
    """Through-plane: a 2D predictor that scales its second axis by ``scale`` (1 = restoration only) runs on every
    (i, k) and every (j, k) plane of a (C, I, J, K) array; the two results are averaged (the orthogonal-planes scheme
    of Zhao et al., SMORE, IEEE TMI 2021). A single plane across the slices (I or J is 1, e.g. one coronal image)
    has only the orientation that is not one voxel wide. Returns (C, I, J, K * scale). ``tile``, ``overlap``,
    ``memory``: as for :func:`volume_tiling`.

    >>> nearest = lambda x: x.repeat_interleave(3, dim=3)
    >>> predict_orthogonal_planes(nearest, torch.rand(1, 20, 16, 8), 3, progress=False).shape
    torch.Size([1, 20, 16, 24])
    """
    tiling = volume_tiling(
        predictor, array.shape, spatial_dims=2, through_plane=True, tile=tile, overlap=overlap, memory=memory
    )
    (*tile_ij, tile_k), (*overlap_ij, overlap_k) = tiling.tile, tiling.overlap
    run = {"batch": tiling.batch, "progress": progress}
    wide = [axis for axis in (0, 1) if array.shape[axis + 1] > 1] or [0, 1]  # (a, k) planes 1 voxel wide: lines
    outputs = [
        predict_planes(
            predictor,
            array,
            (axis, 2),
            (1, scale),
            tile=(tile_ij[axis], tile_k),
            overlap=(overlap_ij[axis], overlap_k),
            **run,
        )
        for axis in wide
    ]
    return outputs[0] if len(outputs) == 1 else outputs[0].add_(outputs[1]).div_(2)


def predict_volume(
    predictor: Predictor,
    volume: Volume,
    *,
    scale: Sequence[int],
    spatial_dims: int,
    tile: int | Sequence[int] | None = None,
    overlap: int | Sequence[int] | None = None,
    memory: float = DEFAULT_MEMORY,
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
        tile, overlap, memory: Tiles in input voxels and the bytes one forward may use (:func:`volume_tiling`):
            by default whole planes or the whole volume when they fit, overlapping by twice the receptive radius,
            so that the output is the whole-image output.

    >>> scan = Volume(torch.rand(1, 40, 30, 3), np.eye(4))
    >>> predict_volume(model_predictor(torch.nn.Identity()), scan, scale=(1, 1, 1), spatial_dims=2).spatial_shape
    (40, 30, 3)
    """
    scale = integer_scale(scale)
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if spatial_dims == 2 and scale[2] != 1 and scale[:2] != (1, 1):
        raise ValueError(f"a 2D model upsamples in-plane or through-plane (1, 1, s), not both: got scale {scale}")
    run = {"tile": tile, "overlap": overlap, "memory": memory}
    if spatial_dims == 2 and scale[2] != 1:
        array = predict_orthogonal_planes(predictor, volume.array, scale[2], progress=progress, **run)
        return volume.replace(array=array, affine=scale_affine(volume.affine, scale))
    tiling = volume_tiling(predictor, volume.array.shape, spatial_dims=spatial_dims, **run)
    if spatial_dims == 3:
        options = {"tile": tiling.tile, "overlap": tiling.overlap, "batch": tiling.batch}
        array = _predict_stack(predictor, volume.array[None], scale=scale, **options)[0]
    else:
        options = {"tile": tiling.tile[:2], "overlap": tiling.overlap[:2], "batch": tiling.batch}
        array = predict_planes(predictor, volume.array, (0, 1), scale[:2], progress=progress, **options)
    return volume.replace(array=array, affine=scale_affine(volume.affine, scale))


def super_resolve(
    volume: Volume,
    model: torch.nn.Module,
    *,
    model_scale: Sequence[int],
    factors: Sequence[float] | None = None,
    tile: int | None = None,
    overlap: int | None = None,
    memory: float = DEFAULT_MEMORY,
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
        tile, overlap, memory: See :func:`predict_volume`.
        precision: See :func:`model_predictor`.
        window: The volume's ``intensity.default_window`` when the caller has it already; computed otherwise.
        consistency: MR in-plane k-space degradation whose measured band the output gets back from the input
            (``consistency.kspace_consistency``; at the model's own scale only); None: off.

    >>> scan = Volume(torch.rand(1, 24, 20, 3), np.eye(4))
    >>> super_resolve(scan, torch.nn.Upsample(scale_factor=2), model_scale=(2, 2)).spatial_shape
    (48, 40, 3)
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
        memory=memory,
        progress=progress,
    )
    if consistency is not None:
        from medsr.consistency import kspace_consistency  # consistency -> data -> io: kept out of infer's imports

        sr = kspace_consistency(sr, lr, consistency)
    shape = [max(1, round(n * f)) for n, f in zip(volume.spatial_shape, factors, strict=True)]
    return denormalize(resample(sr, shape), window)
