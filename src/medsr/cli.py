"""medsr: super-resolution of medical scans, with numbers that compare it to interpolation."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: `medsr --help` stays fast
    from medsr.evaluation import Slab

DEFAULT_MODEL = "edsr_mr_x2"
SCORE_COLUMNS = ("method", "psnr", "ssim", "psnr_body", "ssim_body", "ssim3d", "hfen", "hf_ratio", "lr_rmse")


def _triple(text: str) -> tuple[float, float, float]:
    """'2,2,1' -> (2.0, 2.0, 1.0)."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected three numbers like 2,2,1, got {text!r}") from error
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers (i, j, k) like 2,2,1, got {text!r}")
    return values


def _slab(text: str) -> tuple[int, int]:
    """'110:150' -> (110, 150)."""
    start, sep, stop = text.partition(":")
    if not sep or not start.isdigit() or not stop.isdigit():
        raise argparse.ArgumentTypeError(f"expected START:STOP slice indices like 110:150, got {text!r}")
    return int(start), int(stop)


def _check_output(output: Path, inputs: Sequence[Path], force: bool) -> None:
    """Refuse to overwrite an input ever, or an existing file without --force; check the format early."""
    from medsr.io import file_format

    if any(output.resolve() == p.resolve() for p in inputs):
        raise ValueError(f"{output}: output is the input; medsr never overwrites its input")
    if output.exists() and not force:
        raise ValueError(f"{output}: exists; pass --force to replace it")
    file_format(output)  # raises on an unknown suffix


def _info(args: argparse.Namespace) -> int:
    from medsr.io import read_volume

    volume = read_volume(args.input)
    values = volume.array
    print(f"{args.input}\n{volume!r}\nrange [{float(values.min()):.6g}, {float(values.max()):.6g}]")
    return 0


