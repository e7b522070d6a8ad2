"""medsr: super-resolution of medical scans, with numbers that compare it to interpolation.

The command line is a client of the public API (``import medsr``): it parses arguments, calls the library, and
prints. Library warnings (``medsr.MedsrWarning``) print as ``medsr: warning: ...``; the ``medsr`` logger's
messages (the model chosen for a scan, scans skipped) go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import math
import shlex
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import medsr
from medsr.config import load_config, shipped_configs
from medsr.data import crop_to_multiple, find_scans
from medsr.degrade import acquisition, summary
from medsr.infer import DEFAULT_MEMORY, PRECISIONS, parse_memory
from medsr.io import NIFTI_DTYPES, check_output, exit_on_sigterm, write_bytes
from medsr.report import degradation_figure, format_table, scores_text, write_evaluation
from medsr.samples import cache_dir, install_samples, is_installed, list_samples, sample_path
from medsr.selfsup import SelfSRSettings, selfsr_file
from medsr.uncertainty import CALIBRATION_COLUMNS, MAPS, calibrate_shipped, calibration_rows, map_path
from medsr.zoo import score_shipped, shipped_descriptions, summary_table

DEFAULT_MODEL = "edsr_mr_x2"


def _triple(text: str) -> tuple[float, ...]:
    """An argparse type: three finite numbers (i, j, k), e.g. '2,2,1'."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected 3 finite numbers (i, j, k) like 2,2,1, got {text!r}")
    return values


def _at_least(low: int):
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        if not text.lstrip("-").isdigit() or int(text) < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return int(text)

    return parse


