"""Where a super-resolved scan can be trusted: per-voxel maps on the output grid (``medsr upscale --uncertainty``).

* Hallucination: what the output adds to the best classical upsampling U(lr) of its input (U: zero-filled
  k-space for MR k-space models, Lanczos-3 image-domain, B-spline through-plane; ``evaluation.classical_upsample``),
  split in two with D the model's degradation without noise: ``residual = U(D(sr) - lr)``, what contradicts the
  measured input (zero for an output that re-degrades to its input, e.g. after MR k-space consistency), and
  ``consistent = sr - U(lr) - residual``, detail the scanner could not have seen either way.
* Spread: the standard deviation of the prediction over test-time augmentations (flips, and quarter turns where
  the model's two plane axes share a scale; Wang et al., Neurocomputing 2019), each made consistent like the output,
  averaged locally (Gaussian, 1 voxel along the upsampled axes): where the model's guess depends on orientation.
* Sigma: the spread turned into an error scale on the scan itself, one scale down: the scan's own LR is degraded
  once more (LLR) and upsampled with the same augmentations, and ``error^2 = a^2 spread^2 + b^2`` is fitted (non-
  negative least squares) against the LR it should have given: ``sigma = sqrt(a^2 spread^2 + b^2)``. ``b`` takes
  what no augmentation shows (the scan's noise beyond the measured band).
* Interval: ``output +- factor * sigma``, with ``factor`` the split-conformal quantile (Angelopoulos and Bates,
  2021) of ``|output - HR| / sigma`` on held-out scans, stored with the model (``description['uncertainty']``):
  about 1 - alpha of the voxels of scans like those fall inside.

Maps are computed at the model's own scale in the model's [0, 1] units; :func:`physical_maps` (behind
``medsr.trust_maps``) gives them in physical units (differences scale by the intensity window's width).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from scipy.optimize import nnls
from scipy.stats import spearmanr

from medsr.consistency import kspace_applies, kspace_consistency
from medsr.data import crop_to_multiple, degrade_normalised
from medsr.degrade import Degradation
from medsr.evaluation import Slab, body_mask, classical_upsample, degraded_slab, reference_scan, strongest_baseline
from medsr.infer import ModelPredictor, Predictor, model_plan, model_predictor, predict_volume, resample
from medsr.intensity import Window, denormalize, normalize
from medsr.samples import resolve_scan
from medsr.volume import Volume
from medsr.zoo import SRModel, held_out_sets

SMOOTHING = 1.0  # Gaussian sigma (voxels) of the local average of the augmentation variance
FIT_VOXELS = 200_000  # voxels drawn (seeded) for the one-scale-down fit
MIN_LLR = 2  # voxels along each upsampled axis of the LLR: below it the scan is too small to calibrate itself
ALPHA = 0.1  # the interval misses about this share of voxels


class Augmentation(NamedTuple):
    """Flip the given batch dims, then turn ``turns`` quarter turns in the last two dims; undone in reverse."""

    flips: tuple[int, ...]
    turns: int

    def apply(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.flip(self.flips) if self.flips else batch
        return torch.rot90(batch, self.turns, (-2, -1)) if self.turns else batch

    def undo(self, batch: torch.Tensor) -> torch.Tensor:
        batch = torch.rot90(batch, -self.turns, (-2, -1)) if self.turns else batch
        return batch.flip(self.flips) if self.flips else batch


def augmentations(model_scale: Sequence[int]) -> list[Augmentation]:
    """The test-time augmentations a model of ``model_scale`` allows, the identity first: a 2D model the 8
    symmetries of the square when both axes share a scale, else the 4 flips; a 3D model the 8 flips.

    >>> len(augmentations((2, 2))), len(augmentations((1, 4))), len(augmentations((2, 2, 2)))
    (8, 4, 8)
    """
    dims = tuple(range(2, 2 + len(model_scale)))  # spatial dims of an (N, C, *spatial) batch
    flips = [tuple(d for bit, d in enumerate(dims) if mask >> bit & 1) for mask in range(2 ** len(dims))]
    turns = range(4) if len(model_scale) == 2 and model_scale[0] == model_scale[1] else range(1)
    return [Augmentation(f, t) for f in flips[: 2 if len(turns) > 1 else None] for t in turns]


def augmented(predictor: Predictor, augmentation: Augmentation) -> Predictor:
    """``predictor`` seen through ``augmentation``: transform the input batch, predict, transform back. A network's
    predictor stays one (:class:`AugmentedPredictor`), so tiling measures the network once for all augmentations."""
    if isinstance(predictor, ModelPredictor):
        return AugmentedPredictor(predictor, augmentation)
    return lambda batch: augmentation.undo(predictor(augmentation.apply(batch)))


class AugmentedPredictor(ModelPredictor):
    """A :class:`~medsr.infer.ModelPredictor` seen through an :class:`Augmentation` (same network, same layouts)."""

    def __init__(self, base: ModelPredictor, augmentation: Augmentation) -> None:
        super().__init__(base.network, bf16=base.bf16)
        self.layouts, self.augmentation = base.layouts, augmentation

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.augmentation.undo(super().__call__(self.augmentation.apply(batch)))


def spread(
    predictor: Predictor,
    lr: Volume,
    *,
    model_scale: Sequence[int],
    scale: Sequence[int],
    consistency: Degradation | None = None,
    **run: int | bool,
) -> tuple[Volume, torch.Tensor]:
    """(the plain prediction, the locally averaged variance of the augmented predictions (C, I, J, K)).

    Args:
        lr: Input in the model's [0, 1] units. scale: per voxel axis (``infer.predict_volume``).
        consistency: MR k-space degradation whose measured band every prediction gets back (as the output does).
        run: tile, overlap, batch_size, progress, for ``infer.predict_volume``.
    """
    outputs = []
    for augmentation in augmentations(model_scale):
        sr = predict_volume(augmented(predictor, augmentation), lr, scale=scale, spatial_dims=len(model_scale), **run)
        outputs.append(sr if consistency is None else kspace_consistency(sr, lr, consistency))
    stack = torch.stack([o.array.double() for o in outputs])
    variance = stack.var(dim=0, unbiased=True).numpy()
    smoothing = [0.0] + [SMOOTHING if s > 1 else 0.0 for s in scale]
    return outputs[0], torch.from_numpy(gaussian_filter(variance, smoothing, mode="nearest"))


class TrustMaps(NamedTuple):
    """Per-voxel maps of one output, Volumes on its grid (see the module docstring): ``output``, ``spread``,
    ``sigma``, ``consistent``, ``residual``; ``lower``/``upper`` when the model has a calibrated ``factor`` (None
    otherwise); ``fit`` = (a, b) of sigma."""

    output: Volume
    spread: Volume
    sigma: Volume
    consistent: Volume
    residual: Volume
    lower: Volume | None
    upper: Volume | None
    fit: tuple[float, float]


def hallucination(sr: Volume, lr: Volume, degradation: Degradation) -> tuple[torch.Tensor, torch.Tensor]:
    """(consistent, residual), (C, I, J, K) each: the output's detail beyond U(lr) that the input cannot contradict,
    and what contradicts it, ``U(D(sr) - lr)`` (see the module docstring). Volumes in [0, 1] units.
    """
    method = strongest_baseline(degradation)
    scale = [round(h / n) for h, n in zip(sr.spatial_shape, lr.spatial_shape, strict=True)]
    again = degrade_normalised(sr, dataclasses.replace(degradation, noise="none"), rng=None)
    if again.spatial_shape != lr.spatial_shape:
        raise ValueError(f"the output degrades to {again.spatial_shape}, not the input's {lr.spatial_shape}")
    residual = classical_upsample(lr.replace(array=again.array - lr.array), scale, method)
    consistent = sr.array - classical_upsample(lr, scale, method) - residual
    return consistent, residual


def fit_sigma(variance: torch.Tensor, error: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(a, b) of ``error^2 ~ a^2 variance + b^2`` by non-negative least squares over ``mask`` (a seeded draw of at
    most ``FIT_VOXELS`` voxels). All (C, I, J, K).

    >>> v = torch.rand(1, 50, 50, 1); e = (4 * v + 0.01).sqrt()
    >>> [round(x, 3) for x in fit_sigma(v, e, torch.ones_like(v, dtype=torch.bool))]
    [2.0, 0.1]
    """
    v, e2 = variance[mask].double().numpy(), error[mask].double().pow(2).numpy()
    if v.size > FIT_VOXELS:
        chosen = np.random.default_rng(0).choice(v.size, FIT_VOXELS, replace=False)
        v, e2 = v[chosen], e2[chosen]
    (a2, b2), _ = nnls(np.stack([v, np.ones_like(v)], axis=1), e2)
    return math.sqrt(a2), math.sqrt(b2)


