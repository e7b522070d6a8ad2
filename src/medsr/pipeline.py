"""The upscale pipeline (``medsr.upscale``, ``medsr.upscale_file``): a scan in, a sharper scan out, same FOV.

One path for the Python API and ``medsr upscale``: choose the model (``zoo.choose_model`` when none is given),
compute the intensity window once (from the percentiles the input checks need anyway), check the scan against
what the model was trained on (:class:`MedsrWarning` s), then either stream slab by slab (NIfTI/DICOM series in
and out at the model's own integer scale: memory independent of the scan's size) or run in memory (PNG/TIFF,
ultrasound frames, non-integer factors), resample to the asked factors, and write: CT no lower than air where the
input had nothing lower, NIfTI in the input's integer type, and a JSON sidecar saying what made the file.

The decision to stream is made up front from the formats and the factors; the source is opened once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import shutil
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from medsr.checkpoint import WEIGHTS
from medsr.degrade import MAX_FACTOR
from medsr.infer import (
    DEFAULT_MEMORY,
    model_plan,
    model_predictor,
    network_device,
    on_device,
    resolve_device,
    resolve_precision,
    super_resolve,
)
from medsr.inputs import guess_modality, input_warnings
from medsr.intensity import LOWER_PERCENTILE, UPPER_PERCENTILE, Window, percentiles, window_from_range
from medsr.io import (
    VolumeFile,
    check_nifti_dtype,
    check_output,
    file_format,
    open_scan,
    sidecar_output,
    sidecar_path,
    write_volume,
)
from medsr.uncertainty import MAPS, TrustMaps, map_path, physical_maps
from medsr.volume import Volume
from medsr.zoo import SRModel, choose_model, is_through_plane, load_model, model_family

LOG = logging.getLogger("medsr")
MAX_OUTPUT_VOXELS = 2**31  # 8 GiB of float32: refuse before allocating


class MedsrWarning(UserWarning):
    """The scan lies outside what the model was trained on (modality, spacing, intensities): results may be poor."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the pipeline will do with one scan.

    Args:
        model: The model that runs.
        factors: Output voxels per input voxel along (i, j, k), as asked (possibly non-integer).
        scale: The integer scale the model applies along (i, j, k) (``infer.model_plan``); the rest is resampling.
        modality: The scan's modality (the model's when the file names none): it picks the window rule.
        window: The intensity window, computed once from the scan.
        floor: The lowest output value, in physical units: CT's window floor, air (-1024 HU), where the scan has
            nothing lower (super-resolution overshoot at the edge of the reconstruction circle would go below it);
            None for other modalities and for CT stored with padding below air.
    """

    model: SRModel
    factors: tuple[float, float, float]
    scale: tuple[int, int, int]
    modality: str
    window: Window
    floor: float | None = None

    @property
    def resamples(self) -> bool:
        """Whether the output is resampled from the model's scale to other factors."""
        return not np.allclose(self.factors, self.scale)


def check_factors(factors: Sequence[float], *, what: str = "scale") -> tuple[float, float, float]:
    """Three finite factors in (0, MAX_FACTOR], or a ValueError naming the option.

    >>> check_factors((2, 2, 1))
    (2.0, 2.0, 1.0)
    >>> check_factors((0, 0, 1))
    Traceback (most recent call last):
    ValueError: scale (0, 0, 1): each factor must be a finite number in (0, 16]
    """
    values = tuple(float(f) for f in factors)
    if len(values) != 3 or not all(math.isfinite(f) and 0 < f <= MAX_FACTOR for f in values):
        raise ValueError(f"{what} {tuple(factors)}: each factor must be a finite number in (0, {MAX_FACTOR:g}]")
    return values