def _memory(text: str) -> int:
    """An argparse type: a size in bytes like 2G or 512M."""
    try:
        return parse_memory(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _slab(text: str) -> tuple[int, int]:
    """'110:150' -> (110, 150)."""
    start, sep, stop = text.partition(":")
    if not sep or not start.isdigit() or not stop.isdigit() or int(start) >= int(stop):
        raise argparse.ArgumentTypeError(f"expected START:STOP slice indices like 110:150, got {text!r}")
    return int(start), int(stop)


def _info(args: argparse.Namespace) -> int:
    volume = medsr.read_volume(args.input)
    values = volume.array
    print(f"{args.input}\n{volume!r}\nrange [{float(values.min()):.6g}, {float(values.max()):.6g}]")
    return 0


def _samples(args: argparse.Namespace) -> int:
    if args.path:
        print(sample_path(args.path))
        return 0
    if not args.list:
        install_samples([s.name for s in list_samples() if s.needs_install])
    print(f"cache: {cache_dir()}")
    for sample in list_samples():
        state = "installed" if is_installed(sample.name) else "not installed"
        print(f"{sample.name:20s} {sample.modality:3s} {state:14s} {sample.description}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    import numpy as np

    check_output(args.output, [args.input], force=args.force)
    volume = medsr.read_volume(args.input, modality=args.modality)
    fields = ("factors", "spacing", "slice_thickness", "slice_profile", "kspace_window", "psf_fwhm", "noise")
    try:
        degradation = acquisition(volume, **{f: getattr(args, f) for f in (*fields, "noise_sigma", "photons")})
    except ValueError as error:
        raise ValueError(f"{args.input}: {error}") from error
    lr = medsr.degrade(volume, degradation, rng=np.random.default_rng(args.seed))
    medsr.write_volume(lr, args.output)
    print(f"wrote {args.output}: {lr!r}\n{degradation}")
    if args.figure:
        check_output(args.figure, [args.input, args.output], force=True)
        degradation_figure(args.figure, volume, lr, title=f"{args.input.name}: {summary(degradation)}")
        print(f"wrote {args.figure}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from medsr.train import fit

    if args.resume:
        if args.config or args.set or args.out:
            raise ValueError("--resume continues a run with its own config.yaml; pass only the run folder")
        run_dir, config = args.resume, None
    elif args.config is None:
        raise ValueError(
            f"pass a CONFIG.yaml or a shipped config ({', '.join(shipped_configs())}), or --resume RUN_DIR"
        )
    else:
        config = load_config(args.config, args.set)
        run_dir = args.out or Path("runs") / args.config.stem
    best = fit(config, run_dir, resume=bool(args.resume), device=args.device)
    if "step" in best:  # under torchrun only rank 0 validates
        print(f"best validation PSNR {best['psnr']:.2f} dB at step {best['step']}; checkpoints in {run_dir}")
    return 0


def _deidentifier(args: argparse.Namespace):
    """One de-identifier for the whole run (one secret salt: UIDs consistent across its outputs), or False."""
    from medsr.deidentify import Deidentifier

    return Deidentifier(args.anonymize) if args.anonymize else False


def _upscale(args: argparse.Namespace) -> int:
    """One scan, or every scan under a folder (bad files are reported and skipped)."""
    names = ("scale", "spacing", "modality", "tile", "overlap", "memory", "precision", "kspace_consistency", "force")
    names += ("dtype", "adapt", "new_study", "enhanced", "device", "uncertainty")
    options = _pick(args, names) | {"anonymize": _deidentifier(args), "progress": True}
    options["command_line"] = shlex.join(["medsr", *args.argv])  # for the sidecar of each output file
    if args.input.is_dir() and find_scans(args.input) != [args.input]:  # not one DICOM series
        from medsr.shard import ranks

        written, failed = medsr.upscale_folder(args.input, args.output, args.model, **options)  # of all processes
        place = ranks()
        processes = f" by {place.world_size} processes" if place.world_size > 1 else ""
        if place.rank == 0:
            print(f"upscaled {len(written)} of {len(written) + len(failed)} scans into {args.output}{processes}")
        return 1 if failed else 0
    medsr.upscale_file(args.input, args.output, args.model, **options)
    maps = [
        str(map_path(args.output, name)) for name in MAPS if args.uncertainty and map_path(args.output, name).exists()
    ]
    print(f"wrote {args.output}" + (f" and its maps {', '.join(maps)}" if maps else ""))
    return 0


def _selfsr(args: argparse.Namespace) -> int:
    given = _pick(args, ("steps", "time_budget", "precision", "tile", "memory"))
    given = {k: v for k, v in given.items() if v is not None}
    names = ("slice_thickness", "slice_profile", "target_spacing", "modality", "model", "save_model", "force", "device")
    options = _pick(args, names) | {"settings": SelfSRSettings(**given), "anonymize": _deidentifier(args)}
    sr, _, log = selfsr_file(args.input, args.output, **options)
    trained = f"trained {log['steps']} steps in {log['seconds']:.0f} s on {log['device']}; " if "steps" in log else ""
    print(f"{trained}wrote {args.output}: {sr!r}")
    return 0


def _pick(args: argparse.Namespace, names: Sequence[str]) -> dict:
    """The options ``names`` as keyword arguments of a library call."""
    return {name: getattr(args, name) for name in names}


def _interpolate(args: argparse.Namespace) -> int:
    from medsr.checkpoint import interpolate

    check_output(args.output, [args.psnr, args.gan], force=args.force)
    interpolate(args.psnr, args.gan, args.alpha, args.output)
    print(f"wrote {args.output}: {args.alpha:g} x {args.psnr} + {1 - args.alpha:g} x {args.gan}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    """A simulated LR of a held-out HR scan (--scan), or a real LR/HR pair (--lr, --hr)."""
    options = _pick(args, ("precision", "device", "uncertainty")) | {"adapt_seconds": args.adapt}
    if args.lr or args.hr:
        if not (args.lr and args.hr) or args.scan or args.slices or args.slice_axis != "k":
            raise ValueError("a real pair needs both --lr and --hr, and takes none of --scan, --slices, --slice-axis")
        inputs = [args.lr, args.hr]
    else:
        inputs = [args.scan] if args.scan and Path(args.scan).exists() else []  # a path, not a sample name
    if args.out:
        check_output(args.out, inputs, force=args.force)
    if args.lr:
        result = medsr.evaluate_pair(args.model, args.lr, args.hr, **options)
    else:
        axis = "ijk".index(args.slice_axis)
        result = medsr.evaluate(args.model, args.scan or "colin27", args.slices, slice_axis=axis, **options)
    print(scores_text(result))
    if args.out:
        write_evaluation(result, args.out, command_line=shlex.join(["medsr", *args.argv]))
        print(
            f"\nwrote {args.out}/: report.html, scores.csv/json, per_slice.csv/json, comparison/error_map/profile.png"
        )
    return 0


def _models(args: argparse.Namespace) -> int:
    """List the shipped models, print one's card, or score them on their held-out data (cards and table)."""
    shipped = shipped_descriptions()
    if unknown := sorted(set(args.names) - set(shipped)):
        raise ValueError(f"not shipped models: {unknown}; shipped: {', '.join(shipped)}")
    if args.names and not (args.evaluate or args.calibrate):
        if args.table:
            raise ValueError("--table writes a table: pass it without model names, or with --evaluate or --calibrate")
        print("\n".join(medsr.load_model(name).card for name in args.names))
        return 0
    names = args.names or list(shipped)
    if args.calibrate:
        if args.evaluate:
            raise ValueError("--calibrate and --evaluate run one at a time")
        rows = [row for n in names for row in calibration_rows(n, calibrate_shipped(n, precision=args.precision))]
        table = format_table(rows, CALIBRATION_COLUMNS)
        print(table)
        if args.table:
            write_bytes(args.table, f"```\n{table}\n```\n".encode())
            print(f"wrote {args.table}")
        return 0
    losing = [
        lost
        for name in names
        if args.evaluate
        for lost in score_shipped(name, precision=args.precision, adapt_seconds=args.adapt)
    ]
    print(table := summary_table(names))
    if args.table:
        write_bytes(args.table, f"```\n{table}\n```\n".encode())
        print(f"wrote {args.table}")
    for failure in losing:
        print(f"medsr models: {failure}", file=sys.stderr)
    return 1 if losing else 0


def _export(args: argparse.Namespace) -> int:
    """ONNX with dynamic batch and spatial axes, checked against torch by onnxruntime before it is written."""
    from medsr.export import export_onnx

    export_onnx(args.model, args.output, force=args.force)
    print(f"wrote {args.output} (run it with medsr.export.onnx_predictor, or any ONNX runtime)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Score the shipped model on held-out Colin27 slices, and upscale a simulated LR Colin27 end to end."""
    result = medsr.evaluate(args.model, "colin27")
    print(scores_text(result))
    write_evaluation(result, args.out)
    if args.model in shipped_descriptions():  # the gains that matter: on subjects it never saw (stored scores)
        print(f"\n{args.model} on every held-out set (`make models` scores them; Colin27 is its training subject):")
        print(summary_table([args.model]))

    # The same LR scan the table scored, simulated and then super-resolved through the `medsr upscale` path.
    model = medsr.load_model(args.model)
    hr = crop_to_multiple(medsr.read_volume(sample_path("colin27"), modality="MR"), scale=model.scale)
    lr = medsr.degrade(hr, result.degradation)
    medsr.write_volume(lr, args.out / "colin27_lr.nii.gz")
    sr = medsr.upscale(lr, model, progress=True)
    medsr.write_volume(sr, args.out / "colin27_sr.nii.gz")
    print(f"\nLR   {lr!r}\nSR   {sr!r}\nHR   {hr!r}")
    print(f"wrote {args.out}/: report.html, scores.csv, per_slice.csv, figures, colin27_lr.nii.gz, colin27_sr.nii.gz")
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line, naming the command and the problem."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _command(commands, name: str, run, help: str, **kwargs) -> argparse.ArgumentParser:
    command = commands.add_parser(name, help=help, description=help, **kwargs)
    command.set_defaults(run=run)
    return command


def _adapt(command: argparse.ArgumentParser, help: str) -> None:
    command.add_argument("--adapt", type=_at_least(1), nargs="?", const=60, default=0, metavar="SECONDS", help=help)


def _common(command: argparse.ArgumentParser, *, force: bool = True, precision: bool = False) -> None:
    if precision:
        command.add_argument(
            "--precision", choices=PRECISIONS, default="auto", help="bf16 where the CPU has it (auto)."
        )
    if force:
        command.add_argument("-f", "--force", action="store_true", help="Replace the output if it exists.")


def _anonymize(command: argparse.ArgumentParser) -> None:
    group = command.add_mutually_exclusive_group()
    for option, mode, text in (
        ("--anonymize", "basic", "de-identify (PS3.15 basic profile, UIDs remapped with a secret per run)"),
        ("--anonymize-pixels-only", "pixels-only", "keep nothing but the image and its geometry"),
    ):
        group.add_argument(option, dest="anonymize", action="store_const", const=mode, help=f"DICOM output: {text}.")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="medsr", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"medsr {medsr.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    three, inputs = _triple, "NIfTI, DICOM series folder or file, PNG/TIFF."

    info = _command(commands, "info", _info, "Print a scan's shape, spacing, orientation and range.")
    info.add_argument("input", type=Path, help=inputs)

    samples = _command(commands, "samples", _samples, "Install the real sample scans into the user cache; list them.")
    samples.add_argument("--list", action="store_true", help="Only list, install nothing.")
    samples.add_argument("--path", metavar="NAME", help="Print the file of one sample (installing it if needed).")

    simulate = _command(commands, "simulate", _simulate, "Simulate a low-resolution acquisition (MR/CT/US/X-ray).")
    simulate.add_argument("input", type=Path, help=inputs)
    simulate.add_argument("output", type=Path, help="NIfTI or PNG/TIFF to write.")
    simulate.add_argument("--modality", help="Scanner model (MR, CT, US, CR, DX); needed for NIfTI/PNG.")
    simulate.add_argument("--factors", type=three, default=(1.0, 1.0, 1.0), help="Resolution loss per axis i,j,k.")
    simulate.add_argument("--spacing", type=three, help="Target spacing in mm per axis i,j,k (instead of --factors).")
    simulate.add_argument(
        "--slice-thickness", type=float, default=0.0, help="MR/CT slice thickness (profile FWHM) in mm."
    )
    simulate.add_argument("--slice-profile", choices=("rect", "gaussian"), default="rect")
    simulate.add_argument("--kspace-window", choices=("rect", "hann", "tukey"), default="rect", help="MR in-plane.")
    simulate.add_argument("--psf-fwhm", type=three, default=(0.0, 0.0, 0.0), help="Gaussian PSF FWHM in mm, i,j,k.")
    simulate.add_argument("--noise", choices=("none", "rician", "gaussian", "poisson", "speckle"), default="none")
    simulate.add_argument("--noise-sigma", type=float, default=0.0, help="Rician/Gaussian sigma in image units (HU).")
    simulate.add_argument("--photons", type=float, default=0.0, help="X-ray quanta per pixel at full intensity.")
    simulate.add_argument("--seed", type=int, default=0, help="Seed of the noise.")
    simulate.add_argument("--figure", type=Path, help="Also write a PNG: HR | LR | difference.")
    _common(simulate)

    train = _command(commands, "train", _train, "Train a model from a YAML config.")
    train.add_argument(
        "config",
        type=Path,
        nargs="?",
        help=f"YAML config file, or the name of a shipped one: {', '.join(shipped_configs())}.",
    )
    train.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE", help="Override config values.")
    train.add_argument("--out", type=Path, help="Run folder (default runs/<config name>).")
    train.add_argument("--resume", type=Path, metavar="RUN_DIR", help="Continue an interrupted run from its last/.")
    train.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:N or mps.")

    upscale = _command(commands, "upscale", _upscale, "Super-resolve a scan; the output keeps its field of view.")
    upscale.add_argument("input", type=Path, help=f"{inputs} Or a folder of scans.")
    upscale.add_argument("output", type=Path, help="Same format family; a DICOM series is a folder without suffix.")
    upscale.add_argument("--model", help="Shipped model name or checkpoint folder (default: chosen by modality).")
    upscale.add_argument("--scale", type=three, help="Output voxels per input voxel along i,j,k, e.g. 2,2,1.")
    upscale.add_argument("--spacing", type=three, help="Target spacing in mm along i,j,k (instead of --scale).")
    upscale.add_argument("--modality", help="Override the modality (NIfTI/PNG carry none).")
    upscale.add_argument("--tile", type=_at_least(1), help="Tile edge in input voxels (default: from --memory).")
    upscale.add_argument("--overlap", type=_at_least(0), help="Tile overlap in voxels (default: 2x the model's reach).")
    upscale.add_argument("--memory", type=_memory, default=DEFAULT_MEMORY, help="Working memory of one forward (2G).")
    upscale.add_argument(
        "--kspace-consistency",
        action=argparse.BooleanOptionalAction,
        help="MRI: keep the k-space band the input measured exactly (default: on for MR k-space models).",
    )
    upscale.add_argument("--dtype", choices=NIFTI_DTYPES, default="input", help="NIfTI voxels: the input's or float32.")
    _adapt(upscale, "Fine-tune the model on the scan itself first (LR -> LLR pairs; 60 s if no value).")
    upscale.add_argument("--new-study", action="store_true", help="DICOM output: put the series in a new study.")
    upscale.add_argument("--enhanced", action="store_true", help="DICOM output: one enhanced multi-frame file.")
    upscale.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:N or mps.")
    upscale.add_argument(
        "--uncertainty",
        action="store_true",
        help="Also write trust maps beside the output: uncertainty (SD), calibrated lower/upper bounds, and the "
        "detail added (consistent with the input / contradicting it); about 10x the time.",
    )
    _anonymize(upscale)
    _common(upscale, precision=True)

    selfsr = _command(commands, "selfsr", _selfsr, "Super-resolve the thick-slice axis of one scan from itself.")
    selfsr.add_argument("input", type=Path, help="NIfTI or DICOM series folder with thick slices.")
    selfsr.add_argument("output", type=Path, help="NIfTI, or a new DICOM series folder (a name without suffix).")
    selfsr.add_argument("--slice-thickness", type=float, help="Profile FWHM in mm (default: SliceThickness/spacing).")
    selfsr.add_argument("--slice-profile", choices=("gaussian", "rect"), default="gaussian")
    selfsr.add_argument("--target-spacing", type=float, help="Output slice spacing in mm (default: in-plane).")
    selfsr.add_argument("--steps", type=int, help="Training steps: they decide the result (default 1500).")
    selfsr.add_argument("--time-budget", type=float, help="Stop training early after this many seconds (warns).")
    selfsr.add_argument("--tile", type=_at_least(1), help="Inference tile edge in voxels (default: from --memory).")
    selfsr.add_argument("--memory", type=_memory, help="Working memory of one forward (default 2G).")
    selfsr.add_argument("--modality", help="Override the modality (NIfTI carries none; sets the intensity window).")
    selfsr.add_argument("--save-model", type=Path, metavar="DIR", help="Save the trained network (safetensors+JSON).")
    selfsr.add_argument("--model", type=Path, metavar="DIR", help="Apply a network saved by --save-model.")
    selfsr.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:N or mps.")
    _anonymize(selfsr)
    _common(selfsr, precision=True)

    evaluate = _command(commands, "evaluate", _evaluate, "Compare a model with interpolation on held-out data.")
    evaluate.add_argument("--model", default=DEFAULT_MODEL, help="Shipped model name or checkpoint folder.")
    evaluate.add_argument("--scan", help="Sample name or path of an HR scan, its LR simulated (default colin27).")
    evaluate.add_argument("--slices", type=_slab, help="Held-out slab START:STOP along the model's split axis.")
    evaluate.add_argument(
        "--slice-axis",
        choices=("i", "j", "k"),
        default="k",
        help="Through-plane models: the scan's axis to thin out and restore (j: across a coronal image's rows).",
    )
    evaluate.add_argument("--lr", type=Path, help="A real LR scan (with --hr): scored as acquired, nothing simulated.")
    evaluate.add_argument("--hr", type=Path, help="The HR scan of the same subject, at the model's scale of --lr.")
    evaluate.add_argument("--out", type=Path, help="Folder for report.html, scores (CSV/JSON) and figures.")
    _adapt(evaluate, "Also score the model fine-tuned on the LR slab itself (as upscale --adapt).")
    evaluate.add_argument(
        "--uncertainty", action="store_true", help="Also score the trust maps (as upscale --uncertainty) in the report."
    )
    evaluate.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps or auto.")
    _common(evaluate, precision=True)

    models = _command(commands, "models", _models, "List the shipped models, print their cards, or score them.")
    models.add_argument("names", nargs="*", help="Models to show (their MODEL_CARD.md) or score; default: all.")
    models.add_argument("--evaluate", action="store_true", help="Score each on its held-out data; exit 1 if one loses.")
    models.add_argument("--table", type=Path, help="Also write the summary table to this file (Markdown).")
    models.add_argument(
        "--calibrate",
        action="store_true",
        help="Calibrate each one's uncertainty interval on its held-out sets (stored with it); print coverage and "
        "rank correlation per set (--table: write them).",
    )
    _adapt(models, "With --evaluate: also score each model fine-tuned on each held-out LR (the table's last columns).")
    _common(models, force=False, precision=True)

    interpolate = _command(commands, "interpolate", _interpolate, "Blend a PSNR model and its GAN (ESRGAN).")
    interpolate.add_argument("psnr", type=Path, help="The PSNR-oriented checkpoint (a GAN run's psnr/).")
    interpolate.add_argument("gan", type=Path, help="The adversarially fine-tuned checkpoint (the run's best/).")
    interpolate.add_argument("output", type=Path, help="Checkpoint folder to write.")
    interpolate.add_argument("--alpha", type=float, default=0.5, help="Weight of the PSNR model, 0..1 (0.5).")
    _common(interpolate)

    export = _command(commands, "export", _export, "Export a model to ONNX (needs the onnx extra).")
    export.add_argument("output", type=Path, help="The .onnx file to write.")
    export.add_argument("--model", default=DEFAULT_MODEL, help="Shipped model name or checkpoint folder.")
    _common(export)

    demo = _command(commands, "demo", _demo, "Evaluate and run the shipped MRI x2 model on Colin27.")
    demo.add_argument("--model", default=DEFAULT_MODEL, help="Shipped model name or checkpoint folder.")
    demo.add_argument("--out", type=Path, default=Path("demo_output"), help="Output folder (default demo_output).")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    exit_on_sigterm()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"medsr {args.command}: %(message)s"))
    log = logging.getLogger("medsr")
    log.addHandler(handler)
    log.setLevel(logging.INFO)

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"medsr: warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", medsr.MedsrWarning)
            warnings.showwarning = show
            return args.run(args)
    except (ValueError, OSError, RuntimeError) as error:
        print(f"medsr {args.command}: error: {error}", file=sys.stderr)
        return 2
    finally:
        log.removeHandler(handler)