def self_calibration(
    predictor: Predictor,
    lr: Volume,
    degradation: Degradation,
    *,
    model_scale: Sequence[int],
    scale: Sequence[int],
    consistency: bool,
    **run: int | bool,
) -> tuple[float, float]:
    """(a, b) of sigma fitted one scale down on the scan itself: its LR degraded once more (noise-free) to LLR,
    upsampled with the augmentations, against the LR, within its body mask. A ValueError when the LLR would have
    fewer than ``MIN_LLR`` voxels along an upsampled axis."""
    small = [n // s for n, s in zip(lr.spatial_shape, scale, strict=True) if s > 1]
    if min(small, default=MIN_LLR) < MIN_LLR:
        raise ValueError(f"a {lr.spatial_shape} scan is too small to calibrate its uncertainty on itself")
    target = crop_to_multiple(lr, scale=scale)
    noiseless = dataclasses.replace(degradation, noise="none")
    llr = degrade_normalised(target, noiseless, rng=None)
    predicted, variance = spread(
        predictor, llr, model_scale=model_scale, scale=scale, consistency=noiseless if consistency else None, **run
    )
    mask = body_mask(target.array.permute(3, 0, 1, 2)).permute(1, 2, 3, 0)  # (C, I, J, K)
    return fit_sigma(variance, predicted.array - target.array, mask)


def maps(
    predictor: Predictor,
    lr: Volume,
    degradation: Degradation,
    *,
    model_scale: Sequence[int],
    scale: Sequence[int],
    consistency: bool,
    factor: float | None = None,
    **run: int | bool,
) -> TrustMaps:
    """Every map of one input at the model's own ``scale``, in the model's [0, 1] units (``lr`` normalised).

    Args:
        consistency: MR k-space consistency on (the output and every augmented prediction).
        factor: The model's calibrated conformal factor; None: no interval.
        run: tile, overlap, batch_size, progress (``infer.predict_volume``).
    """
    kspace = degradation if consistency else None
    output, variance = spread(predictor, lr, model_scale=model_scale, scale=scale, consistency=kspace, **run)
    a, b = self_calibration(
        predictor, lr, degradation, model_scale=model_scale, scale=scale, consistency=consistency, **run
    )
    sigma = (a * a * variance + b * b).sqrt().float()
    consistent, residual = hallucination(output, lr, degradation)

    def volume(array: torch.Tensor | None) -> Volume | None:
        return None if array is None else output.replace(array=array.float())

    bounds = (None, None) if factor is None else (output.array - factor * sigma, output.array + factor * sigma)
    return TrustMaps(
        output,
        volume(variance.sqrt()),
        volume(sigma),
        volume(consistent),
        volume(residual),
        *map(volume, bounds),
        (a, b),
    )


MAPS = ("uncertainty", "lower", "upper", "consistent", "residual")  # what --uncertainty writes beside the output


def map_path(target: Path | str, name: str) -> Path:
    """Where a map of ``target`` goes: its name with ``_<name>`` before the suffix (a DICOM folder: after it); a
    PNG's maps are float TIFF (PNG holds integers).

    >>> map_path("out/sr.nii.gz", "uncertainty"), map_path("out/sr_series", "lower")
    (PosixPath('out/sr_uncertainty.nii.gz'), PosixPath('out/sr_series_lower'))
    """
    target = Path(target)
    stem = target.name[: -len(".nii.gz")] if target.name.lower().endswith(".nii.gz") else target.stem
    suffix = target.name[len(stem) :]
    return target.with_name(f"{stem}_{name}{'.tif' if suffix.lower() == '.png' else suffix}")


def physical_maps(
    volume: Volume,
    model: SRModel,
    *,
    factors: Sequence[float],
    window: Window,
    precision: str = "auto",
    consistency: bool = False,
    floor: float | None = None,
    **run: int | bool,
) -> TrustMaps:
    """:func:`maps` of a scan in physical units, as ``infer.super_resolve`` runs it: normalise with ``window``,
    predict at the model's scale, resample to ``factors`` (linear), back to physical units (differences and sigma
    scaled by the window's width); ``output``, ``lower`` and ``upper`` no lower than ``floor`` (CT: air). The
    output equals ``medsr.upscale``'s. The interval needs the model's calibration (``description['uncertainty']``).
    """
    scale = model_plan(factors, model.model_scale)
    lr = normalize(volume, window)
    result = maps(
        model_predictor(model.network, precision=precision),
        lr,
        model.degradation,
        model_scale=model.model_scale,
        scale=scale,
        consistency=consistency,
        factor=model.description.get("uncertainty", {}).get("factor"),
        **run,
    )
    shape = [max(1, round(n * f)) for n, f in zip(volume.spatial_shape, factors, strict=True)]
    width = window.hi - window.lo

    def physical(field: Volume | None, *, level: bool) -> Volume | None:
        if field is None:
            return None
        field = resample(field, shape)
        if not level:
            return field.replace(array=field.array * width)
        field = denormalize(field, window)
        return field if floor is None else field.replace(array=field.array.clamp(min=floor))

    levels = ("output", "lower", "upper")  # intensities; the other maps are differences or deviations
    return TrustMaps(
        *(physical(getattr(result, name), level=name in levels) for name in TrustMaps._fields[:-1]), result.fit
    )


def conformal_factor(scores: np.ndarray, alpha: float = ALPHA) -> float:
    """The split-conformal factor: the k-th smallest of ``scores`` = |output - truth| / sigma on n calibration
    voxels, k = ceil((n + 1)(1 - alpha)), so ``|error| <= factor * sigma`` on at least 1 - alpha of exchangeable
    new voxels (infinite when k > n: too few scores for that alpha).

    >>> conformal_factor(np.arange(1, 101, dtype=float), alpha=0.1)
    91.0
    """
    n = scores.size
    k = math.ceil((n + 1) * (1 - alpha))
    if n == 0:
        raise ValueError("no calibration scores")
    return math.inf if k > n else float(np.partition(scores, k - 1)[k - 1])


LEVELS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)  # coverages a calibration plot checks
SCORE_DRAW = 20_000  # calibration voxels drawn (seeded) from each set, so every set weighs the same


