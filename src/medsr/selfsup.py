"""Self-supervised through-plane super-resolution of one thick-slice scan, learnt from the scan itself.

The in-plane axes of a thick-slice scan are sharp; its slice axis was blurred by the slice profile and sampled
once per slice spacing. Degrading in-plane lines the same way (profile of FWHM = slice thickness, one sample per
slice spacing, then cubic B-spline interpolation back to the fine grid) gives training pairs from the scan alone.
A 2D network learns to restore them, and is then run on every (i, k) and (j, k) plane of the scan interpolated
onto a fine slice grid; the two results are averaged. This is the scheme of SMORE (Zhao et al., IEEE TMI 2021)
and ECLARE (Remedios et al., 2025). The network restores an interpolated image (residual learning, as VDSR), so
any factor works, integer or not, and any slice gap (thickness below the spacing): only the training pairs know
them.

Spacings are in mm; arrays are (C, I, J, K) with intensities normalised to [0, 1] by the scan's default window.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.ndimage import map_coordinates
from torch import nn

from medsr.data import FOREGROUND_LEVEL, Pair
from medsr.degrade.sampling import PROFILES, apply_along_axis, profile_weights
from medsr.infer import (
    DEFAULT_MEMORY,
    model_predictor,
    network_device,
    on_device,
    predict_orthogonal_planes,
    resample,
    resolve_device,
    resolve_precision,
)
from medsr.intensity import default_window, denormalize, normalize
from medsr.losses import l1
from medsr.models import create_model
from medsr.progress import progress_bar
from medsr.train import train_step
from medsr.volume import Volume, permute_axes, scale_affine

if TYPE_CHECKING:
    from medsr.deidentify import Deidentifier

MIN_ANISOTROPY = 1.2  # slice spacing / finest in-plane spacing below which there is nothing to learn
MIN_SLICES = 4  # a cubic B-spline needs a few samples to interpolate between
PHASES = 8  # sampling offsets of the simulated slices per in-plane axis (for non-integer factors and variety)


LOG = logging.getLogger("medsr")
MAX_OVERLAP = 8  # slices at most this many spacings thick (overlapping reconstructions reach about 4)


@dataclasses.dataclass(frozen=True)
class SliceAcquisition:
    """How a scan's slice axis was acquired.

    Args:
        axis: Voxel axis across the slices (0, 1 or 2): the one with the largest spacing.
        spacing: Distance between slice centres in mm.
        thickness: FWHM of the slice profile in mm; below ``spacing`` leaves a gap, above makes slices overlap.
        profile: 'gaussian' (the usual model of an MR slice-selective excitation, as in SMORE) or 'rect'.
    """

    axis: int
    spacing: float
    thickness: float
    profile: str = "gaussian"

    def __post_init__(self) -> None:
        if self.axis not in (0, 1, 2) or self.profile not in PROFILES:
            raise ValueError(f"axis must be 0, 1 or 2 and profile one of {PROFILES}, got {self.axis}, {self.profile}")
        if not (math.isfinite(self.thickness) and self.thickness > 0 and self.spacing > 0):
            raise ValueError(f"slice spacing and thickness must be > 0 mm, got {self.spacing}, {self.thickness}")
        if self.thickness > MAX_OVERLAP * self.spacing:
            raise ValueError(
                f"slice thickness {self.thickness:g} mm is more than {MAX_OVERLAP}x the slice spacing "
                f"{self.spacing:.3g} mm; check the value (FWHM in mm)"
            )


def slice_acquisition(volume: Volume, *, thickness: float | None = None, profile: str = "gaussian") -> SliceAcquisition:
    """The slice axis (largest spacing) and its profile. Thickness: as given, else the DICOM SliceThickness (when
    the slice axis is the series' stacking axis k), else the slice spacing (contiguous slices). Refuses a scan
    that is not thick-sliced, or has fewer than ``MIN_SLICES`` slices."""
    spacing = volume.spacing
    axis = int(np.argmax(spacing))
    finest = min(s for a, s in enumerate(spacing) if a != axis)
    if spacing[axis] < MIN_ANISOTROPY * finest:
        raise ValueError(
            f"spacing {tuple(round(s, 3) for s in spacing)} mm is nearly isotropic (slice spacing below "
            f"{MIN_ANISOTROPY}x the in-plane spacing): there is no thick-slice axis to super-resolve"
        )
    if volume.spatial_shape[axis] < MIN_SLICES:
        raise ValueError(f"{volume.spatial_shape[axis]} slices along the slice axis; at least {MIN_SLICES} needed")
    if thickness is None:
        header = volume.meta.get("dicom") if axis == 2 else None
        thickness = float(header.get("SliceThickness") or 0) if header is not None else 0.0
        thickness = thickness or spacing[axis]
    return SliceAcquisition(axis=axis, spacing=spacing[axis], thickness=float(thickness), profile=profile)


def bspline_weights(coordinates: np.ndarray, m: int) -> torch.Tensor:
    """Cubic B-spline interpolation as a matrix: row ``y`` holds the weights of ``m`` samples at sample
    coordinate ``coordinates[y]`` (fractional index; mirror-symmetric beyond the ends). Shape (len, m), float64."""
    columns = [
        map_coordinates(np.eye(m)[c], np.asarray(coordinates, dtype=np.float64)[None], order=3, mode="mirror")
        for c in range(m)
    ]
    return torch.from_numpy(np.stack(columns, axis=1))


def interpolate_slices(volume: Volume, axis: int, n: int) -> Volume:
    """Cubic B-spline interpolation along one axis to ``n`` voxels over the same field of view (the baseline
    self-supervised SR improves on, and its starting point)."""
    m = volume.spatial_shape[axis]
    coordinates = (np.arange(n) + 0.5) * m / n - 0.5  # voxel-centre convention, as scale_affine
    array = apply_along_axis(bspline_weights(coordinates, m), volume.array, axis + 1).contiguous()  # (n, m) map
    scale = [1.0, 1.0, 1.0]
    scale[axis] = n / m
    return volume.replace(array=array, affine=scale_affine(volume.affine, scale))


def line_operator(n: int, factor: float, fwhm: float, *, profile: str, offset: float) -> torch.Tensor:
    """The slice axis as a matrix on a line of ``n`` fine voxels: profile-weighted samples every ``factor`` voxels
    from ``offset`` on, then cubic B-spline interpolation back to the ``n`` voxels. (n, n), float64.

    Args:
        factor: Slice spacing in fine voxels (any real > 1).
        fwhm: Slice thickness in fine voxels.
        offset: Position of the first simulated slice centre, in [0, factor).
    """
    m = math.floor((n - 1 - offset) / factor) + 1
    sample = profile_weights(n, offset + factor * torch.arange(m, dtype=torch.float64), profile=profile, fwhm=fwhm)
    interpolate = bspline_weights((np.arange(n) - offset) / factor, m)  # (n, m)
    return interpolate @ sample


class InPlanePairs:
    """Training pairs from the in-plane slices: HR patches (C, P, P) and the same patches degraded along their
    second axis as the slice axis was, then interpolated back (the network's input).

    Both in-plane axes are used: planes (i, j) degraded along j, and (j, i) degraded along i, each with its own
    factor (slice spacing / that axis's spacing) and ``PHASES`` slice offsets. Patches are centred on tissue.

    Args:
        array: The scan, normalised, with the slice axis last: (C, I, J, K).
        in_plane: Spacing of i and j in mm.
        acquisition: The slice axis to simulate.
        patch: Patch edge in voxels (capped at the plane's size).
        rng: Drives every draw.
    """

    def __init__(
        self,
        array: torch.Tensor,
        in_plane: Sequence[float],
        acquisition: SliceAcquisition,
        *,
        patch: int,
        rng: np.random.Generator,
    ) -> None:
        self.planes = [array.permute(3, 0, 1, 2), array.permute(3, 0, 2, 1)]  # (K, C, A, B): B is degraded
        self.operators = []
        for planes, step in zip(self.planes, reversed(in_plane), strict=True):
            factor, fwhm = acquisition.spacing / step, acquisition.thickness / step
            offsets = rng.uniform(0, factor, PHASES)
            n = planes.shape[-1]
            self.operators.append(
                [line_operator(n, factor, fwhm, profile=acquisition.profile, offset=o).float().T for o in offsets]
            )
        self.patch = min(patch, *array.shape[1:3])
        tissue = array.amax(dim=0) > FOREGROUND_LEVEL  # (I, J, K)
        self.tissue = (tissue if tissue.any() else torch.ones_like(tissue)).nonzero()  # (count, 3): i, j, k
        self.rng = rng

    def batch(self, size: int) -> Pair:
        """``size`` random pairs, stacked: lr, hr (N, C, P, P), with random flips."""
        lr, hr = [], []
        for _ in range(size):
            orientation = int(self.rng.integers(2))
            planes = self.planes[orientation]
            i, j, k = self.tissue[self.rng.integers(len(self.tissue))].tolist()
            a, b = (i, j) if orientation == 0 else (j, i)
            _, _, size_a, size_b = planes.shape
            a0 = min(max(a - self.patch // 2, 0), size_a - self.patch)
            b0 = min(max(b - self.patch // 2, 0), size_b - self.patch)
            rows = planes[k, :, a0 : a0 + self.patch]  # (C, P, B): whole lines, so the operator sees no edge
            degraded = rows @ self.operators[orientation][self.rng.integers(PHASES)]
            pair = torch.stack([degraded[..., b0 : b0 + self.patch], rows[..., b0 : b0 + self.patch]])
            flips = [d for d in (2, 3) if self.rng.integers(2)]
            pair = pair.flip(flips) if flips else pair
            lr.append(pair[0])
            hr.append(pair[1])
        return Pair(torch.stack(lr), torch.stack(hr))


@dataclasses.dataclass(frozen=True)
class SelfSRSettings:
    """Training and inference settings of :func:`fit_and_apply`.

    Args:
        model: Registered model name; it runs at scale (1, 1) on the interpolated planes.
        steps: Optimisation steps; the learning rate follows a cosine over them, so steps, not the machine's
            speed, decide the result. The default recipe (1500 steps of 16 patches of 32 x 32 for ``edsr_small``)
            super-resolves a 181 x 217 x 45 scan of 4 mm slices in under 4 minutes on 2 AVX2 cores, fp32.
        time_budget: Seconds of training at most (default: no limit). Reaching it stops training early, with a
            warning saying how many of the planned steps ran: the network is then less trained than the recipe.
        patch, batch_size, lr: Patch edge (voxels), patches per step, Adam learning rate.
        precision: 'auto' (bf16 where the CPU has it), 'fp32' or 'bf16', for training and inference.
        tile, memory: Inference tiles of the planes (voxels) and the bytes one forward may use; default tiles: from
            the memory (``infer.volume_tiling``).
        seed: Seeds the weights and every patch draw.
    """

    model: str = "edsr_small"
    steps: int = 1500
    time_budget: float | None = None
    patch: int = 32
    batch_size: int = 16
    lr: float = 1e-3
    precision: str = "auto"
    tile: int | None = None
    memory: float = DEFAULT_MEMORY
    seed: int = 0

    def __post_init__(self) -> None:
        sizes = (self.steps, self.batch_size, self.tile or 1, self.memory)
        if min(sizes) < 1 or self.patch < 8 or not (self.time_budget is None or self.time_budget > 0):
            raise ValueError(
                f"steps, batch_size and tile must be >= 1, memory >= 1 byte, patch >= 8 voxels and time_budget > 0 s; "
                f"got {self}"
            )
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")
        resolve_precision(self.precision)  # raises on an unknown precision


def train_model(
    array: torch.Tensor,
    in_plane: Sequence[float],
    acquisition: SliceAcquisition,
    settings: SelfSRSettings,
    *,
    progress: bool = True,
    device: str | torch.device = "auto",
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a restoration network on in-plane pairs of one normalised scan (slice axis last, (C, I, J, K)), on
    ``device`` (``infer.resolve_device``; the pairs are drawn on the CPU).

    Returns the model (eval mode, on ``device``) and a log: model name and kwargs (what ``create_model`` needs),
    steps run, steps planned, seconds, final mean L1 over the last 50 steps. Fewer steps than planned run only when
    ``settings.time_budget`` stops training; that is logged as a warning."""
    where = resolve_device(str(device))
    pairs = InPlanePairs(array, in_plane, acquisition, patch=settings.patch, rng=np.random.default_rng(settings.seed))
    kwargs = {"spatial_dims": 2, "scale": [1, 1], "in_channels": array.shape[0]}
    with torch.random.fork_rng():  # seeded weights without touching the caller's global RNG
        torch.manual_seed(settings.seed)
        model = create_model(settings.model, **kwargs).to(where)  # made on the CPU: the same weights everywhere
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    bf16 = resolve_precision(settings.precision, where) == "bf16"
    losses: list[float] = []
    start = time.monotonic()
    bar = progress_bar(total=settings.steps, desc="self-supervised training", unit="step", disable=not progress)
    for step in range(settings.steps):
        if settings.time_budget is not None and time.monotonic() - start >= settings.time_budget:
            break
        for group in optimizer.param_groups:  # cosine decay (Loshchilov & Hutter 2017) over steps, never time
            group["lr"] = settings.lr * 0.5 * (1 + math.cos(math.pi * step / settings.steps))
        batch = Pair._make(t.to(where) for t in pairs.batch(settings.batch_size))
        losses.append(train_step(model, optimizer, batch, l1, bf16=bf16)["loss"])
        bar.update()
        bar.set_postfix(l1=f"{np.mean(losses[-50:]):.4f}", refresh=False)
    bar.close()
    if len(losses) < settings.steps:  # only the time budget stops training early
        LOG.warning(
            "self-supervised training stopped by the %g s time budget after %d of %d steps: the network is less "
            "trained than the recipe and the result poorer (plan fewer steps to fit a time)",
            *(settings.time_budget, len(losses), settings.steps),
        )
    log = {"model_name": settings.model, "model_kwargs": kwargs, "steps": len(losses), "planned_steps": settings.steps}
    log |= {"seconds": round(time.monotonic() - start, 1), "l1": float(np.mean(losses[-50:]))}
    return model.eval(), log


def fit_and_apply(
    volume: Volume,
    acquisition: SliceAcquisition,
    *,
    target_spacing: float | None = None,
    settings: SelfSRSettings = SelfSRSettings(),
    model: nn.Module | None = None,
    progress: bool = True,
    device: str | torch.device = "auto",
) -> tuple[Volume, nn.Module, dict[str, Any]]:
    """Super-resolve a scan's slice axis by learning from its own in-plane data.

    Args:
        volume: The thick-slice scan in physical units, (C, I, J, K); any axis may be the slice axis.
        acquisition: See :func:`slice_acquisition`.
        target_spacing: Output slice spacing in mm, at most the acquired one; default the finest in-plane spacing
            (isotropic voxels for square pixels). The network works on a grid of that spacing (rounded to divide
            the field of view); another target is reached by linear resampling from it.
        settings: See :class:`SelfSRSettings`.
        model: A network trained before on a scan of the same protocol (:func:`train_model`): skips training.
        device: Where the network trains and runs: 'auto' (the GPU when there is one), 'cpu', 'cuda', 'cuda:N' or
            'mps' (``infer.resolve_device``; a device this machine lacks is a ValueError before any work).

    Returns:
        The SR volume over the same field of view in physical units, the trained network, and a log: training
        steps, seconds, final L1, the intensity window, the device.
    """
    where = resolve_device(str(device))
    if target_spacing is not None and not 0 < target_spacing <= acquisition.spacing:
        raise ValueError(
            f"target spacing must be > 0 mm and at most the slice spacing ({acquisition.spacing:.3g} mm), "
            f"got {target_spacing}"
        )
    order = [a for a in range(3) if a != acquisition.axis] + [acquisition.axis]  # the slice axis last
    moved = permute_axes(volume, order)
    in_plane = moved.spacing[:2]
    window = default_window(moved)
    unit = normalize(moved, window)
    log = {}
    if model is None:
        model, log = train_model(unit.array, in_plane, acquisition, settings, progress=progress, device=where)
    else:
        model = on_device(model, where)

    slices = moved.spatial_shape[2]
    fine = interpolate_slices(unit, 2, max(slices, round(slices * moved.spacing[2] / min(in_plane))))
    run = {"tile": settings.tile, "memory": settings.memory, "progress": progress}
    predictor = model_predictor(model, precision=settings.precision)
    sr = fine.replace(array=predict_orthogonal_planes(predictor, fine.array, 1, **run))
    if target_spacing is not None:
        sr = resample(sr, (*sr.spatial_shape[:2], max(1, round(slices * moved.spacing[2] / target_spacing))))
    log |= {"window": dataclasses.asdict(window), "device": str(network_device(model))}
    return permute_axes(denormalize(sr, window), np.argsort(order).tolist()), model, log


def selfsr_file(
    source: Path | str,
    target: Path | str,
    *,
    slice_thickness: float | None = None,
    slice_profile: str = "gaussian",
    target_spacing: float | None = None,
    settings: SelfSRSettings = SelfSRSettings(),
    modality: str | None = None,
    model: Path | str | None = None,
    save_model: Path | str | None = None,
    anonymize: bool | Deidentifier = False,
    force: bool = False,
    progress: bool = True,
    device: str = "auto",
) -> tuple[Volume, SliceAcquisition, dict[str, Any]]:
    """``medsr selfsr``: read a thick-slice scan, super-resolve its slice axis (:func:`fit_and_apply`), write it
    in the source's format (DICOM: a new derived series), and optionally save the trained network.

    Args:
        slice_thickness: Slice profile FWHM in mm; default: DICOM SliceThickness along k, else the slice spacing.
        model: A folder saved before with ``save_model``: applied without training (a warning when it learnt
            another slice acquisition: quality drops).
        save_model: A new folder for the trained network (safetensors + JSON).
        target_spacing, settings, modality, anonymize, force, progress, device: See :func:`fit_and_apply` and
            :func:`medsr.upscale_file`.

    Returns the SR volume, the slice acquisition and the training log.
    """
    from medsr.checkpoint import load_checkpoint, save_checkpoint
    from medsr.io import check_output, read_volume, write_volume

    source, target = Path(source), Path(target)
    where = resolve_device(device)  # before any work
    check_output(target, [source], force=force)
    if save_model and model:
        raise ValueError("model applies a saved network; save_model saves a newly trained one: pass one")
    if save_model:
        check_output(save_model, [source, target], force=force)
    volume = read_volume(source, modality=modality)
    try:
        acquisition = slice_acquisition(volume, thickness=slice_thickness, profile=slice_profile)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from error
    LOG.info(
        "%s: %r\nslice axis %s: %.3g mm apart, %.3g mm thick (%s profile)",
        *(source, volume, "ijk"[acquisition.axis], acquisition.spacing, acquisition.thickness, acquisition.profile),
    )
    network = None
    if model:
        network, description = load_checkpoint(model)
        if "selfsr" not in description:
            raise ValueError(f"{model}: not a network saved by medsr selfsr --save-model")
        if description["selfsr"]["acquisition"] != dataclasses.asdict(acquisition):
            warnings.warn(
                f"{model} learnt slices {description['selfsr']['acquisition']}, this scan has "
                f"{dataclasses.asdict(acquisition)}; expect poorer results",
                stacklevel=2,
            )
    options = {"target_spacing": target_spacing, "settings": settings, "progress": progress, "device": where}
    sr, network, log = fit_and_apply(volume, acquisition, model=network, **options)
    text = f"medsr selfsr {acquisition.spacing:.3g}mm to {sr.spacing[acquisition.axis]:.3g}mm"
    write_volume(sr, target, description=text, anonymize=anonymize)
    if save_model:
        selfsr = {"source": str(source), "acquisition": dataclasses.asdict(acquisition)}
        selfsr |= {key: log[key] for key in ("steps", "planned_steps", "seconds", "l1")}
        save_checkpoint(Path(save_model), network, {**log, "selfsr": selfsr})
    return sr, acquisition, log
