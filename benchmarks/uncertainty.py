"""What `--uncertainty` costs: wall time and peak memory of `medsr.trust_maps` over a plain `medsr.upscale` of the
same scan, from one run on this machine (ratios, not absolute times).

    python benchmarks/uncertainty.py [--scan mr_kmeans_t1] [--model edsr_mr_x2]

Each call runs in a fresh process (peak resident memory is per process: ``resource.getrusage``); times are the
median of ``--repeats`` runs after a warm-up in that process.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def measure(kind: str, scan: str, model: str, repeats: int) -> dict[str, float]:
    """In this process: median seconds of ``kind`` ('plain' or 'maps') and the peak resident memory (MiB)."""
    import medsr
    from medsr.samples import sample_path

    volume = medsr.read_volume(sample_path(scan), modality="MR")
    run = medsr.upscale if kind == "plain" else medsr.trust_maps
    run(volume, model, precision="fp32")  # warm-up: tiling measures the model once
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(volume, model, precision="fp32")
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": statistics.median(times), "peak_mib": peak, "shape": list(volume.spatial_shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scan", default="mr_kmeans_t1", help="A sample name (medsr samples).")
    parser.add_argument("--model", default="edsr_mr_x2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=("plain", "maps"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.scan, args.model, args.repeats)))
        return
    results = {}
    for kind in ("plain", "maps"):
        command = [sys.executable, __file__, "--child", kind, "--scan", args.scan, "--model", args.model]
        output = subprocess.run([*command, "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
        results[kind] = json.loads(output.stdout.strip().splitlines()[-1])
    plain, maps = results["plain"], results["maps"]
    print(f"{args.model} on {args.scan} {tuple(plain['shape'])}, fp32, default tiling, median of {args.repeats}")
    print(f"  plain upscale: {plain['seconds']:.2f} s, peak {plain['peak_mib']:.0f} MiB")
    print(f"  --uncertainty: {maps['seconds']:.2f} s, peak {maps['peak_mib']:.0f} MiB")
    time_ratio, memory_ratio = maps["seconds"] / plain["seconds"], maps["peak_mib"] / plain["peak_mib"]
    print(f"  ratio: time {time_ratio:.1f}x, peak memory {memory_ratio:.2f}x")


if __name__ == "__main__":
    main()