def plan_upscale(
    scan: Volume | VolumeFile,
    model: SRModel | str | Path | None = None,
    *,
    scale: Sequence[float] | None = None,
    spacing: Sequence[float] | None = None,
    label: str = "scan",
    image_file: bool = False,
) -> Plan:
    """Choose the model and the factors for a scan, compute its window, and warn where it lies outside the model's
    training inputs (``warnings.warn`` of a :class:`MedsrWarning`; the model choice is logged on ``medsr``).

    Args:
        scan: The scan, in memory or opened lazily (one pass reads its percentiles: the window and the checks).
        model: A loaded model, a shipped name or a checkpoint folder; None: the shipped one for the modality and
            factors. A scan that names no modality gets one from its intensities (``inputs.guess_modality``: CT
            in HU, else MR with a warning) or, where they say neither, a ValueError asking for one.
        scale, spacing: Output voxels per input voxel (i, j, k), or a target spacing in mm; at most one. Default:
            the model's scale.
        label: How messages name the scan (its path).
        image_file: The scan is a PNG/TIFF (1 mm by convention): its spacing is not checked.
    """
    if scale is not None and spacing is not None:
        raise ValueError("give scale or spacing, not both")
    slices = scan.slices if isinstance(scan, VolumeFile) else lambda: [scan.array.detach().cpu().numpy()]
    minimum, low, high = percentiles(slices, (0, LOWER_PERCENTILE, UPPER_PERCENTILE))
    intensities = (low, high)  # intensity.intensity_range: the window and the input checks; the minimum: the floor
    if not intensities[1] > intensities[0]:
        raise ValueError(f"{label}: constant intensities ({intensities[0]:g}): nothing to super-resolve")
    factors = None
    if scale is not None:
        factors = check_factors(scale)
    elif spacing is not None:
        target = check_factors(spacing, what="spacing")
        factors = check_factors([a / b for a, b in zip(scan.spacing, target, strict=True)], what="spacing factors")
    modality = scan.modality.value
    if model is None:
        if modality == "OT":
            modality = _guess_modality(intensities, label)
        name = choose_model(modality, factors)
        LOG.info("%s: model %s", label, name)
        model = name
    if not isinstance(model, SRModel):
        model = load_model(model)
    if modality == "OT":  # NIfTI/PNG carry no modality: take the model's (it sets the window rule)
        modality = model.modality
    elif model_family(modality) != model_family(model.modality):
        _warn(f"{label} is {modality}, but {model.name} was trained on {model.modality}; expect poor results")
    if is_through_plane(model.scale) and factors is not None and factors[2] <= 1 + 1e-6:
        raise ValueError(f"{model.name} makes thin slices {model.scale} (i, j, k): ask for a factor along k")
    plan_scale = model_plan(factors or model.scale, model.model_scale)
    factors = factors or tuple(float(s) for s in plan_scale)
    shape = [max(1, round(n * f)) for n, f in zip(scan.spatial_shape, factors, strict=True)]
    if math.prod(shape) > MAX_OUTPUT_VOXELS:
        raise ValueError(f"{label}: the output would have {shape} voxels, more than {MAX_OUTPUT_VOXELS:.3g}")
    window = window_from_range(modality, intensities)
    if "inputs" in model.description:  # checkpoints from before medsr recorded what they were trained on have none
        for problem in input_warnings(
            model.description["inputs"],
            modality=model.modality,
            spacing=None if image_file else scan.spacing,
            scale=plan_scale,
            intensities=intensities,
        ):
            _warn(f"{label}: {problem}; results may be poor")
    # Not the scan's minimum: partial volume raises a low-resolution scan's minimum above the true one.
    floor = window.floor if window.floor is not None and minimum >= window.floor else None
    return Plan(model, factors, plan_scale, modality, window, floor)


