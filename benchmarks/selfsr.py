"""Self-supervised through-plane SR on Colin27 made thick, against cubic B-spline interpolation and ECLARE.

Colin27 (1 mm isotropic, 181 x 217 x 181; its top slice, above the head, is dropped so that 4 and 6 mm divide the
180 left) is acquired again with thick slices along k: a Gaussian slice profile of FWHM = spacing (contiguous),
4 mm and 6 mm by default (181 x 217 x 45 and x 30). Each method gets only the thick
scan and is scored against the 1 mm original over the whole volume, in the original's window mapped to [0, 1]:
PSNR, 3D SSIM, and PSNR within the head (voxels above 5 % of the window). Times are wall-clock seconds of the
whole command, reading and writing included, run one at a time on this machine (B-spline: in-process, no I/O).
The thick scans come from medsr's own slice model (Gaussian profile, no noise), the profile both methods are
told to assume, so this measures each method at its best, not robustness to a wrong slice model.

- ``bspline``: cubic B-spline interpolation along k (``selfsup.interpolate_slices``), the baseline.
- ``medsr selfsr``: the CLI, as a user runs it: its default recipe, or ``--steps N`` training steps (and
  ``--time-budget S`` to stop it early, which leaves it less trained).
- ``eclare``: the ECLARE reference implementation (``pip install eclare``, Remedios et al. 2025), run as its own
  command (``run-eclare``), given the true slice thickness. It lives in its own environment because it pins scipy
  1.11.4; ``--install-eclare DIR`` makes one (torch pinned to the local CPU build). It has no time budget; its
  length is set by ``--eclare-patches`` (its default, 1,000,000 patches of 128 per step, is hours on 2 CPU cores).

    python benchmarks/selfsr.py                          # 4 and 6 mm; eclare if `run-eclare` is on PATH
    python benchmarks/selfsr.py --install-eclare ~/.cache/medsr/eclare-venv
    python benchmarks/selfsr.py --eclare ~/.cache/medsr/eclare-venv/bin/run-eclare --eclare-patches 200000
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HR_SPACING = 1.0


def make_thick(hr, thickness: float):
    """Colin27 with slices of ``thickness`` mm every ``thickness`` mm along k (Gaussian profile)."""
    from medsr.degrade import Degradation, degrade

    return degrade(hr, Degradation(factors=(1, 1, thickness / HR_SPACING), modality="MR", slice_profile="gaussian"))


def score(sr, hr) -> dict[str, float]:
    """PSNR, 3D SSIM and head PSNR of ``sr`` against ``hr`` (same grid), in hr's window mapped to [0, 1]."""
    import numpy as np

    from medsr.data import FOREGROUND_LEVEL
    from medsr.intensity import default_window
    from medsr.metrics import psnr, ssim

    if sr.spatial_shape != hr.spatial_shape or not np.allclose(sr.affine, hr.affine, atol=1e-3):
        raise ValueError(f"output grid {sr.spatial_shape} {sr.affine.tolist()} is not the 1 mm original's")
    window = default_window(hr)
    pred, target = window.to_unit(sr.array)[None], window.to_unit(hr.array)[None]
    head = target > FOREGROUND_LEVEL
    return {
        "psnr": float(psnr(pred, target, data_range=1.0)),
        "ssim3d": float(ssim(pred, target, data_range=1.0)),
        "psnr_head": float(psnr(pred, target, data_range=1.0, mask=head)),
    }


def timed(command: list[str], timeout: float) -> tuple[float | None, str]:
    """Run a command; its wall time, or None and the reason it did not finish."""
    start = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"did not finish within {timeout:.0f} s"
    if result.returncode != 0:
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        return None, f"exit {result.returncode}: {last[0]}"
    return time.perf_counter() - start, ""


def scored(path: Path, hr) -> tuple[dict[str, float], str]:
    """Scores of the output file at ``path``, or none and why (unreadable, another grid)."""
    from medsr.io import read_volume

    try:
        return score(read_volume(path, modality="MR"), hr), ""
    except (OSError, ValueError) as error:
        return {}, f"not scored: {error}"[:200]


