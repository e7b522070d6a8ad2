"""Train several architectures for the same CPU time on Colin27 x2 in-plane and score them on held-out slices.

Each model's step count is set from its own measured seconds per step, so all get the same wall-clock budget
(the cosine schedule then completes within it). Scores: held-out axial slices 110-149 (train 20-89, val
95-104), k-space x2, PSNR/SSIM per 2D slice with data_range 1, next to the interpolation baselines.

    python benchmarks/compare_models.py --minutes 4 --out runs/compare
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from medsr.checkpoint import load_checkpoint
from medsr.config import load_config
from medsr.data import PairDataset, prepare_scan, slice_range
from medsr.evaluation import compare_methods
from medsr.infer import model_predictor
from medsr.io import read_volume
from medsr.models import create_model
from medsr.report import format_table
from medsr.samples import sample_path
from medsr.train import LOSSES, batches, fit, load_scans, train_step, training_scans

MODELS = ("srcnn", "edsr_small", "rcan_small")
PROBE_STEPS = 10


def seconds_per_step(name: str, overrides: list[str]) -> float:
    """Seconds per training step of ``name``: PROBE_STEPS timed steps after one warm-up step."""
    config = load_config(overrides=[*overrides, f"model.name={name}"])
    volumes = load_scans(training_scans(config)[0], config)
    dataset = PairDataset(
        [slice_range(v, slices=config.data.train_slices) for v in volumes],
        config.degradation,
        patch=config.data.patch,
        length=1024,
        min_foreground=config.data.min_foreground,
    )
    model = create_model(name, spatial_dims=2, scale=(2, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    stream = batches(dataset, config.data.batch_size, 0)
    train_step(model, optimizer, next(stream), LOSSES["l1"])
    start = time.perf_counter()
    for _ in range(PROBE_STEPS):
        train_step(model, optimizer, next(stream), LOSSES["l1"])
    return (time.perf_counter() - start) / PROBE_STEPS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=4.0, help="Training budget per model (wall clock).")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    args = parser.parse_args()

    base = [f"train.val_every={10**9}", "data.batch_size=16", "data.patch=96", "train.lr=0.0005"]
    rows = {}
    for name in MODELS:
        per_step = seconds_per_step(name, base)
        steps = max(1, int(args.minutes * 60 / per_step))
        print(f"{name}: {per_step:.3f} s/step -> {steps} steps in {args.minutes} min", flush=True)
        config = load_config("configs/edsr_mr_x2.yaml", [*base, f"model.name={name}", f"train.steps={steps}"])
        started = time.perf_counter()
        fit(config, args.out / name, progress=False)
        print(f"{name}: trained in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
        model, _ = load_checkpoint(args.out / name / "last")
        rows[name] = (model_predictor(model), steps)

    hr = prepare_scan(read_volume(sample_path("colin27"), modality="MR"), config.degradation)
    table, _, _ = compare_methods(hr, config.degradation, {n: p for n, (p, _) in rows.items()}, slices=(110, 150))
    for row in table:
        row["steps"] = rows[row["method"]][1] if row["method"] in rows else "-"
    print(f"\nSame budget ({args.minutes} min of training each on this machine), Colin27 held-out slices 110-149:")
    print(format_table(table, ("method", "steps", "psnr", "ssim", "psnr_body", "ssim_body")))


if __name__ == "__main__":
    main()