def _samples(args: argparse.Namespace) -> int:
    from medsr.samples import cache_dir, install_samples, is_installed, list_samples, sample_path

    if args.path:
        print(sample_path(args.path))
        return 0
    if not args.list:
        install_samples([s.name for s in list_samples() if s.is_debian])
    print(f"cache: {cache_dir()}")
    for sample in list_samples():
        state = "installed" if is_installed(sample.name) else "not installed"
        print(f"{sample.name:20s} {sample.modality:3s} {state:14s} {sample.description}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    import numpy as np

    from medsr.degrade import Degradation, degrade, factors_for_spacing
    from medsr.io import read_volume, write_volume

    _check_output(args.output, [args.input], args.force)
    volume = read_volume(args.input, modality=args.modality)
    if volume.modality.value == "OT":
        raise ValueError(f"{args.input}: the file names no modality; pass --modality MR, CT, US, CR or DX")
    factors = factors_for_spacing(volume, args.spacing) if args.spacing else args.factors
    if args.slice_thickness and factors[2] == 1 and not args.spacing:
        # A thickness alone means: slices that thick, at that increment (contiguous), unless --factors says otherwise.
        factors = (*factors[:2], max(1.0, args.slice_thickness / volume.spacing[2]))
    degradation = Degradation(
        factors=factors,
        modality=volume.modality.value,
        kspace_window=args.kspace_window,
        slice_profile=args.slice_profile,
        slice_thickness=args.slice_thickness or 0.0,
        psf_fwhm=args.psf_fwhm,
        noise=args.noise,
        noise_sigma=args.noise_sigma,
        photons=args.photons,
    )
    lr = degrade(volume, degradation, rng=np.random.default_rng(args.seed))
    write_volume(lr, args.output)
    print(f"wrote {args.output}: {lr!r}\n{degradation}")
    if args.figure:
        from medsr.report import degradation_figure

        degradation_figure(args.figure, volume, lr, title=f"{args.input.name}: {_describe(degradation)}")
        print(f"wrote {args.figure}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from medsr.config import load_config
    from medsr.train import fit

    if args.resume:
        if args.config or args.set or args.out:
            raise ValueError("--resume continues a run with its own config.yaml; pass only the run folder")
        run_dir, config = args.resume, None
    elif args.config is None:
        raise ValueError("pass a CONFIG.yaml to train, or --resume RUN_DIR")
    else:
        config = load_config(args.config, args.set)
        run_dir = args.out or Path("runs") / args.config.stem
    best = fit(config, run_dir, resume=bool(args.resume))
    if "step" in best:  # under torchrun only rank 0 validates
        print(f"best validation PSNR {best['psnr']:.2f} dB at step {best['step']}; checkpoints in {run_dir}")
    return 0


def _upscale(args: argparse.Namespace) -> int:
    """One scan, or every scan under a folder (batch: bad files are reported and skipped)."""
    from tqdm import tqdm

    from medsr.data import find_scans
    from medsr.progress import progress_bar

    if args.scale and args.spacing:
        raise ValueError("give --scale or --spacing, not both")
    scans = find_scans(args.input) if args.input.is_dir() else [args.input]
    models = {}  # name -> (model, description): each loaded once in batch mode
    if scans == [args.input]:  # a file, or a folder that is one DICOM series
        _check_output(args.output, [args.input], args.force)
        _upscale_scan(args.input, args.output, models, args)
        return 0
    if args.output.exists() and not args.output.is_dir():
        raise ValueError(f"{args.output}: batch mode writes into a folder, and this is a file")
    failed = []
    for scan in progress_bar(scans, desc="scans", unit="scan"):
        output = args.output / scan.relative_to(args.input)
        try:
            _check_output(output, [scan], args.force)
            _upscale_scan(scan, output, models, args)
        except (ValueError, OSError) as error:
            failed.append(scan)
            tqdm.write(f"medsr upscale: skipped {scan}: {error}", file=sys.stderr)
    print(f"upscaled {len(scans) - len(failed)} of {len(scans)} scans into {args.output}")
    return 1 if failed else 0


def _warn(message: str) -> None:
    print(f"medsr: warning: {message}", file=sys.stderr)


def _upscale_scan(source: Path, output: Path, models: dict, args: argparse.Namespace) -> None:
    """Integer factors between NIfTI/DICOM series stream slab by slab (memory independent of the scan's size);
    everything else (PNG/TIFF, ultrasound frames, non-integer factors) goes through memory.

    Without ``--model`` the shipped model for the scan's modality and the asked factors is used
    (``zoo.choose_model``); ``models`` caches the loaded ones."""
    import numpy as np

    from medsr.infer import model_plan, model_predictor, super_resolve
    from medsr.inputs import input_warnings
    from medsr.intensity import intensity_range, window_from_range
    from medsr.io import file_format, open_volume, read_volume, write_volume
    from medsr.streaming import upscale_file
    from medsr.zoo import choose_model, is_through_plane, model_family

    source_format = file_format(source)
    streamable = source_format in ("nifti", "dicom") and file_format(output) in ("nifti", "dicom")
    try:  # headers only
        volume = open_volume(source, modality=args.modality) if streamable else None
    except ValueError:  # e.g. an ultrasound frame, cropped to its image region: read_volume's job
        streamable = False
    if not streamable:
        volume = read_volume(source, modality=args.modality)
    factors = args.scale
    if args.spacing:
        factors = tuple(a / b for a, b in zip(volume.spacing, args.spacing, strict=True))
    modality = volume.modality.value
    name = args.model
    if name is None:
        if modality == "OT":
            _warn(f"{source} names no modality; using the MR model (pass --modality or --model)")
        name = choose_model("MR" if modality == "OT" else modality, factors)
        print(f"{source}: model {name}", file=sys.stderr)
    if name not in models:
        models[name] = _load_model(name)
    model, description = models[name]
    if modality == "OT":  # NIfTI/PNG carry no modality: take the model's (it sets the window rule)
        modality = description["modality"]
    elif model_family(modality) != model_family(description["modality"]):
        _warn(f"{source} is {modality}, but {name} was trained on {description['modality']}; expect poor results")
    model_scale = description["model_kwargs"]["scale"]
    if is_through_plane(description["scale"]) and factors is not None and factors[2] <= 1 + 1e-6:
        raise ValueError(f"{name} makes thin slices {description['scale']} (i, j, k): ask for a factor along k")
    scale = model_plan(factors or description["scale"], model_scale)
    window = None  # the streaming path's, when the percentiles below give it
    if "inputs" in description:  # checkpoints from before medsr recorded what they were trained on have none
        intensities = intensity_range(volume.slices if streamable else lambda: [volume.array.numpy()])
        if intensities[1] > intensities[0]:  # a constant scan: left to the window's own error
            window = window_from_range(modality, intensities)
        for problem in input_warnings(
            description["inputs"],
            modality=description["modality"],
            spacing=None if source_format == "image" else volume.spacing,  # PNG/TIFF: 1 mm by convention
            scale=scale,
            intensities=intensities,
        ):
            _warn(f"{source}: {problem}; results may be poor")
    output.parent.mkdir(parents=True, exist_ok=True)
    text = f"medsr SR x{'x'.join(f'{f:g}' for f in factors or scale)} {Path(name).name}"[:64]
    if args.kspace_consistency and not (factors is None or np.allclose(factors, scale)):
        raise ValueError("--kspace-consistency needs the model's own scale (no --scale/--spacing resampling)")
    if streamable and (factors is None or np.allclose(factors, scale)) and not args.kspace_consistency:
        upscale_file(
            source,
            output,
            model_predictor(model, precision=args.precision),
            scale=scale,
            spatial_dims=len(model_scale),
            modality=modality,
            tile=args.tile,
            overlap=args.overlap,
            description=text,
            anonymize=args.anonymize,
            window=window,
        )
        print(f"wrote {output}")
        return
    if streamable:
        volume = read_volume(source, modality=args.modality)
    sr = super_resolve(
        volume.replace(modality=modality),
        model,
        model_scale=model_scale,
        factors=factors or scale,
        tile=args.tile,
        overlap=args.overlap,
        precision=args.precision,
    )
    if args.kspace_consistency:  # the scan is the measured k-space band: put it back into the output
        from medsr.config import config_from_dict
        from medsr.consistency import kspace_consistency

        sr = kspace_consistency(sr, volume, config_from_dict(description["config"]).degradation)
    write_volume(sr, output, description=text, anonymize=args.anonymize)
    print(f"wrote {output}: {sr!r}")


def _selfsr(args: argparse.Namespace) -> int:
    import dataclasses

    from medsr.checkpoint import load_checkpoint, save_checkpoint
    from medsr.io import read_volume, write_volume
    from medsr.selfsup import SelfSRSettings, fit_and_apply, slice_acquisition

    _check_output(args.output, [args.input], args.force)
    if args.save_model and args.model:
        raise ValueError("--model applies a saved network; --save-model saves a newly trained one: pass one")
    if args.save_model and (
        args.save_model.exists() and not args.force or args.save_model in (args.input, args.output)
    ):
        raise ValueError(f"{args.save_model}: exists or is the input/output; choose a new folder (or --force)")
    given = {"steps": args.steps, "time_budget": args.time_budget, "precision": args.precision}
    settings = SelfSRSettings(**{key: value for key, value in given.items() if value is not None})
    volume = read_volume(args.input, modality=args.modality)
    try:
        acquisition = slice_acquisition(volume, thickness=args.slice_thickness, profile=args.slice_profile)
    except ValueError as error:
        raise ValueError(f"{args.input}: {error}") from error
    print(
        f"{args.input}: {volume!r}\nslice axis {'ijk'[acquisition.axis]}: {acquisition.spacing:.3g} mm apart, "
        f"{acquisition.thickness:.3g} mm thick ({acquisition.profile} profile)",
        file=sys.stderr,
    )
    model = None
    if args.model:
        model, description = load_checkpoint(args.model)
        if "selfsr" not in description:
            raise ValueError(f"{args.model}: not a network saved by medsr selfsr --save-model")
        if description["selfsr"]["acquisition"] != dataclasses.asdict(acquisition):
            print(
                f"medsr selfsr: warning: {args.model} learnt slices {description['selfsr']['acquisition']}, "
                f"this scan has {dataclasses.asdict(acquisition)}; expect poorer results",
                file=sys.stderr,
            )
    sr, model, log = fit_and_apply(
        volume, acquisition, target_spacing=args.target_spacing, settings=settings, model=model
    )
    text = f"medsr selfsr {acquisition.spacing:.3g}mm to {sr.spacing[acquisition.axis]:.3g}mm"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_volume(sr, args.output, description=text, anonymize=args.anonymize)
    if args.save_model:
        selfsr = {"source": str(args.input), "acquisition": dataclasses.asdict(acquisition)}
        selfsr |= {key: log[key] for key in ("steps", "seconds", "l1")}
        save_checkpoint(args.save_model, model, {**log, "selfsr": selfsr})
    trained = f"trained {log['steps']} steps in {log['seconds']:.0f} s; " if "steps" in log else ""
    print(f"{trained}wrote {args.output}: {sr!r}")
    return 0


def _interpolate(args: argparse.Namespace) -> int:
    from medsr.checkpoint import interpolate

    if args.output.exists() and not args.force:
        raise ValueError(f"{args.output}: exists; pass --force to replace it")
    interpolate(args.psnr, args.gan, args.alpha, args.output)
    print(f"wrote {args.output}: {args.alpha:g} x {args.psnr} + {1 - args.alpha:g} x {args.gan}")
    return 0


def _load_model(model_ref: str):
    """A checkpoint with the fields the commands rely on, or a ValueError naming it."""
    from medsr.checkpoint import load_checkpoint

    model, description = load_checkpoint(model_ref)
    missing = {"scale", "modality", "degradation", "config"} - set(description)
    if missing:
        raise ValueError(f"{model_ref}: checkpoint description lacks {sorted(missing)}; was it made by medsr train?")
    return model, description


def _evaluate_scan(model_ref: str, scan: str, slices: tuple[int, int] | None, precision: str = "auto"):
    """Compare a model with the baselines on a held-out slab of a scan (HFEN and 3D SSIM included).

    Returns the ``evaluation.Comparison``, the degradation and the :class:`Slab`."""
    from medsr.config import config_from_dict
    from medsr.data import prepare_scan
    from medsr.evaluation import Slab, compare_methods
    from medsr.infer import model_predictor
    from medsr.io import read_volume
    from medsr.samples import resolve_scan
    from medsr.train import training_scans

    model, description = _load_model(model_ref)
    config = config_from_dict(description["config"])
    path = resolve_scan(scan)
    # The split fit() saved holds the training machine's paths; the config's split, rebuilt, this machine's.
    saved = description.get("scans", {})
    here = training_scans(config)
    train, val = ([Path(p) for p in saved.get(k, [])] + paths for k, paths in (("train", here[0]), ("val", here[1])))
    if config.data.split == "scan" and path in train + val:  # validation picked the checkpoint: not held out
        raise ValueError(f"{path} is a scan {model_ref} trained or was validated on; evaluate on a test scan")
    if config.data.split == "region" and path in train:
        slices = slices or config.data.test_slices
        for region, (start, stop) in (("train", config.data.train_slices), ("val", config.data.val_slices)):
            if slices[0] < stop and start < slices[1]:
                raise ValueError(
                    f"slices {slices} overlap the {region} slices ({start}, {stop}) of {model_ref} "
                    f"on {path}; choose a held-out slab with --slices"
                )
    hr = prepare_scan(read_volume(path, modality=description["modality"]), config.degradation)
    axis = config.data.split_axis
    slices = slices or (0, hr.spatial_shape[axis])  # a scan the model never saw: all of it
    if slices[1] > hr.spatial_shape[axis]:
        raise ValueError(
            f"{path}: has {hr.spatial_shape[axis]} voxels along {'ijk'[axis]}; choose a slab inside it with --slices"
        )
    comparison = compare_methods(
        hr,
        config.degradation,
        {model_ref: model_predictor(model, precision=precision)},
        slices=slices,
        spatial_dims=config.model.spatial_dims,
        extras=True,
        axis=axis,
    )
    return comparison, config.degradation, Slab(*slices, axis)


def _describe(degradation) -> str:
    """The non-default parts of a Degradation, for figure titles."""
    import dataclasses

    from medsr.degrade import Degradation

    defaults = Degradation()
    changed = [
        f"{f.name}={getattr(degradation, f.name)}"
        for f in dataclasses.fields(degradation)
        if getattr(degradation, f.name) != getattr(defaults, f.name) or f.name in ("modality", "factors")
    ]
    return ", ".join(changed)


def _write_evaluation(comparison, directory: Path, model_ref: str, scan: str, degradation, slab: Slab) -> None:
    """scores.csv/json (means per method), per_slice.csv/json, three figures and report.html into ``directory``."""
    from medsr.evaluation import BASELINES, body_mask
    from medsr.report import error_map_figure, profile_figure, write_html_report

    directory.mkdir(parents=True, exist_ok=True)
    for name, rows, columns in (
        ("scores", comparison.rows, SCORE_COLUMNS),
        ("per_slice", comparison.slices, ("method", "slice", *SCORE_COLUMNS[1:-2])),  # hf_ratio, lr_rmse: slab-wide
    ):
        with (directory / f"{name}.csv").open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        (directory / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    images = comparison.images
    middle = images["hr"].shape[0] // 2
    hr = images["hr"][middle, 0]
    methods = {name: images[name][middle, 0] for name in ("cubic", model_ref)}
    title = f"slice {slab.k_index(middle)}, {_describe(degradation)}"
    figures = {
        "Side by side, with a zoomed detail": directory / "comparison.png",
        "Absolute error against HR": directory / "error_map.png",
        "Intensity profile across the strongest edge": directory / "profile.png",
    }
    _figure(images, model_ref, figures["Side by side, with a zoomed detail"], degradation, slab)
    error_map_figure(figures["Absolute error against HR"], hr, methods, title=title)
    mask = body_mask(images["hr"][middle : middle + 1])[0, 0]
    profile_figure(figures["Intensity profile across the strongest edge"], hr, methods, mask=mask, title=title)
    write_html_report(
        directory / "report.html",
        comparison.slices,
        model=model_ref,
        baselines=BASELINES,
        unit="slice",
        degradation=_describe(degradation),
        data_range=1.0,
        intensities="normalised by the LR scan's 0.5..99.9th percentiles (CT: -1024..3071 HU) to [0, 1]",
        mask="foreground (> 5 % of the window), dilated by 2 voxels in-plane",
        split=f"{scan}, {slab}, held out from training and validation",
        figures=figures,
        title=f"medsr evaluation: {model_ref} on {scan}",
    )


def _print_scores(rows: list[dict], scan: str, degradation, slab: Slab) -> None:
    from medsr.report import format_table

    print(
        f"\n{scan}, held-out slab {slab}, {_describe(degradation)}; PSNR/SSIM/HFEN "
        "per 2D slice, SSIM 3D over the slab, data_range 1 on intensities normalised by the LR scan's 0.5..99.9th "
        "percentiles; *_body: within the dilated foreground mask\n"
    )
    print(format_table(rows, SCORE_COLUMNS))


def _evaluate(args: argparse.Namespace) -> int:
    comparison, degradation, slab = _evaluate_scan(args.model, args.scan, args.slices, args.precision)
    _print_scores(comparison.rows, args.scan, degradation, slab)
    if args.out:
        _write_evaluation(comparison, args.out, args.model, args.scan, degradation, slab)
        print(
            f"\nwrote {args.out}/: report.html, scores.csv/json, per_slice.csv/json, comparison/error_map/profile.png"
        )
    return 0


def _held_out_sets(description: dict) -> list[tuple[str, tuple[int, int] | None]]:
    """(scan, slab or None for the whole scan) a model is scored on: the test region of each training scan (region
    split; sample names kept, folders expanded) or the test scans (scan split, as split on this machine), and the
    config's ``held_out_scans``."""
    from medsr.config import config_from_dict
    from medsr.samples import resolve_scan
    from medsr.train import training_scans

    config = config_from_dict(description["config"])
    data = config.data
    if data.split == "region":
        scans = [path for scan in data.scans for path in _expand(scan, resolve_scan(scan))]
        sets = [(scan, tuple(data.test_slices)) for scan in scans]
    else:
        sets = [(str(path), None) for path in training_scans(config)[2]]
    return sets + [(scan, None) for scan in data.held_out_scans]


def _expand(name: str, path: Path) -> list[str]:
    """A scan's name as given, or the scans inside it when it is a folder of scans (not one DICOM series)."""
    from medsr.data import find_scans

    found = find_scans(path) if path.is_dir() else [path]
    return [name] if found == [path] else [str(p) for p in found]


def _models(args: argparse.Namespace) -> int:
    """List the shipped models, print one's card, or score them on their held-out data (cards and table)."""
    from medsr.checkpoint import resolve_checkpoint
    from medsr.report import format_table, write_atomically
    from medsr.zoo import shipped_descriptions, summary_rows

    shipped = shipped_descriptions()
    names = args.names or list(shipped)
    unknown = sorted(set(names) - set(shipped))
    if unknown:
        raise ValueError(f"not shipped models: {unknown}; shipped: {', '.join(shipped)}")
    if args.names and not args.evaluate:
        if args.table:
            raise ValueError("--table writes the summary table: pass it without model names, or with --evaluate")
        for name in names:
            print((resolve_checkpoint(name) / "MODEL_CARD.md").read_text())
        return 0
    losing = [failure for name in (names if args.evaluate else []) for failure in _score_shipped(name, args.precision)]
    rows = [
        row
        for name, description in shipped_descriptions().items()
        if name in names
        for row in summary_rows(name, description)
    ]
    columns = ("model", "modality", "scale", "kind", "lr_spacing", "held_out", "psnr", "psnr_cubic", "gain_db")
    table = format_table(rows, columns)
    print(table)
    if args.table:
        write_atomically(args.table, f"```\n{table}\n```\n".encode())
        print(f"wrote {args.table}")
    for failure in losing:
        print(f"medsr models: {failure}", file=sys.stderr)
    return 1 if losing else 0


def _score_shipped(name: str, precision: str) -> list[str]:
    """Score a model on each of its held-out sets, store them in its model.json (``scores['held_out']``) and write
    its MODEL_CARD.md. Returns the sets on which it does not beat bicubic's PSNR."""
    from medsr.checkpoint import resolve_checkpoint, update_description
    from medsr.infer import resolve_precision
    from medsr.report import held_out_text, model_card, write_atomically

    directory = resolve_checkpoint(name)
    model, description = _load_model(str(directory))
    held_out, losing = [], []
    for scan, slices in _held_out_sets(description):
        comparison, _, used = _evaluate_scan(str(directory), str(scan), slices, precision)
        data = held_out_text(Path(scan).name, used if slices else None)
        held_out.append(
            {
                "data": data,
                "scan": str(scan),
                "slices": [used.start, used.stop] if slices else None,
                "rows": comparison.rows,
            }
        )
        psnr = {row["method"]: row["psnr"] for row in comparison.rows}
        if psnr[str(directory)] <= psnr["cubic"]:
            losing.append(
                f"{name} does not beat bicubic on {data}: {psnr[str(directory)]:.2f} <= {psnr['cubic']:.2f} dB"
            )
        print(f"{name} on {data}: {psnr[str(directory)]:.2f} dB, bicubic {psnr['cubic']:.2f} dB", file=sys.stderr)
    for entry in held_out:  # the table calls the model by its name
        for row in entry["rows"]:
            row["method"] = name if row["method"] == str(directory) else row["method"]
    scores = {k: v for k, v in description["scores"].items() if k != "test"} | {"held_out": held_out}
    updates = {"parameters": sum(p.numel() for p in model.parameters()), "scores": scores}
    update_description(directory, **updates)
    card = model_card(name, description | updates, held_out, precision=resolve_precision(precision))
    write_atomically(directory / "MODEL_CARD.md", card.encode())
    return losing


def _figure(images, model_name: str, path: Path, degradation, slab: Slab) -> None:
    from medsr.report import comparison_figure

    middle = images["hr"].shape[0] // 2
    lr_middle = middle * images["lr"].shape[0] // images["hr"].shape[0]  # the thick slice holding it
    panels = {"LR": images["lr"][lr_middle, 0]} | {
        name: images[key][middle, 0] for name, key in (("bicubic", "cubic"), (model_name, model_name), ("HR", "hr"))
    }
    title = f"slice {slab.k_index(middle)}, {_describe(degradation)}"
    comparison_figure(path, panels, title=title)


def _export(args: argparse.Namespace) -> int:
    """ONNX with dynamic batch and spatial axes, checked against torch by onnxruntime before it is written."""
    from medsr.export import export_onnx

    export_onnx(args.model, args.output, force=args.force)
    print(f"wrote {args.output} (run it with medsr.export.onnx_predictor, or any ONNX runtime)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Score the shipped model on held-out Colin27 slices, and upscale a simulated LR Colin27 end to end."""
    from medsr.data import crop_to_multiple
    from medsr.degrade import degrade
    from medsr.infer import super_resolve
    from medsr.io import read_volume, write_volume
    from medsr.samples import sample_path

    comparison, degradation, slab = _evaluate_scan(args.model, "colin27", None)
    _print_scores(comparison.rows, "colin27", degradation, slab)
    _write_evaluation(comparison, args.out, args.model, "colin27", degradation, slab)

    # The same LR scan the table scored, simulated and then super-resolved through the `medsr upscale` path.
    model, description = _load_model(args.model)
    hr = crop_to_multiple(read_volume(sample_path("colin27"), modality="MR"), scale=description["scale"])
    lr = degrade(hr, degradation)
    write_volume(lr, args.out / "colin27_lr.nii.gz")
    sr = super_resolve(lr, model, model_scale=description["model_kwargs"]["scale"], factors=description["scale"])
    write_volume(sr, args.out / "colin27_sr.nii.gz")
    print(f"\nLR   {lr!r}\nSR   {sr!r}\nHR   {hr!r}")
    print(f"wrote {args.out}/: report.html, scores.csv, per_slice.csv, figures, colin27_lr.nii.gz, colin27_sr.nii.gz")
    return 0


def _add_precision(command: argparse.ArgumentParser) -> None:
    """The inference precision option (see ``infer.model_predictor``)."""
    command.add_argument(
        "--precision", choices=("auto", "fp32", "bf16"), default="auto", help="bf16 where the CPU has it (auto)."
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medsr", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="Print a scan's shape, spacing, orientation and range.")
    info.add_argument("input", type=Path, help="NIfTI, DICOM series folder or file, PNG/TIFF.")
    info.set_defaults(run=_info)

    samples = commands.add_parser("samples", help="Install the real sample scans into the user cache and list them.")
    samples.add_argument("--list", action="store_true", help="Only list, install nothing.")
    samples.add_argument("--path", metavar="NAME", help="Print the file of one sample (installing it if needed).")
    samples.set_defaults(run=_samples)

    simulate = commands.add_parser("simulate", help="Simulate a low-resolution acquisition of a scan (MR/CT/US/X-ray).")
    simulate.add_argument("input", type=Path)
    simulate.add_argument("output", type=Path, help="NIfTI or PNG/TIFF to write.")
    simulate.add_argument("--modality", help="Scanner model (MR, CT, US, CR, DX); needed for NIfTI/PNG.")
    simulate.add_argument("--factors", type=_triple, default=(1.0, 1.0, 1.0), help="Resolution loss per axis i,j,k.")
    simulate.add_argument("--spacing", type=_triple, help="Target spacing in mm per axis i,j,k (instead of --factors).")
    simulate.add_argument("--slice-thickness", type=float, help="MR/CT slice thickness (profile FWHM) in mm.")
    simulate.add_argument("--slice-profile", choices=("rect", "gaussian"), default="rect")
    simulate.add_argument("--kspace-window", choices=("rect", "hann", "tukey"), default="rect", help="MR in-plane.")
    simulate.add_argument("--psf-fwhm", type=_triple, default=(0.0, 0.0, 0.0), help="Gaussian PSF FWHM in mm, i,j,k.")
    simulate.add_argument("--noise", choices=("none", "rician", "gaussian", "poisson", "speckle"), default="none")
    simulate.add_argument("--noise-sigma", type=float, default=0.0, help="Rician/Gaussian sigma in image units (HU).")
    simulate.add_argument("--photons", type=float, default=0.0, help="X-ray quanta per pixel at full intensity.")
    simulate.add_argument("--seed", type=int, default=0, help="Seed of the noise.")
    simulate.add_argument("--figure", type=Path, help="Also write a PNG: HR | LR | difference.")
    simulate.add_argument("-f", "--force", action="store_true", help="Replace OUTPUT if it exists.")
    simulate.set_defaults(run=_simulate)

    train = commands.add_parser("train", help="Train a model from a YAML config.")
    train.add_argument("config", type=Path, nargs="?", help="YAML config, e.g. configs/edsr_mr_x2.yaml.")
    train.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE", help="Override config values.")
    train.add_argument("--out", type=Path, help="Run folder (default runs/<config name>).")
    train.add_argument("--resume", type=Path, metavar="RUN_DIR", help="Continue an interrupted run from its last/.")
    train.set_defaults(run=_train)

    upscale = commands.add_parser("upscale", help="Super-resolve a scan; the output keeps its field of view.")
    upscale.add_argument("input", type=Path, help="NIfTI, PNG/TIFF, DICOM series folder, or a folder of scans.")
    upscale.add_argument(
        "output",
        type=Path,
        help="NIfTI, PNG/TIFF, or a new DICOM series folder (a name without suffix); a folder in batch mode.",
    )
    upscale.add_argument(
        "--model", help="Shipped model name or checkpoint folder (default: the shipped one for the modality and scale)."
    )
    upscale.add_argument(
        "--scale", type=_triple, help="Output voxels per input voxel along i,j,k, e.g. 2,2,1 (default: the model's)."
    )
    upscale.add_argument("--spacing", type=_triple, help="Target spacing in mm along i,j,k (instead of --scale).")
    upscale.add_argument("--modality", help="Override the modality (NIfTI/PNG carry none).")
    upscale.add_argument("--tile", type=int, help="Tile edge in input voxels (bounds memory; 128 in 2D, 48 in 3D).")
    upscale.add_argument("--overlap", type=int, default=8, help="Tile overlap in input voxels.")
    _add_precision(upscale)
    upscale.add_argument(
        "--kspace-consistency",
        action="store_true",
        help="MRI: replace the output's k-space band that the input measured by the input's (exact data consistency).",
    )
    upscale.add_argument("--anonymize", action="store_true", help="DICOM output: remove patient identifiers.")
    upscale.add_argument("-f", "--force", action="store_true", help="Replace OUTPUT if it exists.")
    upscale.set_defaults(run=_upscale)

    selfsr = commands.add_parser(
        "selfsr",
        help="Super-resolve the thick-slice axis of one scan, learning from its own in-plane data (no training data).",
    )
    selfsr.add_argument("input", type=Path, help="NIfTI or DICOM series folder with thick slices.")
    selfsr.add_argument("output", type=Path, help="NIfTI, or a new DICOM series folder (a name without suffix).")
    selfsr.add_argument(
        "--slice-thickness",
        type=float,
        help="Slice profile FWHM in mm (default: DICOM SliceThickness, else the spacing).",
    )
    selfsr.add_argument("--slice-profile", choices=("gaussian", "rect"), default="gaussian")
    selfsr.add_argument("--target-spacing", type=float, help="Output slice spacing in mm (default: the in-plane one).")
    selfsr.add_argument("--time-budget", type=float, help="Training time in seconds at most (default 300).")
    selfsr.add_argument("--steps", type=int, help="Training steps at most (default 4000).")
    selfsr.add_argument("--modality", help="Override the modality (NIfTI carries none; sets the intensity window).")
    _add_precision(selfsr)
    selfsr.add_argument("--save-model", type=Path, metavar="DIR", help="Save the trained network (safetensors + JSON).")
    selfsr.add_argument("--model", type=Path, metavar="DIR", help="Apply a network saved by --save-model; no training.")
    selfsr.add_argument("--anonymize", action="store_true", help="DICOM output: remove patient identifiers.")
    selfsr.add_argument("-f", "--force", action="store_true", help="Replace OUTPUT if it exists.")
    selfsr.set_defaults(run=_selfsr)

    evaluate = commands.add_parser("evaluate", help="Compare a model with interpolation on held-out slices.")
    evaluate.add_argument("--model", default=DEFAULT_MODEL, help="Shipped model name or checkpoint folder.")
    evaluate.add_argument("--scan", default="colin27", help="Sample name or path of an HR scan.")
    evaluate.add_argument(
        "--slices", type=_slab, help="Held-out slab START:STOP along the model's split axis (default: its test slab)."
    )
    evaluate.add_argument("--out", type=Path, help="Folder for report.html, scores (CSV/JSON) and figures.")
    _add_precision(evaluate)
    evaluate.set_defaults(run=_evaluate)

    models = commands.add_parser("models", help="List the shipped models, print their cards, or score them again.")
    models.add_argument("names", nargs="*", help="Models to show (their MODEL_CARD.md) or score; default: all.")
    models.add_argument(
        "--evaluate",
        action="store_true",
        help="Score each on its held-out data next to bicubic, rewrite its card and scores; exit 1 if one loses.",
    )
    models.add_argument("--table", type=Path, help="Also write the summary table to this file (Markdown).")
    _add_precision(models)
    models.set_defaults(run=_models)

    interpolate = commands.add_parser(
        "interpolate", help="Blend a PSNR-oriented model and its GAN fine-tuning (ESRGAN network interpolation)."
    )
    interpolate.add_argument("psnr", type=Path, help="The PSNR-oriented checkpoint (a GAN run's psnr/).")
    interpolate.add_argument("gan", type=Path, help="The adversarially fine-tuned checkpoint (the run's best/).")
    interpolate.add_argument("output", type=Path, help="Checkpoint folder to write.")
    interpolate.add_argument("--alpha", type=float, default=0.5, help="Weight of the PSNR model, 0..1 (0.5).")
    interpolate.add_argument("-f", "--force", action="store_true", help="Replace OUTPUT if it exists.")
    interpolate.set_defaults(run=_interpolate)

    export = commands.add_parser(
        "export", help="Export a model to ONNX (needs the onnx extra: pip install medsr[onnx])."
    )
    export.add_argument("output", type=Path, help="The .onnx file to write.")
    export.add_argument("--model", default=DEFAULT_MODEL, help="Shipped model name or checkpoint folder.")
    export.add_argument("-f", "--force", action="store_true", help="Replace OUTPUT if it exists.")
    export.set_defaults(run=_export)

    demo = commands.add_parser("demo", help="Evaluate and run the shipped MRI x2 model on Colin27.")
    demo.add_argument("--model", default=DEFAULT_MODEL, help="Shipped model name or checkpoint folder.")
    demo.add_argument("--out", type=Path, default=Path("demo_output"), help="Output folder (default demo_output).")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError, RuntimeError) as error:
        print(f"medsr {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