def upscale(
    volume: Volume,
    model: SRModel | str | Path | None = None,
    *,
    scale: Sequence[float] | None = None,
    spacing: Sequence[float] | None = None,
    tile: int | None = None,
    overlap: int | None = None,
    memory: float = DEFAULT_MEMORY,
    precision: str = "auto",
    device: str = "auto",
    kspace_consistency: bool | None = None,
    adapt: float = 0.0,
    progress: bool = False,
) -> Volume:
    """Super-resolve a volume in physical units; the output covers the same field of view (rescaled affine).

    CT output is no lower than air (-1024 HU) where the scan has nothing lower (:attr:`Plan.floor`).

    Args:
        volume: The scan, e.g. from :func:`medsr.read_volume`.
        model: A loaded model (:func:`medsr.load_model`), a shipped name or a checkpoint folder; None: the shipped
            model for the volume's modality and the factors (see :func:`plan_upscale`).
        scale, spacing: Output voxels per input voxel along (i, j, k), or a target spacing in mm (non-integer
            factors: the model, then linear resampling); default: the model's scale.
        tile, overlap, memory: Tiles of the input in voxels, and the bytes one forward may use (default 2 GiB): by
            default whole planes (2D models) or the whole volume (3D) when they fit, else the largest tiles that
            fit, overlapping by twice the model's receptive radius (``infer.volume_tiling``).
        precision: 'auto', 'fp32' or 'bf16' (``infer.model_predictor``).
        device: Where the model runs: 'auto' (the GPU when there is one), 'cpu', 'cuda', 'cuda:N' or 'mps'
            (``infer.resolve_device``; a device this machine lacks is a ValueError before any work).
        kspace_consistency: MRI: replace the output's k-space band that the input measured by the input's
            (``consistency.kspace_consistency``; needs the model's own scale). None (default): on for models of MR
            k-space truncation at their own scale, where it gains 0.1-0.2 dB on unseen subjects (docs/models.md).
        adapt: Seconds of per-scan fine-tuning on the scan itself before it is upscaled (``adapt.adapt``); 0: off.
        progress: Show progress bars.

    >>> import medsr, torch
    >>> scan = medsr.Volume(torch.rand(1, 24, 20, 3), np.diag([1.0, 1.0, 3.0, 1.0]), medsr.Modality.MR)
    >>> medsr.upscale(scan, scale=(2, 2, 1)).spatial_shape
    (48, 40, 3)
    """
    plan, kspace = _plan_in_memory(
        volume, model, scale, spacing, device, kspace_consistency, adapt, precision, progress
    )
    return _run_in_memory(volume, plan, tile, overlap, memory, precision, kspace, progress)


def trust_maps(
    volume: Volume,
    model: SRModel | str | Path | None = None,
    *,
    scale: Sequence[float] | None = None,
    spacing: Sequence[float] | None = None,
    tile: int | None = None,
    overlap: int | None = None,
    memory: float = DEFAULT_MEMORY,
    precision: str = "auto",
    device: str = "auto",
    kspace_consistency: bool | None = None,
    adapt: float = 0.0,
    progress: bool = False,
) -> TrustMaps:
    """:func:`upscale` with the maps that say where its output can be trusted (``medsr.uncertainty``), each a
    Volume on the output's grid in physical units: ``output`` (as :func:`upscale` gives it), ``spread`` and
    ``sigma`` (standard deviations), ``consistent`` and ``residual`` (what the output adds beyond the best classical
    upsampling, split into what the input cannot contradict and what contradicts it), and ``lower``/``upper``, the
    calibrated interval (None for a model without calibration: ``medsr models NAME --calibrate``).

    The arguments are those of :func:`upscale`.

    >>> import medsr, torch
    >>> scan = medsr.Volume(torch.rand(1, 24, 20, 3), np.diag([1.0, 1.0, 3.0, 1.0]), medsr.Modality.MR)
    >>> maps = medsr.trust_maps(scan, precision="fp32")
    >>> maps.sigma.spatial_shape, torch.equal(maps.output.array, medsr.upscale(scan, precision="fp32").array)
    ((48, 40, 3), True)
    """
    plan, kspace = _plan_in_memory(
        volume, model, scale, spacing, device, kspace_consistency, adapt, precision, progress
    )
    return _maps_in_memory(volume, plan, tile, overlap, memory, precision, kspace, progress)