class Trust(NamedTuple):
    """How one set's maps relate to its true error (``|output - HR|``): what an evaluation reports.

    maps: error, sigma, consistent, residual as (C, I, J, K) tensors in [0, 1] units, and the body mask (bool).
    spearman, spearman_body: rank correlation of sigma with the error over all / body voxels. spearman_ceiling: that
    of the true local error (RMS of the error over the 5 x 5 in-plane neighbours, the voxel itself left out): about
    the best any map could do given the HR's own noise. Each None where sigma or the error is constant.
    coverage: {level: share of voxels inside ``output +- factors[level] * sigma``} for the model's calibrated
    factors (empty without). scores: a seeded draw of ``error / sigma``.
    """

    maps: dict[str, torch.Tensor]
    spearman: float | None
    spearman_body: float | None
    spearman_ceiling: float | None
    coverage: dict[str, float]
    scores: np.ndarray


def trust(result: TrustMaps, hr: Volume, factors: dict[str, float] | None = None) -> Trust:
    """Score ``result`` (:func:`maps` of an LR made from ``hr``, [0, 1] units) against the truth; see :class:`Trust`."""
    error = (result.output.array - hr.array).abs()
    sigma = result.sigma.array
    body = body_mask(hr.array.permute(3, 0, 1, 2)).permute(1, 2, 3, 0)
    ring = torch.ones(1, 1, 5, 5, dtype=torch.float64)
    ring[0, 0, 2, 2] = 0
    planes = error.double().permute(3, 0, 1, 2).pow(2)  # (K, C, I, J)
    local = torch.nn.functional.conv2d(planes, ring / ring.sum(), padding=2).sqrt().permute(1, 2, 3, 0)
    scores = (error / sigma.clamp(min=1e-12)).flatten().numpy()
    return Trust(
        {"error": error, "sigma": sigma, "consistent": result.consistent.array, "residual": result.residual.array}
        | {"body": body},
        _spearman(sigma.flatten(), error.flatten()),
        _spearman(sigma[body], error[body]),
        _spearman(local.flatten(), error.flatten()),
        {level: float((error <= factor * sigma).float().mean()) for level, factor in (factors or {}).items()},
        np.random.default_rng(0).choice(scores, SCORE_DRAW),
    )


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Spearman's rank correlation of two voxel sets; None where one is constant (e.g. a flat sigma)."""
    if a.numel() < 2 or bool((a == a[0]).all()) or bool((b == b[0]).all()):
        return None
    return float(spearmanr(a, b).statistic)


