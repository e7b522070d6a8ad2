"""Peak memory of ``streaming.stream_upscale`` against the in-memory path, on synthetic 512 x 512 x K NIfTI volumes.

Each run is a child process that reports its own peak resident memory (``ru_maxrss``) and time, so runs do not
share a peak. The sources are float32 .nii files (.nii.gz with --suffix) written slice by slice (so the benchmark
itself stays bounded) in a temporary folder, deleted afterwards. Upscaling is x2 in-plane, (2, 2, 1): the 'bicubic'
model with one tile per slice (tile 512: the cheap case, where memory is all I/O and buffers), and optionally the
untrained 'edsr_tiny' with the default tiles on fewer slices (a network's feature maps; its output is meaningless).

    python benchmarks/memory.py                      # K = 100 and 600, streaming; in-memory for K = 100
    python benchmarks/memory.py --in-memory 100 600  # also run the in-memory path on K = 600 (about 10 GB)
    python benchmarks/memory.py --model-slices 0     # skip edsr_tiny
    python benchmarks/memory.py --suffix .nii.gz     # .nii.gz in and out: gzip streams, read once per pass

Timings on a shared machine vary with disk writeback: a run just after gigabytes of writes can be 3x slower.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIDE = 512
SCALE = (2, 2, 1)


def make_source(path: Path, slices: int) -> None:
    """A 512 x 512 x ``slices`` float32 MR-like volume (an anatomy-like pattern plus noise), written slice by slice."""
    import numpy as np

    from medsr.io import volume_writer

    rng = np.random.default_rng(0)
    i, j = np.meshgrid(*(np.linspace(-1, 1, SIDE),) * 2, indexing="ij")
    with volume_writer(path, spatial_shape=(SIDE, SIDE, slices), affine=np.diag([0.5, 0.5, 1.0, 1.0])) as write:
        for k in range(slices):
            z = 2 * k / max(slices - 1, 1) - 1
            radius = np.sqrt(i**2 + j**2 + z**2)
            tissue = 800 * (radius < 0.9) - 300 * (radius < 0.7) + 400 * np.cos(8 * i) * np.sin(6 * j) * (radius < 0.6)
            write((tissue + 20 * rng.standard_normal(i.shape)).astype(np.float32)[:, :, None])


def child(mode: str, model_name: str, tile: int, source: Path, target: Path) -> None:
    """One measured run; prints a JSON line with the peak RSS (MB) after imports and at the end, and seconds."""
    import torch

    from medsr.infer import model_predictor, super_resolve
    from medsr.io import read_volume, write_volume
    from medsr.models import create_model
    from medsr.streaming import stream_upscale

    torch.manual_seed(0)
    model = create_model(model_name, spatial_dims=2, scale=SCALE[:2])
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    start = time.perf_counter()
    if mode == "streaming":
        predictor = model_predictor(model, precision="fp32")
        stream_upscale(source, target, predictor, scale=SCALE, spatial_dims=2, modality="MR", tile=tile, progress=False)
    else:
        volume = read_volume(source, modality="MR")
        sr = super_resolve(volume, model, model_scale=SCALE[:2], tile=tile, precision="fp32", progress=False)
        write_volume(sr, target)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"baseline_mb": baseline, "peak_mb": peak, "seconds": seconds}))


def measure(mode: str, model_name: str, tile: int, source: Path, workdir: Path, suffix: str) -> dict:
    target = workdir / f"sr{suffix}"
    command = [sys.executable, __file__, "--child", mode, model_name, str(tile), str(source), str(target)]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    target.unlink()
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, nargs="+", default=[100, 600], help="K of the volumes to stream.")
    parser.add_argument("--in-memory", type=int, nargs="*", default=[100], help="K to run the in-memory path on.")
    parser.add_argument("--model-slices", type=int, default=10, help="K for edsr_tiny (0: skip).")
    parser.add_argument("--suffix", choices=[".nii", ".nii.gz"], default=".nii", help="Of the source and target.")
    parser.add_argument("--workdir", type=Path, default=None, help="Where to put the volumes (default: a temp dir).")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, model_name, tile, source, target = args.child
        child(mode, model_name, int(tile), Path(source), Path(target))
        return

    runs = [("streaming", "bicubic", SIDE, k) for k in args.slices]
    runs += [("in-memory", "bicubic", SIDE, k) for k in args.in_memory]
    if args.model_slices:
        runs += [(mode, "edsr_tiny", 128, args.model_slices) for mode in ("streaming", "in-memory")]
    print(f"x2 in-plane of 512 x 512 x K float32 NIfTI ({args.suffix} -> {args.suffix}); peak: child's ru_maxrss")
    print(
        f"{'path':<10} {'model':<10} {'tile':>4} {'K':>4} {'input MB':>8} {'output MB':>9} "
        f"{'baseline MB':>11} {'peak MB':>8} {'peak - base':>11} {'s/slice':>8}"
    )
    with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
        workdir = Path(folder)
        for mode, model_name, tile, slices in runs:
            source = workdir / f"source_{slices}{args.suffix}"
            if not source.exists():
                make_source(source, slices)
            result = measure(mode, model_name, tile, source, workdir, args.suffix)
            voxels = SIDE * SIDE * slices
            print(
                f"{mode:<10} {model_name:<10} {tile:>4} {slices:>4} {voxels * 4 / 2**20:>8.0f} "
                f"{voxels * 16 / 2**20:>9.0f} {result['baseline_mb']:>11.0f} {result['peak_mb']:>8.0f} "
                f"{result['peak_mb'] - result['baseline_mb']:>11.0f} {result['seconds'] / slices:>8.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