def upscale_file(
    source: Path | str,
    target: Path | str,
    model: SRModel | str | Path | None = None,
    *,
    scale: Sequence[float] | None = None,
    spacing: Sequence[float] | None = None,
    modality: str | None = None,
    tile: int | None = None,
    overlap: int | None = None,
    memory: float = DEFAULT_MEMORY,
    precision: str = "auto",
    device: str = "auto",
    kspace_consistency: bool | None = None,
    anonymize: bool = False,
    force: bool = False,
    progress: bool = False,
    dtype: str = "input",
    adapt: float = 0.0,
    new_study: bool = False,
    enhanced: bool = False,
    uncertainty: bool = False,
    command_line: str | None = None,
) -> Plan:
    """Super-resolve the scan at ``source`` into ``target`` (same format family), atomically; returns the plan.

    NIfTI/DICOM series in and out at the model's own integer scale stream slab by slab along k (memory independent
    of the scan's size, k-space consistency slice by slice); PNG/TIFF, ultrasound frames and non-integer factors
    run in memory. Both give the same voxels, CT no lower than air where the scan has nothing lower (see
    :func:`upscale`).

    A NIfTI target gets descrip (e.g. "medsr SR x2x2x1 edsr_mr_x2") and cal_min/cal_max (the intensity window). A
    file target (NIfTI, PNG/TIFF) gets a JSON sidecar (BIDS-style, ``sr.nii.gz`` -> ``sr.json``), written with it:
    an interrupted or failed write leaves neither. A DICOM series records its derivation in its headers. The
    source is never overwritten; an existing target or sidecar needs ``force``.

    Args:
        source: A NIfTI file, DICOM series folder or file, or PNG/TIFF.
        target: A NIfTI file, PNG/TIFF, or a new DICOM series folder (a name without suffix).
        modality: Overrides the source's (NIfTI and PNG/TIFF name none).
        anonymize: DICOM target: de-identify the header.
        new_study: DICOM target: put the series in a new study (else the source's, beside the source series).
        enhanced: DICOM target: one Legacy Converted Enhanced CT/MR file (highdicom) instead of one file per slice.
        uncertainty: Also write the trust maps (:func:`trust_maps`) beside the target, float32 in the target's
            format and geometry (``uncertainty.map_path``: ``sr_uncertainty.nii.gz``, ``sr_lower``, ``sr_upper``,
            ``sr_consistent``, ``sr_residual``; PNG: float TIFF; DICOM: each its own derived series); the bounds
            only for a model with a calibrated interval. Runs in memory; about 10x a plain upscale's time.
        dtype: NIfTI target: 'input' (the source NIfTI's integer type and scl_slope/scl_inter, values beyond the
            type's range clipped; float32 for float sources and DICOM series) or 'float32'.
        command_line: The command that asked for this, for the sidecar (``medsr upscale`` passes its own).
        model, scale, spacing, tile, overlap, memory, precision, device, kspace_consistency, adapt, progress: As for
            :func:`upscale` (with ``adapt`` the scan is read into memory once for the fine-tuning).

    The sidecar: Description (as descrip), MedsrVersion, CommandLine (when given), Sources (the source's absolute
    path), Modality, Model (name or checkpoint folder; ``+adapted`` when fine-tuned on the scan), ModelWeightsSHA256
    (of its ``model.safetensors``), Factors (i, j, k), Precision (as run: fp32 or bf16), KSpaceConsistency (whether
    it ran), Device (where the model ran), IntensityFloor (Plan.floor).

    >>> import medsr, tempfile, torch
    >>> folder = Path(tempfile.mkdtemp())
    >>> scan = medsr.Volume(torch.rand(1, 24, 20, 3), np.diag([1.0, 1.0, 3.0, 1.0]), medsr.Modality.MR)
    >>> medsr.write_volume(scan, folder / "lr.nii.gz")
    >>> plan = medsr.upscale_file(folder / "lr.nii.gz", folder / "sr.nii.gz")
    >>> plan.model.name, medsr.read_volume(folder / "sr.nii.gz").spatial_shape
    ('edsr_mr_x2', (48, 40, 3))
    >>> sorted(path.name for path in folder.iterdir())
    ['lr.nii.gz', 'sr.json', 'sr.nii.gz']
    """
    return _upscale_file(
        Path(source),
        Path(target),
        model,
        {},
        scale=scale,
        spacing=spacing,
        modality=modality,
        tile=tile,
        overlap=overlap,
        memory=memory,
        precision=precision,
        device=device,
        kspace_consistency=kspace_consistency,
        anonymize=anonymize,
        force=force,
        progress=progress,
        dtype=dtype,
        adapt=adapt,
        new_study=new_study,
        enhanced=enhanced,
        uncertainty=uncertainty,
        command_line=command_line,
    )


