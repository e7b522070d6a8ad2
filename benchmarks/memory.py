"""Peak memory of ``streaming.stream_upscale`` against the in-memory path, on synthetic SIDE x SIDE x K NIfTI volumes.

Each run is a child process that reports its own peak resident memory (``VmHWM`` of /proc/self/status, reset to the
current resident memory once the model is loaded; ``ru_maxrss`` would carry the parent's peak when that is higher)
and time, so runs do not share a peak. The sources are float32 .nii files (.nii.gz with --suffix) written slice by
slice (so the benchmark itself stays bounded) in a temporary folder, deleted afterwards. Upscaling is x2 in-plane,
(2, 2, 1), with the default tiles from the memory budget (``--memory``, default 2G: planes stacked into one forward
up to it): the 'bicubic' model (the cheap case, where memory is all I/O and buffers), and optionally a network on
fewer slices (default the untrained 'edsr_tiny'; a shipped name such as edsr_mr_x2 loads its weights).

    python benchmarks/memory.py                      # K = 100 and 600, streaming; in-memory for K = 100
    python benchmarks/memory.py --in-memory 100 600  # also run the in-memory path on K = 600 (about 10 GB)
    python benchmarks/memory.py --model-slices 0     # skip the network
    python benchmarks/memory.py --suffix .nii.gz     # .nii.gz in and out: gzip streams, read once per pass

Timings on a shared machine vary with disk writeback: a run just after gigabytes of writes can be 3x slower.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCALE = (2, 2, 1)


def make_source(path: Path, slices: int, side: int = 512) -> None:
    """A ``side`` x ``side`` x ``slices`` float32 MR-like volume (an anatomy-like pattern plus noise), written slice
    by slice."""
    import numpy as np

    from medsr.io import volume_writer

    rng = np.random.default_rng(0)
    i, j = np.meshgrid(*(np.linspace(-1, 1, side),) * 2, indexing="ij")
    with volume_writer(path, spatial_shape=(side, side, slices), affine=np.diag([0.5, 0.5, 1.0, 1.0])) as write:
        for k in range(slices):
            z = 2 * k / max(slices - 1, 1) - 1
            radius = np.sqrt(i**2 + j**2 + z**2)
            tissue = 800 * (radius < 0.9) - 300 * (radius < 0.7) + 400 * np.cos(8 * i) * np.sin(6 * j) * (radius < 0.6)
            write((tissue + 20 * rng.standard_normal(i.shape)).astype(np.float32)[:, :, None])


def resident(key: str = "VmRSS") -> int:
    """This process's resident memory in bytes (VmRSS), or its peak since the last :func:`reset_peak` (VmHWM)."""
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024


def reset_peak() -> None:
    """Start the peak resident memory (VmHWM) afresh from the current resident memory (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def network(model_name: str):
    """A shipped model's network with its weights, or an untrained registered architecture (x2 in-plane)."""
    import torch

    from medsr.checkpoint import shipped_models
    from medsr.models import create_model
    from medsr.zoo import load_model

    if model_name in shipped_models():
        return load_model(model_name).network
    torch.manual_seed(0)
    return create_model(model_name, spatial_dims=2, scale=SCALE[:2])


def child(mode: str, model_name: str, memory: int, source: Path, target: Path) -> None:
    """One measured run; prints a JSON line with the peak RSS (MB) after imports and at the end, and seconds."""
    from medsr.infer import model_predictor, super_resolve
    from medsr.io import read_volume, write_volume
    from medsr.streaming import stream_upscale

    model = network(model_name)
    reset_peak()
    baseline = resident() / 2**20
    start = time.perf_counter()
    if mode == "streaming":
        predictor = model_predictor(model)
        stream_upscale(
            source, target, predictor, scale=SCALE, spatial_dims=2, modality="MR", memory=memory, progress=False
        )
    else:
        volume = read_volume(source, modality="MR")
        sr = super_resolve(volume, model, model_scale=SCALE[:2], memory=memory, progress=False)
        write_volume(sr, target)
    seconds = time.perf_counter() - start
    peak = resident("VmHWM") / 2**20
    print(json.dumps({"baseline_mb": baseline, "peak_mb": peak, "seconds": seconds}))


def measure(mode: str, model_name: str, memory: int, source: Path, workdir: Path, suffix: str) -> dict:
    target = workdir / f"sr{suffix}"
    command = [sys.executable, __file__, "--child", mode, model_name, str(memory), str(source), str(target)]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    target.unlink()
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    from medsr.infer import DEFAULT_MEMORY, parse_memory

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, nargs="+", default=[100, 600], help="K of the volumes to stream.")
    parser.add_argument("--in-memory", type=int, nargs="*", default=[100], help="K to run the in-memory path on.")
    parser.add_argument("--side", type=int, default=512, help="Slice edge in voxels.")
    parser.add_argument("--model", default="edsr_tiny", help="The network: an architecture or a shipped model.")
    parser.add_argument("--model-slices", type=int, default=10, help="K for the network (0: skip).")
    parser.add_argument("--memory", type=parse_memory, default=DEFAULT_MEMORY, help="Memory budget of a forward.")
    parser.add_argument("--suffix", choices=[".nii", ".nii.gz"], default=".nii", help="Of the source and target.")
    parser.add_argument("--workdir", type=Path, default=None, help="Where to put the volumes (default: a temp dir).")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, model_name, memory, source, target = args.child
        child(mode, model_name, int(memory), Path(source), Path(target))
        return

    runs = [("streaming", "bicubic", k) for k in args.slices]
    runs += [("in-memory", "bicubic", k) for k in args.in_memory]
    if args.model_slices:
        runs += [(mode, args.model, args.model_slices) for mode in ("streaming", "in-memory")]
    print(
        f"x2 in-plane of {args.side} x {args.side} x K float32 NIfTI ({args.suffix} -> {args.suffix}), memory budget "
        f"{args.memory / 2**30:g} GiB; peak: the child's VmHWM"
    )
    print(
        f"{'path':<10} {'model':<10} {'K':>4} {'input MB':>8} {'output MB':>9} "
        f"{'baseline MB':>11} {'peak MB':>8} {'peak - base':>11} {'s/slice':>8}"
    )
    with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
        workdir = Path(folder)
        for mode, model_name, slices in runs:
            source = workdir / f"source_{slices}{args.suffix}"
            if not source.exists():
                make_source(source, slices, args.side)
            result = measure(mode, model_name, args.memory, source, workdir, args.suffix)
            voxels = args.side * args.side * slices
            print(
                f"{mode:<10} {model_name:<10} {slices:>4} {voxels * 4 / 2**20:>8.0f} "
                f"{voxels * 16 / 2**20:>9.0f} {result['baseline_mb']:>11.0f} {result['peak_mb']:>8.0f} "
                f"{result['peak_mb'] - result['baseline_mb']:>11.0f} {result['seconds'] / slices:>8.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