def calibrate(model: SRModel, *, alpha: float = ALPHA, precision: str = "fp32") -> dict:
    """Calibrate a model's interval on its held-out sets (``zoo.held_out_sets``: the test slab of its training
    scan and the scans of other subjects), each degraded as the model was trained, all voxels of each slab.

    The stored ``factor`` pools ``SCORE_DRAW`` voxels of every set. Each set's ``coverage`` (the share of its
    voxels inside ``output +- factor * sigma``) is measured with the factor calibrated on the *other* sets (leave
    one subject out), so no set is scored with a factor it helped calibrate (None for a model with one set);
    ``coverage_body`` within its body mask; the Spearman correlations as in :class:`Trust`.

    Returns the record stored as ``description['uncertainty']``: alpha, factor, ``factors`` (the conformal factor
    of each coverage in ``LEVELS``, for calibration plots), and one entry per set.
    """
    from medsr.report import held_out_text  # report imports zoo and evaluation: kept out of this module's imports

    d = model.config.degradation
    predictor = model_predictor(model.network, precision=precision)
    measured = {}
    for scan, slices, slice_axis in held_out_sets(model):
        hr = reference_scan(model, resolve_scan(scan), slice_axis)
        axis = model.config.data.split_axis
        slab, lr = degraded_slab(hr, d, slices=slices or (0, hr.spatial_shape[axis]), axis=axis)
        run = {"model_scale": model.model_scale, "scale": model.scale, "consistency": kspace_applies(d)}
        result = maps(predictor, lr, d, progress=False, **run)
        name = held_out_text(Path(scan).name, Slab(*slices, axis) if slices else None, slice_axis)
        measured[name] = (trust(result, slab), result.fit)
    sets = []
    for name, (scored, fit) in measured.items():
        others = [other.scores for key, (other, _) in measured.items() if key != name]
        error, sigma = scored.maps["error"], scored.maps["sigma"]
        inside = error <= conformal_factor(np.concatenate(others), alpha) * sigma if others else None  # one set: none
        body = scored.maps["body"]
        sets.append(
            {
                "data": name,
                "coverage": None if inside is None else float(inside.float().mean()),
                "coverage_body": None if inside is None else float(inside[body].float().mean()),
                "spearman": scored.spearman,
                "spearman_body": scored.spearman_body,
                "spearman_ceiling": scored.spearman_ceiling,
                "fit": list(fit),
            }
        )
    pooled = np.concatenate([scored.scores for scored, _ in measured.values()])
    return {
        "alpha": alpha,
        "factor": conformal_factor(pooled, alpha),
        "factors": {f"{level:g}": conformal_factor(pooled, 1 - level) for level in LEVELS},  # calibration plots
        "voxels": "all voxels of each set",
        "sets": sets,
    }