def upscale_folder(
    source: Path | str, target: Path | str, model: SRModel | str | Path | None = None, **options
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """:func:`upscale_file` for every scan under ``source`` (``data.find_scans``: files and DICOM series), into the
    same relative paths under ``target``. A scan that fails is reported and skipped; each model is loaded once.

    Under ``torchrun`` each process upscales its share of the sorted scans (``shard.share``; 'auto' and 'cuda'
    devices: the process's own GPU, ``shard.rank_device``), and every process returns the results of all.

    Returns (written targets, [(failed source, error message)]).
    """
    import datetime

    from medsr.data import find_scans
    from medsr.progress import progress_bar
    from medsr.shard import gather, process_group, rank_device, share

    source, target = Path(source), Path(target)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target}: upscaling a folder writes into a folder, and this is a file")
    options["device"] = str(rank_device(options.get("device", "auto")))
    models: dict[str, SRModel] = {}
    written, failed = [], []
    with process_group(timeout=datetime.timedelta(days=1)) as place:  # a rank may wait long for the slowest one
        options["progress"] = options.get("progress", False) and place.rank == 0
        scans = share(find_scans(source), place)
        for scan in progress_bar(scans, desc="scans", unit="scan", disable=not options["progress"]):
            output = target / scan.relative_to(source)
            try:
                output.parent.mkdir(parents=True, exist_ok=True)
                _upscale_file(scan, output, model, models, **options)
            except (ValueError, OSError) as error:
                failed.append((scan, str(error)))
                LOG.warning("skipped %s: %s", scan, error)
            else:
                written.append(output)
        results = gather((written, failed))
    return sorted(path for done, _ in results for path in done), sorted(bad for _, lost in results for bad in lost)


def _upscale_file(
    source: Path,
    target: Path,
    model: SRModel | str | Path | None,
    models: dict[str, SRModel],
    *,
    scale: Sequence[float] | None = None,
    spacing: Sequence[float] | None = None,
    modality: str | None = None,
    tile: int | None = None,
    overlap: int | None = None,
    memory: float = DEFAULT_MEMORY,
    precision: str = "auto",
    device: str = "auto",
    kspace_consistency: bool | None = None,
    anonymize: bool = False,
    force: bool = False,
    progress: bool = False,
    dtype: str = "input",
    adapt: float = 0.0,
    new_study: bool = False,
    enhanced: bool = False,
    uncertainty: bool = False,
    command_line: str | None = None,
) -> Plan:
    """:func:`upscale_file`, with ``models``: loaded models by name, shared over a folder's scans."""
    from medsr.streaming import stream_upscale

    check_nifti_dtype(dtype)
    where = resolve_device(device)
    check_output(target, [source], force=force)
    target_format = file_format(target)
    if enhanced and target_format != "dicom":
        raise ValueError(f"{target}: --enhanced is for DICOM output (a folder name without suffix)")
    if target_format != "dicom":
        check_output(sidecar_path(target), [source], force=force)
    for name in MAPS if uncertainty else ():
        check_output(map_path(target, name), [source], force=force)
    scan = open_scan(source, modality=modality)
    if isinstance(model, str | Path) and str(model) in models:
        model = models[str(model)]
    plan = plan_upscale(
        scan, model, scale=scale, spacing=spacing, label=str(source), image_file=file_format(source) == "image"
    )
    models[plan.model.name] = plan.model
    kspace = _kspace(plan, kspace_consistency)
    streaming = target_format in ("nifti", "dicom") and not plan.resamples and not uncertainty  # maps: in memory
    streams = isinstance(scan, VolumeFile) and streaming
    volume = scan.read() if isinstance(scan, VolumeFile) and (adapt or not streams) else scan  # read once, if at all
    if adapt:  # the adapted copy serves this scan only
        plan = _adapted(plan, volume, adapt, precision, progress)
    plan = _on_device(plan, where)
    factors = "x".join(f"{f:g}" for f in plan.factors)
    description = f"medsr SR x{factors} {Path(plan.model.name).name}"[:64]
    storage = {"description": description, "dtype": dtype, "display_range": (plan.window.lo, plan.window.hi)}
    if target_format == "dicom":  # the series records its derivation (model and weights) in its headers
        storage |= {
            "model": f"{Path(plan.model.name).name} sha256:{weights_digest(plan.model)}",
            "new_study": new_study,
            "enhanced": enhanced,
        }
    trusted = None
    if uncertainty:
        trusted = _maps_in_memory(volume, plan, tile, overlap, memory, precision, kspace, progress)
    if target_format == "dicom":
        sidecar = nullcontext()
    else:
        record = _provenance(plan, source, description, precision, kspace, command_line)
        sidecar = sidecar_output(target, record | ({} if trusted is None else _maps_record(trusted, target, plan)))
    with sidecar:
        if trusted is not None:
            _write_maps(trusted, target, anonymize=anonymize, **storage)  # in memory: the maps need the whole scan
            return plan
        if streams:
            stream_upscale(
                scan,
                target,
                model_predictor(plan.model.network, precision=precision),
                scale=plan.scale,
                spatial_dims=plan.model.spatial_dims,
                tile=tile,
                overlap=overlap,
                memory=memory,
                anonymize=anonymize,
                window=plan.window,
                modality=plan.modality,
                consistency=plan.model.degradation if kspace else None,
                floor=plan.floor,
                progress=progress,
                **storage,
            )
        else:
            sr = _run_in_memory(volume, plan, tile, overlap, memory, precision, kspace, progress)
            write_volume(sr, target, anonymize=anonymize, **storage)
    return plan