def run_eclare(executable: str, thick: Path, thickness: float, patches: int, timeout: float, folder: Path):
    """ECLARE on the thick scan; returns (output path or None, seconds or None, note)."""
    out = folder / f"eclare_{thick.stem}"
    command = [executable, "--in-fpath", str(thick), "--out-dir", str(out), "--gpu-id", "-1"]  # -1: the CPU
    command += ["--relative-slice-thickness", f"{thickness / HR_SPACING:g}", "--n-patches", str(patches)]  # voxels
    seconds, why = timed(command, timeout)
    outputs = sorted(out.glob("*_eclare.nii*"))
    if seconds is None or not outputs:
        return None, seconds, why or f"wrote no *_eclare.nii* into {out}"
    return outputs[0], seconds, f"{patches} patches"


def install_eclare(folder: Path) -> None:
    """A virtual environment with eclare, torch pinned to the local CPU build (never a CUDA download)."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    pip = [str(folder / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    constraints = folder / "constraints.txt"
    constraints.write_text("torch==2.13.0\n")
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "-c", str(constraints), "eclare==1.0.1"], check=True)
    print(f"installed: {folder / 'bin' / 'run-eclare'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--thickness", type=float, nargs="+", default=[4.0, 6.0], help="Slice thicknesses in mm.")
    parser.add_argument("--steps", type=int, help="medsr selfsr training steps (default: its own).")
    parser.add_argument("--time-budget", type=float, help="medsr selfsr: stop training after this many seconds.")
    parser.add_argument("--eclare", default=shutil.which("run-eclare"), help="The run-eclare executable.")
    parser.add_argument("--eclare-patches", type=int, default=6400, help="ECLARE training patches (6400: ~300 s here).")
    parser.add_argument("--eclare-timeout", type=float, default=1800.0, help="Seconds before ECLARE is stopped.")
    parser.add_argument("--install-eclare", type=Path, metavar="DIR", help="Make a venv with eclare in DIR and exit.")
    args = parser.parse_args()
    if args.install_eclare:
        install_eclare(args.install_eclare)
        return

    from medsr.io import read_volume, write_volume
    from medsr.samples import sample_path
    from medsr.selfsup import interpolate_slices

    colin = read_volume(sample_path("colin27"), modality="MR")
    hr = colin.replace(array=colin.array[..., :180])  # slice 0 stays where it was: same affine
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for thickness in args.thickness:
            lr = make_thick(hr, thickness)
            thick = folder / f"colin27_{thickness:g}mm.nii.gz"
            write_volume(lr, thick)
            print(f"{thick.name}: {lr!r}", flush=True)
            start = time.perf_counter()
            bspline = interpolate_slices(lr, 2, hr.spatial_shape[2])
            seconds = time.perf_counter() - start
            rows.append((thickness, "bspline", score(bspline, hr), seconds, ""))

            out = folder / f"selfsr_{thickness:g}mm.nii.gz"
            command = [sys.executable, "-m", "medsr", "selfsr", str(thick), str(out)]
            recipe = ["--steps", str(args.steps)] if args.steps else []
            recipe += ["--time-budget", f"{args.time_budget:g}"] if args.time_budget else []
            seconds, why = timed([*command, *recipe], timeout=3600)
            scores, why = scored(out, hr) if seconds else ({}, why)
            rows.append((thickness, "medsr selfsr", scores, seconds, why or " ".join(recipe) or "default recipe"))

            if not args.eclare:  # none on PATH, or --eclare ""
                why = "not installed (run with --install-eclare DIR, then --eclare DIR/bin/run-eclare)"
                rows.append((thickness, "eclare", {}, None, why))
            else:
                out, seconds, why = run_eclare(
                    args.eclare, thick, thickness, args.eclare_patches, args.eclare_timeout, folder
                )
                scores, failure = scored(out, hr) if out is not None else ({}, "")
                rows.append((thickness, "eclare", scores, seconds, failure or why))
            print_table(rows)  # after each thickness: a later failure loses nothing


def print_table(rows: list[tuple]) -> None:
    print(f"\n{'slices':>7} {'method':14} {'PSNR dB':>8} {'SSIM 3D':>8} {'head dB':>8} {'seconds':>8}  note")
    for thickness, method, scores, seconds, note in rows:
        values = [f"{scores[k]:8.2f}" if k != "ssim3d" else f"{scores[k]:8.4f}" for k in scores] or ["       -"] * 3
        time_text = f"{seconds:8.0f}" if seconds is not None else "       -"
        print(f"{thickness:5g}mm {method:14} {' '.join(values)} {time_text}  {note}", flush=True)


if __name__ == "__main__":
    main()
