"""Perception-distortion on held-out data: the PSNR-oriented generator against its GAN fine-tuning.

Trains nothing: give the run folder of ``medsr train configs/esrgan_mr_x2.yaml`` (its ``psnr/`` and ``best/``
checkpoints; ``--alpha`` adds their network interpolation). Every method super-resolves the same simulated LR of
the run's held-out slab (``data.test_slices``), and the table puts distortion (PSNR, SSIM, HFEN) next to
sharpness (``hf_ratio``: detail energy relative to HR, 1 = as much as HR) and fidelity to the input (``lr_rmse``:
the output acquired again by the scanner model, against the LR it was given). It checks the two claims of the
GAN issue: the GAN's LR-consistency error is at most 1.2x the PSNR model's, and its detail energy is closer to
HR's. The picture puts LR, bicubic, the PSNR model, the GAN and HR side by side with zoomed insets.

    python benchmarks/gan_vs_psnr.py runs/esrgan_mr_x2 [--alpha 0.8] [--figure gan_vs_psnr.png]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

COLUMNS = ("method", "psnr", "ssim", "hfen", "hf_ratio", "lr_rmse")


def kspace_consistent(comparison, name: str, hr, degradation, slices) -> dict:
    """Scores of ``name``'s output with the measured k-space put back (``consistency.kspace_consistency``)."""
    from medsr.consistency import kspace_consistency, lr_rmse
    from medsr.data import crop_to_multiple, slice_range
    from medsr.evaluation import body_mask, score_slices
    from medsr.metrics import hf_energy_ratio
    from medsr.volume import integer_scale

    images = comparison.images
    slab = crop_to_multiple(slice_range(hr, slices=slices), scale=integer_scale(degradation.factors))
    lr = slab.replace(array=images["lr"].permute(1, 2, 3, 0), affine=slab.affine)  # geometry unused here
    fixed = kspace_consistency(slab.replace(array=images[name].permute(1, 2, 3, 0)), lr, degradation)
    sr = fixed.array.permute(3, 0, 1, 2)
    scores = score_slices(sr, images["hr"], body_mask(images["hr"]), extras=True)
    row = {"method": f"{name} + k-space DC"} | {key: float(values.mean()) for key, values in scores.items()}
    ratio = hf_energy_ratio(fixed.array[None], slab.array[None], factors=integer_scale(degradation.factors))
    return row | {"hf_ratio": float(ratio), "lr_rmse": lr_rmse(fixed, lr, degradation)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="Run folder of a GAN training (with psnr/ and best/).")
    parser.add_argument("--alpha", type=float, help="Also score the network interpolation with this PSNR weight.")
    parser.add_argument("--figure", type=Path, default=Path("gan_vs_psnr.png"), help="PNG to write.")
    args = parser.parse_args()

    from medsr.checkpoint import interpolate, load_checkpoint
    from medsr.config import config_from_dict
    from medsr.evaluation import compare_methods
    from medsr.infer import model_predictor
    from medsr.report import comparison_figure, format_table
    from medsr.train import load_scans

    checkpoints = {"psnr model": args.run / "psnr", "gan model": args.run / "best"}
    with tempfile.TemporaryDirectory() as tmp:
        if args.alpha is not None:
            checkpoints[f"interp {args.alpha:g}"] = Path(tmp) / "interp"
            interpolate(checkpoints["psnr model"], checkpoints["gan model"], args.alpha, Path(tmp) / "interp")
        models = {name: load_checkpoint(path) for name, path in checkpoints.items()}
    _, description = models["gan model"]
    config = config_from_dict(description["config"])
    scan_path = Path(description["scans"]["test"][0])
    (hr,) = load_scans([scan_path], config)
    slices = tuple(config.data.test_slices)
    comparison = compare_methods(
        hr,
        config.degradation,
        {name: model_predictor(model) for name, (model, _) in models.items()},
        slices=slices,
        spatial_dims=config.model.spatial_dims,
        extras=True,
    )
    rows = comparison.rows + [kspace_consistent(comparison, "gan model", hr, config.degradation, slices)]
    print(f"{scan_path.name}, held-out slices {slices[0]}..{slices[1] - 1}, {config.degradation.factors}")
    print(format_table(rows, COLUMNS))
    rows = {row["method"]: row for row in comparison.rows}
    psnr_model, gan_model = rows["psnr model"], rows["gan model"]
    ratio = gan_model["lr_rmse"] / psnr_model["lr_rmse"]
    closer = abs(gan_model["hf_ratio"] - 1) < abs(psnr_model["hf_ratio"] - 1)
    print(f"LR consistency: GAN / PSNR model = {ratio:.3f} ({'<=' if ratio <= 1.2 else '>'} 1.2)")
    print(f"HF energy closer to HR for the GAN: {closer} ({gan_model['hf_ratio']:.3f} vs {psnr_model['hf_ratio']:.3f})")

    images = comparison.images
    middle = images["hr"].shape[0] // 2
    panels = {"LR": images["lr"][middle, 0], "bicubic": images["cubic"][middle, 0]}
    panels |= {name: images[name][middle, 0] for name in models} | {"HR": images["hr"][middle, 0]}
    comparison_figure(args.figure, panels, title=f"{scan_path.name} slice {slices[0] + middle}, x2 in-plane (MR)")
    print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