def _plan_in_memory(
    volume: Volume,
    model: SRModel | str | Path | None,
    scale: Sequence[float] | None,
    spacing: Sequence[float] | None,
    device: str,
    kspace_consistency: bool | None,
    adapt: float,
    precision: str,
    progress: bool,
) -> tuple[Plan, bool]:
    """(plan, k-space consistency on) of :func:`upscale` and :func:`trust_maps`: the device and the k-space request
    checked before any work, the model fine-tuned on the scan first with ``adapt``, then moved to the device."""
    where = resolve_device(device)
    plan = plan_upscale(volume, model, scale=scale, spacing=spacing)
    kspace = _kspace(plan, kspace_consistency)
    return _on_device(_adapted(plan, volume, adapt, precision, progress) if adapt else plan, where), kspace


def _run_in_memory(
    volume: Volume,
    plan: Plan,
    tile: int | None,
    overlap: int | None,
    memory: float,
    precision: str,
    kspace: bool,
    progress: bool,
) -> Volume:
    volume = volume.replace(modality=plan.modality)
    sr = super_resolve(
        volume,
        plan.model.network,
        model_scale=plan.model.model_scale,
        factors=plan.factors,
        tile=tile,
        overlap=overlap,
        memory=memory,
        precision=precision,
        progress=progress,
        window=plan.window,
        consistency=plan.model.degradation if kspace else None,  # the scan is the measured k-space band
    )
    if not torch.isfinite(sr.array).all():
        raise ValueError(f"{plan.model.name} gives NaN or infinite values (broken weights?); nothing written")
    return sr if plan.floor is None else sr.replace(array=sr.array.clamp(min=plan.floor))


def _maps_in_memory(
    volume: Volume,
    plan: Plan,
    tile: int | None,
    overlap: int | None,
    memory: float,
    precision: str,
    kspace: bool,
    progress: bool,
) -> TrustMaps:
    """:func:`trust_maps` of a planned scan: ``uncertainty.physical_maps``, the output as :func:`_run_in_memory`."""
    maps = physical_maps(
        volume.replace(modality=plan.modality),
        plan.model,
        factors=plan.factors,
        window=plan.window,
        precision=precision,
        consistency=kspace,
        floor=plan.floor,
        tile=tile,
        overlap=overlap,
        memory=memory,
        progress=progress,
    )
    if not all(torch.isfinite(v.array).all() for v in maps[:-1] if v is not None):
        raise ValueError(f"{plan.model.name} gives NaN or infinite values (broken weights?); nothing written")
    return maps


def _map_fields(maps: TrustMaps) -> dict[str, Volume]:
    """The maps ``--uncertainty`` writes, by the name in their files (``uncertainty.MAPS``): sigma as uncertainty."""
    fields = {name: getattr(maps, "sigma" if name == "uncertainty" else name) for name in MAPS}
    return {name: field for name, field in fields.items() if field is not None}


def _maps_record(maps: TrustMaps, target: Path, plan: Plan) -> dict:
    """What an output's sidecar says of its maps: their files, sigma's fit and the interval's calibration."""
    record = plan.model.description.get("uncertainty")
    a, b = maps.fit
    return {
        "UncertaintyMaps": {name: map_path(target, name).name for name in _map_fields(maps)},
        "UncertaintyFit": {"a": a, "b": b * (plan.window.hi - plan.window.lo)},  # sigma^2 = a^2 spread^2 + b^2
        "IntervalFactor": None if record is None else record["factor"],
        "IntervalCoverage": None if record is None else 1 - record["alpha"],
    }


