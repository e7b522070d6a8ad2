"""What tiled upscaling costs over the model's own compute, and what memory it takes; ratios from one run here.

    python benchmarks/overhead.py              # about 6 minutes on 2 quiet cores
    python benchmarks/overhead.py --repeats 1  # quicker, noisier

1. 2D, edsr_mr_x2 on volumes of K slices of 128^2, 256^2 and 512^2 (K * slice = 2^20 voxels): the wall time of
   ``infer.super_resolve`` with its defaults (tiles from the 2 GiB budget, overlap from the receptive radius,
   precision auto) over the model's pure whole-image compute, ``model_predictor`` (same precision) on each whole
   slice alone, summed: the issue's measure (2.33 at 256^2 with the former fixed 128^2 tiles). Also over the same
   model on the planes stacked as upscale stacks them, and ``medsr.upscale`` (its defaults: it also computes the
   window's percentiles, checks the inputs and puts back the measured k-space band) over the same denominator.
2. 3D, untrained edsr_tiny x (2, 2, 2) on 160^3: ``super_resolve`` over the pure compute of the work it does: the
   whole volume's forward when it fits in the budget (8 GiB; the default 2 GiB does not hold its estimated 4 GiB);
   else ``model_predictor`` on exactly the tiles it runs, batched as it batches them (the tiles' minimum work), with
   the tiles' redundancy (voxels computed / volume voxels); budgets of 8 GiB, 2 GiB (default) and 256 MiB.
3. The memory estimate, ``footprint(...).bytes_per_voxel`` x voxels, against one forward's measured peak resident
   memory (a child process each: its peak resident memory during the forward, ``VmHWM``, minus before it).
4. Streaming peak memory with edsr_mr_x2 at K = 100 and 600 slices of 256^2 (``benchmarks/memory.py``'s children):
   flat in K.
5. GFLOP/s of the models inside upscale (FLOPs of the whole-image forward, ``torch.utils.flop_counter``) as a share
   of the matmul peak of the precision they run in (``benchmarks/speed.py``).

Times are the fastest of ``--repeats`` runs after a warm-up, the runs of a row interleaved, with torch's default
threads: other jobs on a shared machine only ever slow a run down. Only ratios measured in the same run are printed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from memory import make_source, measure, reset_peak, resident
from speed import flops, matmul_peak

import medsr
from medsr.infer import (
    DEFAULT_MEMORY,
    footprint,
    model_predictor,
    resolve_precision,
    super_resolve,
    tile_starts,
    volume_tiling,
)
from medsr.models import create_model
from medsr.zoo import load_model

SIDES = (128, 256, 512)
VOXELS_2D = 2**20  # input voxels of each 2D volume: K = VOXELS_2D / side^2
SIDE_3D = 160
MEMORY_CASES = (  # (architecture, spatial dims, scale, input edge, precision) of the estimate check
    ("edsr_small", 2, (2, 2), 512, "fp32"),
    ("edsr_small", 2, (2, 2), 512, "bf16"),
    ("edsr_small", 2, (4, 4), 512, "fp32"),
    ("edsr_tiny", 3, (2, 2, 2), 96, "fp32"),
    ("edsr_tiny", 3, (2, 2, 2), 96, "bf16"),
    ("edsr_small", 3, (2, 2, 2), 64, "fp32"),
)


def phantom(shape: tuple[int, int, int]) -> torch.Tensor:
    """An MR-like (1, I, J, K) volume in scanner units: a bright ellipsoid with texture, and noise."""
    i, j, k = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    radius = np.sqrt(i**2 + j**2 + k**2)
    image = 800 * (radius < 0.9) + 300 * np.cos(9 * i) * np.sin(7 * j) * (radius < 0.6)
    noise = 20 * np.random.default_rng(0).standard_normal(shape)
    return torch.from_numpy((image + noise).astype(np.float32))[None]


def planes_compute(predict, volume: torch.Tensor, planes: int) -> None:
    """The model on whole (i, j) planes of a (1, I, J, K) volume, ``planes`` at a time."""
    stack = volume.permute(3, 0, 1, 2)  # (K, 1, I, J)
    for start in range(0, len(stack), planes):
        predict(stack[start : start + planes].contiguous())


def tiles_compute(predict, volume: torch.Tensor, tile, overlap, batch: int) -> tuple[int, Callable[[], None]]:
    """(voxels computed, a function running the model on exactly the tiles ``predict_volume`` runs, batched alike)."""
    starts = [tile_starts(n, min(t, n), o) for n, t, o in zip(volume.shape[1:], tile, overlap, strict=True)]
    tile = [min(t, n) for t, n in zip(tile, volume.shape[1:], strict=True)]
    rows = [list(itertools.product(starts[0], starts[1], [k])) for k in starts[2]]
    chunks = [row[first : first + batch] for row in rows for first in range(0, len(row), batch)]
    voxels = sum(len(chunk) for chunk in chunks) * math.prod(tile)

    def run() -> None:
        for chunk in chunks:
            predict(torch.stack([volume[:, a : a + tile[0], b : b + tile[1], c : c + tile[2]] for a, b, c in chunk]))

    return voxels, run


def fastest(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Seconds of the fastest of ``repeats`` runs of each function after one warm-up, the functions interleaved."""
    for run in runs.values():
        run()
    best = dict.fromkeys(runs, math.inf)
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def rows_2d(repeats: int, peaks: dict[str, float]) -> list[str]:
    model = load_model("edsr_mr_x2")
    network = model.network
    predict = model_predictor(network)
    precision = resolve_precision("auto")
    lines = []
    for side in SIDES:
        slices = VOXELS_2D // side**2
        volume = medsr.Volume(phantom((side, side, slices)), np.diag([2.0, 2.0, 6.0, 1.0]), medsr.Modality.MR)
        tiling = volume_tiling(predict, volume.array.shape, spatial_dims=2)
        unit = volume.array / 1000  # about the normalised range; the model's time does not depend on values
        runs = {
            "upscale": lambda v=volume: super_resolve(v, network, model_scale=(2, 2), progress=False),
            "api": lambda v=volume: medsr.upscale(v, model),
            "alone": lambda u=unit: planes_compute(predict, u, 1),
            "stacked": lambda u=unit, g=tiling.tile[2]: planes_compute(predict, u, g),
        }
        seconds = fastest(runs, repeats)
        upscale, api, alone, stacked = (seconds[name] for name in runs)
        work = flops(lambda s=side: network(torch.rand(1, 1, s, s))) * slices
        rate = work / upscale / 1e9
        lines.append(
            f"{side:>4}^2 x {slices:<3} {str(tiling.tile):>16} {upscale / alone:>10.3f} {upscale / stacked:>10.3f} "
            f"{api / alone:>12.3f} {rate:>9.0f} {100 * rate / peaks[precision]:>6.0f} %"
        )
        print(lines[-1], flush=True)
    return lines