def calibrate_shipped(name: str, *, precision: str = "fp32") -> dict:
    """:func:`calibrate` a shipped model, store the record in its model.json (``description['uncertainty']``),
    which ``medsr upscale --uncertainty`` reads for the interval, and rewrite its card. Returns the record."""
    from medsr.checkpoint import shipped_models, update_description
    from medsr.zoo import load_model

    if name not in shipped_models():
        raise ValueError(f"{name}: not a shipped model; shipped: {', '.join(shipped_models())}")
    from medsr.io import write_bytes
    from medsr.report import model_card
    from medsr.zoo import CARD

    model = load_model(name)
    record = calibrate(model, precision=precision)
    update_description(model.path, uncertainty=record)
    description = model.description | {"uncertainty": record}
    held_out = description.get("scores", {}).get("held_out", [])
    write_bytes(model.path / CARD, model_card(name, description, held_out, precision="fp32").encode())
    return record


CALIBRATION_COLUMNS = ("model", "data", "coverage", "coverage_body", "spearman", "spearman_body", "spearman_ceiling")


def calibration_rows(name: str, record: dict) -> list[dict]:
    """Table rows of a :func:`calibrate` record: one per held-out set, numbers as text (coverage in %).

    >>> calibration_rows("m", {"factor": 1.2, "sets": [{"data": "a", "coverage": 0.9, "spearman": 0.5}]})
    [{'model': 'm (factor 1.20)', 'data': 'a', 'coverage': '90.0 %', 'spearman': '0.50'}]
    """
    rows = []
    for entry in record["sets"]:
        row = {"model": f"{name} (factor {record['factor']:.2f})", "data": entry["data"]}
        for key, value in entry.items():
            if key.startswith("coverage"):
                row[key] = "-" if value is None else f"{100 * value:.1f} %"
            elif key.startswith("spearman"):
                row[key] = "-" if value is None else f"{value:.2f}"
        rows.append(row)
    return rows