def _write_maps(maps: TrustMaps, target: Path, *, anonymize: bool, **storage) -> None:
    """Write the maps beside ``target`` (float32; DICOM: each its own derived series), then the output itself;
    an error removes the maps already written, so the set appears complete or not at all."""
    written: list[Path] = []
    try:
        for name, field in _map_fields(maps).items():
            path = map_path(target, name)
            description = f"medsr {name} {storage['description'][len('medsr ') :]}"[:64]
            float_map = field.replace(meta={**field.meta, "pixel_dtype": "float32"})
            write_volume(
                float_map, path, anonymize=anonymize, **(storage | {"description": description, "dtype": "float32"})
            )
            written.append(path)
        write_volume(maps.output, target, anonymize=anonymize, **storage)
    except BaseException:
        for path in written:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        raise


def _on_device(plan: Plan, device: torch.device) -> Plan:
    """The plan with its network on ``device`` (``infer.on_device``: the caller's model stays where it is)."""
    return dataclasses.replace(
        plan, model=dataclasses.replace(plan.model, network=on_device(plan.model.network, device))
    )


def _adapted(plan: Plan, volume: Volume, seconds: float, precision: str, progress: bool) -> Plan:
    """The plan with its model fine-tuned for ``seconds`` on the scan itself (``adapt.adapt``; the model as it was
    when the fine-tuned one does not predict a held-out part of the scan better)."""
    from medsr.adapt import adapt

    result = adapt(
        plan.model, volume.replace(modality=plan.modality), seconds=seconds, precision=precision, progress=progress
    )
    return dataclasses.replace(plan, model=result.model)


def weights_digest(model: SRModel) -> str:
    """SHA-256 (hex) of the model's weights file, as ``sha256sum`` prints it: which weights made an output."""
    with (model.path / WEIGHTS).open("rb") as weights:
        return hashlib.file_digest(weights, "sha256").hexdigest()


def _provenance(
    plan: Plan, source: Path, description: str, precision: str, kspace: bool, command_line: str | None
) -> dict:
    """The sidecar of an output file: what made it, from what, and how (see :func:`upscale_file`)."""
    digest = weights_digest(plan.model)
    device = network_device(plan.model.network)
    record = {"Description": description, "MedsrVersion": version("medsr")}
    if command_line is not None:
        record["CommandLine"] = command_line
    return record | {
        "Sources": [str(source.absolute())],
        "Modality": plan.modality,
        "Model": plan.model.name,
        "ModelWeightsSHA256": digest,
        "Factors": list(plan.factors),
        "Precision": resolve_precision(precision, device),
        "Device": str(device),
        "KSpaceConsistency": kspace,
        "IntensityFloor": plan.floor,
    }


def _kspace(plan: Plan, kspace_consistency: bool | None) -> bool:
    """Whether to put the input's measured k-space band back (checked before any work): None decides from the model
    (MR k-space truncation at the model's own scale); True needs both and says why not."""
    from medsr.consistency import kspace_applies

    applies = kspace_applies(plan.model.degradation)
    if kspace_consistency is None:
        return applies and not plan.resamples
    if kspace_consistency and plan.resamples:
        raise ValueError("k-space consistency needs the model's own scale (no scale/spacing resampling)")
    if kspace_consistency and not applies:
        raise ValueError(f"k-space consistency is for MR k-space truncation models; {plan.model.name} is not one")
    return kspace_consistency


def _guess_modality(intensities: tuple[float, float], label: str) -> str:
    """The modality of a scan that names none, printed (CT) or warned about (MR, weaker evidence); else an error."""
    modality, reason = guess_modality(intensities)
    advice = "pass --modality (modality= in Python) or a model"
    if modality is None:
        raise ValueError(f"{label} names no modality and its {reason}; {advice}")
    if modality == "CT":
        LOG.info("%s names no modality; CT from its intensities (%s)", label, reason)
    else:
        _warn(f"{label} names no modality; using MR: {reason} ({advice} if it is not MR)")
    return modality


def _warn(message: str) -> None:
    warnings.warn(message, MedsrWarning, stacklevel=3)