def rows_3d(repeats: int, peaks: dict[str, float]) -> list[str]:
    torch.manual_seed(0)
    network = create_model("edsr_tiny", spatial_dims=3, scale=(2, 2, 2))
    predict = model_predictor(network)
    precision = resolve_precision("auto")
    volume = medsr.Volume(phantom((SIDE_3D,) * 3), np.eye(4), medsr.Modality.MR)
    unit = volume.array / 1000
    lines = []
    for memory in (2**33, DEFAULT_MEMORY, 2**28):
        tiling = volume_tiling(predict, volume.array.shape, spatial_dims=3, memory=memory)
        voxels, run = tiles_compute(predict, unit, tiling.tile, tiling.overlap, tiling.batch)
        upscale, pure = fastest(
            {
                "upscale": lambda m=memory: super_resolve(
                    volume, network, model_scale=(2, 2, 2), memory=m, progress=False
                ),
                "pure": run,
            },
            repeats,
        ).values()
        whole = tiling.tile == volume.spatial_shape
        work = flops(lambda: network(torch.rand(1, 1, 32, 32, 32))) * voxels / 32**3
        rate = work / upscale / 1e9
        lines.append(
            f"{memory / 2**20:>6.0f} MiB {str(tiling.tile):>16} {'whole volume' if whole else 'its tiles':>13} "
            f"{upscale / pure:>8.3f} {voxels / SIDE_3D**3:>10.2f} {rate:>9.0f} {100 * rate / peaks[precision]:>6.0f} %"
        )
        print(lines[-1], flush=True)
    return lines


