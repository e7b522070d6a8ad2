"""Speed of every architecture on this machine: inference megapixels/s and training samples/s, with achieved
GFLOP/s as a share of the measured matmul peak, and which of channels_last / bf16 autocast / torch.compile help.

    python benchmarks/speed.py [--size 256] [--models edsr_small,rcan_small] [--no-compile]
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/speed.py   # as on a CPU without bf16 (or AVX-512) instructions

FLOPs are counted by torch.utils.flop_counter (2 per multiply-add); times are the median of several runs after a
warm-up, with torch's default threads. Inference: one (1, 1, size, size) slice upsampled x2. Training: a batch of
16 patches of 48x48 LR (96x96 HR), forward + backward + Adam step, fp32.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from medsr.losses import l1
from medsr.models import create_model
from medsr.report import format_table

DEFAULT_MODELS = ("fsrcnn", "espcn", "srcnn", "vdsr", "edsr_small", "edsr_baseline", "rcan_small", "rrdb_small")


def median_seconds(run: Callable[[], object], repeats: int = 5) -> float:
    run()  # warm-up (allocations, oneDNN kernel selection)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(dtype: torch.dtype, n: int = 2048) -> float:
    """GFLOP/s of an n^3 matmul: the practical peak of this machine for ``dtype``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b) / 1e9


def flops(run: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def measure(name: str, size: int, peak32: float, compile_models: bool) -> dict[str, str]:
    """One table row: inference speed in fp32, channels_last, channels_last + bf16 (eager, and compiled with
    inductor after its warm-up compilation); training samples/s."""
    model = create_model(name, spatial_dims=2, scale=(2, 2)).eval()
    lr = torch.rand(1, 1, size, size)
    megapixels = (2 * size) ** 2 / 1e6
    with torch.no_grad():
        work = flops(lambda: model(lr))
        fp32 = median_seconds(lambda: model(lr))
        model_cl, lr_cl = model.to(memory_format=torch.channels_last), lr.to(memory_format=torch.channels_last)
        channels_last = median_seconds(lambda: model_cl(lr_cl))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = median_seconds(lambda: model_cl(lr_cl))
        if compile_models:
            torch._dynamo.reset()
            compiled = torch.compile(model)
            fp32_compiled = median_seconds(lambda: compiled(lr))
            torch._dynamo.reset()
            compiled_cl = torch.compile(model_cl)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16_compiled = median_seconds(lambda: compiled_cl(lr_cl))
    model = create_model(name, spatial_dims=2, scale=(2, 2)).train()
    optimizer = torch.optim.Adam(model.parameters())
    batch_lr, batch_hr = torch.rand(16, 1, 48, 48), torch.rand(16, 1, 96, 96)

    def step() -> None:
        optimizer.zero_grad()
        l1(model(batch_lr), batch_hr).backward()
        optimizer.step()

    train = median_seconds(step, repeats=3)
    return {
        "model": name,
        "GFLOP/img": f"{work / 1e9:.1f}",
        "MP/s fp32": f"{megapixels / fp32:.2f}",
        "GFLOP/s fp32": f"{work / fp32 / 1e9:.0f} ({100 * work / fp32 / 1e9 / peak32:.0f} %)",
        "MP/s ch_last": f"{megapixels / channels_last:.2f}",
        "MP/s ch_last+bf16": f"{megapixels / bf16:.2f}",
        "MP/s compiled fp32": f"{megapixels / fp32_compiled:.2f}" if compile_models else "-",
        "MP/s compiled ch_last+bf16": f"{megapixels / bf16_compiled:.2f}" if compile_models else "-",
        "train samples/s": f"{16 / train:.1f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="LR slice edge for inference.")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--no-compile", action="store_true", help="Skip torch.compile (needs a C++ compiler).")
    args = parser.parse_args()

    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    print(f"threads {torch.get_num_threads()}; matmul 2048^3: fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s\n")
    rows = []
    for name in args.models.split(","):
        rows.append(measure(name, args.size, peak32, not args.no_compile))
        print(f"done {name}", flush=True)
    columns = (
        "model",
        "GFLOP/img",
        "MP/s fp32",
        "GFLOP/s fp32",
        "MP/s ch_last",
        "MP/s ch_last+bf16",
        "MP/s compiled fp32",
        "MP/s compiled ch_last+bf16",
        "train samples/s",
    )
    print(
        f"\ninference: 1 x {args.size}^2 -> {2 * args.size}^2 (x2); MP = output megapixels; % of the fp32 matmul peak"
    )
    print(format_table(rows, columns))


if __name__ == "__main__":
    main()