def forward_peak(name: str, spatial_dims: int, scale, edge: int, precision: str) -> None:
    """Child: one forward's peak resident memory over the estimate, as a JSON line."""
    torch.manual_seed(0)
    predict = model_predictor(create_model(name, spatial_dims=spatial_dims, scale=scale), precision=precision)
    estimate = footprint(predict, spatial_dims).bytes_per_voxel * edge**spatial_dims
    predict(torch.rand(1, 1, *(8,) * spatial_dims))  # libraries loaded, the bf16 copy made
    image = torch.rand(1, 1, *(edge,) * spatial_dims)
    reset_peak()
    before = resident()
    predict(image)
    peak = resident("VmHWM") - before
    print(json.dumps({"measured": peak, "estimate": estimate}))


def memory_rows() -> list[str]:
    lines = []
    for name, dims, scale, edge, precision in MEMORY_CASES:
        command = [sys.executable, __file__, "--forward", json.dumps([name, dims, scale, edge, precision])]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        lines.append(
            f"{name:<11} {dims}D x{'x'.join(map(str, scale)):<6} {edge:>4}^{dims} {precision:<5} "
            f"{result['measured'] / 2**20:>9.0f} {result['estimate'] / 2**20:>9.0f} "
            f"{result['measured'] / result['estimate']:>9.2f}"
        )
        print(lines[-1], flush=True)
    return lines


def streaming_rows() -> list[str]:
    lines = []
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        for slices in (100, 600):
            source = workdir / f"source_{slices}.nii"
            make_source(source, slices, side=256)
            result = measure("streaming", "edsr_mr_x2", DEFAULT_MEMORY, source, workdir, ".nii")
            source.unlink()
            lines.append(
                f"{slices:>4} {slices * 256**2 * 4 / 2**20:>9.0f} {slices * 256**2 * 16 / 2**20:>10.0f} "
                f"{result['peak_mb'] - result['baseline_mb']:>12.0f} {result['seconds'] / slices:>8.3f}"
            )
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs per measure (the fastest counts).")
    parser.add_argument("--forward", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.forward:
        forward_peak(*json.loads(args.forward))
        return

    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(
        f"threads {torch.get_num_threads()}; precision auto = {resolve_precision('auto')}; matmul 2048^3 peak: "
        f"fp32 {peaks['fp32']:.0f}, bf16 {peaks['bf16']:.0f} GFLOP/s\n"
    )
    print("2D edsr_mr_x2, super_resolve with defaults / model_predictor on whole slices (target <= 1.10):")
    print(f"{'slices':<11} {'tile (planes)':>16} {'/ alone':>10} {'/ stacked':>10} {'upscale/alone':>12} GFLOP/s  peak")
    rows_2d(args.repeats, peaks)
    print(f"\n3D edsr_tiny x2 on {SIDE_3D}^3, super_resolve / pure compute of its work (target <= 1.10):")
    print(f"{'budget':>10} {'tile':>16} {'divided by':>13} {'ratio':>8} {'redundancy':>10} GFLOP/s  peak")
    rows_3d(args.repeats, peaks)
    print("\nmemory estimate (MEMORY_FACTOR x widest tensor) against one forward's measured peak RSS:")
    print(f"{'model':<11} {'':<9} {'input':>6} {'prec':<5} {'measured':>9} {'estimate':>9} {'ratio':>9} (MiB)")
    memory_rows()
    print("\nstreaming edsr_mr_x2 (default budget) on 256^2 x K float32 NIfTI: peak RSS over the child's baseline:")
    print(f"{'K':>4} {'input MiB':>9} {'output MiB':>10} {'peak MiB':>12} {'s/slice':>8}")
    streaming_rows()


if __name__ == "__main__":
    main()
