"""Compare SR methods with interpolation baselines on held-out slices of HR scans.

The HR slab is degraded with the known model (or, for a real LR/HR pair, the LR is given), every method upsamples
the same LR slab (baselines in 3D, so through-plane factors are interpolated too), and each is scored against HR
slice by slice (2D PSNR/SSIM, ``data_range = 1`` on normalised intensities), over the whole slice and over the body
(foreground) mask, since air inflates both scores; RMSE and MAE in the body also in physical units (HU for CT).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from medsr.consistency import kspace_applies, kspace_consistency, lr_rmse
from medsr.data import FOREGROUND_LEVEL, crop_to_multiple, degrade_normalised, slice_range
from medsr.degrade import Degradation
from medsr.degrade.sampling import kspace_upsample
from medsr.infer import Predictor, on_device, predict_volume, resolve_device
from medsr.intensity import Window, default_window, normalize
from medsr.metrics import hf_energy_ratio, hfen, psnr, ssim, ssim_interior
from medsr.models.blocks import interpolate
from medsr.volume import Volume, integer_scale, scale_affine, swap_into_k

if TYPE_CHECKING:
    from medsr.uncertainty import Trust
    from medsr.zoo import SRModel

LOG = logging.getLogger("medsr")
BASELINES = ("nearest", "linear", "cubic")  # always scored; plus the strongest for the degradation:
STRONGEST = {"kspace": "zerofill", "slices": "bspline", "image": "lanczos"}


def strongest_baseline(degradation: Degradation) -> str:
    """The strongest classical upsampler for a degradation: zero-filled k-space ('zerofill', sinc interpolation,
    what MR scanners offer as ZIP) for MR k-space truncation in-plane; cubic B-spline ('bspline') for thick slices
    only; Lanczos-3 ('lanczos') for image-domain losses (CT, US, X-ray in-plane).

    >>> strongest_baseline(Degradation(factors=(2, 2, 1), modality="MR"))
    'zerofill'
    >>> strongest_baseline(Degradation(factors=(1, 1, 4), modality="CT"))
    'bspline'
    """
    if max(degradation.factors[:2]) > 1:
        return STRONGEST["kspace" if degradation.modality == "MR" else "image"]
    return STRONGEST["slices"]


def baselines(degradation: Degradation) -> tuple[str, ...]:
    """Every baseline a comparison scores for ``degradation``: nearest, linear, cubic and the strongest."""
    return (*BASELINES, strongest_baseline(degradation))


def best_baseline(rows: Sequence[Mapping], key: str = "psnr") -> tuple[str, float]:
    """(method, score) of the best interpolation baseline among a comparison's ``rows`` by ``key``: what a model's
    gain is measured against.

    >>> rows = [{"method": "cubic", "psnr": 30.0}, {"method": "zerofill", "psnr": 31.0}, {"method": "sr", "psnr": 32}]
    >>> best_baseline(rows)
    ('zerofill', 31.0)
    """
    known = (*BASELINES, *STRONGEST.values())
    score, method = max((row[key], row["method"]) for row in rows if row["method"] in known)
    return method, score


def classical_upsample(lr: Volume, scale: Sequence[int], method: str) -> torch.Tensor:
    """An interpolation baseline: (C, I, J, K) at ``scale`` times the LR grid, voxel-centre convention.

    'nearest', 'linear', 'cubic', 'lanczos' (``models.blocks.interpolate``); 'zerofill': zero-filled k-space
    in-plane (``degrade.sampling.kspace_upsample``), cubic B-spline along k; 'bspline': cubic B-spline along every
    upsampled axis (``selfsup.interpolate_slices``).
    """
    from medsr.selfsup import interpolate_slices  # selfsup trains (train imports this module)

    if method not in (*BASELINES, *STRONGEST.values()):
        raise ValueError(f"unknown baseline {method!r}")
    if method not in ("zerofill", "bspline"):
        return interpolate(lr.array[None], scale, method)[0]
    volume = lr
    if method == "zerofill" and max(scale[:2]) > 1:
        shape = (lr.spatial_shape[0] * scale[0], lr.spatial_shape[1] * scale[1])
        upsampled = kspace_upsample(lr.array.permute(0, 3, 1, 2), shape).permute(0, 2, 3, 1)  # (C, I, J, K)
        volume = lr.replace(array=upsampled.contiguous())
    for axis in range(3) if method == "bspline" else (2,):
        if scale[axis] > 1:
            volume = interpolate_slices(volume, axis, lr.spatial_shape[axis] * scale[axis])
    return volume.array


class Slab(NamedTuple):
    """Voxels ``[start, stop)`` along ``axis`` (0 = i, 1 = j, 2 = k) of a scan: what an evaluation scored."""

    start: int
    stop: int
    axis: int

    def __str__(self) -> str:
        return f"{'ijk'[self.axis]} {self.start}..{self.stop - 1}"

    def k_index(self, k: int) -> int:
        """The scan's k index of the slab's slice ``k`` (scores and figures are per (i, j) slice)."""
        return self.start + k if self.axis == 2 else k


def body_mask(hr: torch.Tensor) -> torch.Tensor:
    """Voxels above 5 % of the normalised range, dilated by 2 voxels in-plane so edges count. (K, 1, I, J) bool."""
    mask = (hr > FOREGROUND_LEVEL).float()
    return torch.nn.functional.max_pool2d(mask, kernel_size=5, stride=1, padding=2) > 0


def score_slices(
    sr: torch.Tensor, hr: torch.Tensor, mask: torch.Tensor, *, extras: bool = False, window: Window | None = None
) -> dict:
    """Scores of every slice, whole and within ``mask``: name -> (K,) tensor. sr, hr: (K, C, I, J) in [0, 1].

    With ``window`` (what [0, 1] stands for), also RMSE and MAE within ``mask`` in its physical units
    (``rmse_body``, ``mae_body``: a normalised difference times the window's width). With ``extras``, also HFEN
    per slice and 3D SSIM of the slab (a single value; slabs of 11 slices or more).
    """
    scores = {
        "psnr": psnr(sr, hr, data_range=1.0),
        "ssim": ssim(sr, hr, data_range=1.0),
        "psnr_body": psnr(sr, hr, data_range=1.0, mask=mask),
        "ssim_body": ssim(sr, hr, data_range=1.0, mask=mask),
    }
    if window is not None:
        error = (sr.double() - hr.double()).abs() * (window.hi - window.lo)
        inside = mask.expand_as(error)
        count = inside.flatten(1).sum(1)
        scores["rmse_body"] = (torch.where(inside, error**2, 0).flatten(1).sum(1) / count).sqrt()
        scores["mae_body"] = torch.where(inside, error, 0).flatten(1).sum(1) / count
    if extras:
        scores["hfen"] = hfen(sr, hr)
        if sr.shape[0] >= 11:  # (1, C, I, J, K): the slab as one volume
            scores["ssim3d"] = ssim(sr.permute(1, 2, 3, 0)[None], hr.permute(1, 2, 3, 0)[None], data_range=1.0)
    return scores


class Comparison(NamedTuple):
    """What :func:`compare_methods` measured.

    rows: One per method: ``method`` and the mean of each score over the slab's slices.
    slices: One per method and slice: ``method``, ``slice`` (index in the scan) and the slice's scores; the
        slab-wide ones (``ssim3d``, ``hf_ratio``, ``lr_rmse``) go in one extra row per method whose ``slice`` is
        ``start..stop-1``.
    images: Name -> the scored planes (:func:`scored_planes`: (K, C, I, J) slices, or one plane across them),
        including ``lr`` (at its own size) and ``hr``.
    """

    rows: list[dict[str, float | str]]
    slices: list[dict[str, float | str]]
    images: dict[str, torch.Tensor]


def degraded_slab(
    hr: Volume, degradation: Degradation, *, slices: tuple[int, int], axis: int = 2, seed: int = 0
) -> tuple[Volume, Volume]:
    """(HR slab, its LR) as :func:`compare_methods` scores them: the slab cut to a multiple of the factors, and
    its simulation with the noise drawn from ``seed``; both normalised like ``hr``."""
    slab = crop_to_multiple(slice_range(hr, slices=slices, axis=axis), scale=integer_scale(degradation.factors))
    return slab, degrade_normalised(slab, degradation, rng=np.random.default_rng(seed))


def compare_methods(
    hr: Volume,
    degradation: Degradation,
    models: Mapping[str, Predictor],
    *,
    slices: tuple[int, int],
    spatial_dims: int = 2,
    seed: int = 0,
    extras: bool = False,
    axis: int = 2,
    kspace: bool = False,
) -> Comparison:
    """Score the baselines and ``models`` on the slab ``slices`` of ``hr``, degraded with ``degradation``.

    Args:
        hr: HR volume from ``data.prepare_scan`` (normalised with its LR's window, cropped to the factors).
        degradation: Integer factors; (a, b, 1) or (1, 1, c) for 2D models.
        models: Name -> predictor taking ``spatial_dims`` (see ``infer.model_predictor``).
        slices: ``[start, stop)`` along ``axis`` (0 = i, 1 = j, 2 = k), cut down to a multiple of that axis's
            factor; must not overlap the region the models trained on. Scores are per (i, j) slice either way
            (:func:`scored_planes`).
        spatial_dims: 2 (the models run plane by plane, see ``infer.predict_volume``) or 3 (on the whole slab).
        seed: Seed of the LR noise draw (random degradations), so a comparison can be replayed.
        extras: See :func:`score_methods`.
        axis: The axis of ``slices``.
        kspace: See :func:`score_methods`.
    """
    slab, lr = degraded_slab(hr, degradation, slices=slices, axis=axis, seed=seed)
    where = Slab(*slices, axis)
    return score_methods(slab, lr, degradation, models, where, spatial_dims=spatial_dims, extras=extras, kspace=kspace)


def scored_planes(array: torch.Tensor) -> torch.Tensor:
    """The planes a comparison scores, (N, C, A, B), of a (C, I, J, K) array: its (i, j) slices, (K, C, I, J); or,
    for one plane across the slices (I or J is 1 and K is not: a coronal or sagittal image scored through-plane),
    that plane, (1, C, I or J, K).

    >>> scored_planes(torch.zeros(1, 8, 6, 4)).shape, scored_planes(torch.zeros(1, 8, 1, 4)).shape
    (torch.Size([4, 1, 8, 6]), torch.Size([1, 1, 8, 4]))
    """
    _, size_i, size_j, size_k = array.shape
    if size_k > 1 and size_j == 1:
        return array.permute(2, 0, 1, 3)
    if size_k > 1 and size_i == 1:
        return array.permute(1, 0, 2, 3)
    return array.permute(3, 0, 1, 2)


def score_methods(
    hr: Volume,
    lr: Volume,
    degradation: Degradation,
    models: Mapping[str, Predictor],
    where: Slab,
    *,
    spatial_dims: int = 2,
    extras: bool = False,
    kspace: bool = False,
) -> Comparison:
    """Score the baselines and ``models``, each upsampling ``lr`` to ``hr``'s grid, against ``hr``, on every
    slice (:func:`scored_planes`) with some body in it (:func:`body_mask`) away from its edge (``metrics.ssim``'s
    border; slices of air only are left out).

    Args:
        hr: The HR slab, normalised; with its window in ``meta['window']``, RMSE and MAE are scored in physical
            units too (``score_slices``).
        lr: Its LR over the same field of view, normalised alike: simulated (:func:`degraded_slab`) or acquired.
        degradation: What made ``lr`` from ``hr``, or what the models assume did (a real pair): it sets the scale,
            the strongest baseline, ``lr_rmse`` and the k-space consistency.
        models: Name -> predictor taking ``spatial_dims`` (see ``infer.model_predictor``).
        where: Which slab of the scan ``hr`` is (names the slices in the per-slice rows).
        spatial_dims: 2 (the models run plane by plane, see ``infer.predict_volume``) or 3 (on the whole slab).
        extras: Also score HFEN, 3D SSIM and, for the whole slab, ``hf_ratio`` and ``lr_rmse`` (slower).
        kspace: Put the LR's measured k-space band back into each model's output (``consistency.kspace_consistency``),
            as ``medsr upscale`` does by default for MR k-space models.
    """
    scale = integer_scale(degradation.factors)
    outputs = {method: classical_upsample(lr, scale, method) for method in baselines(degradation)}  # (C, I, J, K)
    for name, predictor in models.items():
        sr = predict_volume(predictor, lr, scale=scale, spatial_dims=spatial_dims, progress=False)
        outputs[name] = (kspace_consistency(sr, lr, degradation) if kspace else sr).array
    images = {name: scored_planes(array) for name, array in {"lr": lr.array, "hr": hr.array, **outputs}.items()}
    mask = body_mask(images["hr"])
    # Slices of air only (beyond the head of a whole scan), or with body only at the edge, where SSIM has no
    # window, are not scored.
    body = ssim_interior(mask).flatten(1).any(1)
    if not body.any():
        raise ValueError(f"{where}: no voxel above {FOREGROUND_LEVEL:.0%} of the intensity window: nothing to score")
    window = hr.meta.get("window")
    first, last = where.k_index(0), where.k_index(hr.spatial_shape[2] - 1)
    across = images["hr"].shape[0] != hr.spatial_shape[2]  # one plane across the slices: it is the whole slab
    labels = [f"{first}..{last}"] if across else [where.k_index(k) for k in range(hr.spatial_shape[2])]
    labels = [label for label, kept in zip(labels, body.tolist(), strict=True) if kept]
    rows, per_slice = [], []
    for name, output in outputs.items():
        scores = score_slices(images[name][body], images["hr"][body], mask[body], extras=extras, window=window)
        slab_scores = {"ssim3d": float(scores.pop("ssim3d"))} if "ssim3d" in scores else {}
        if extras:  # of the whole slab: detail beyond the LR band (vs HR), and fidelity to the LR input
            slab_scores["hf_ratio"] = float(hf_energy_ratio(output[None], hr.array[None], factors=scale))
            slab_scores["lr_rmse"] = lr_rmse(hr.replace(array=output), lr, degradation)
        rows.append({"method": name} | {key: float(values.mean()) for key, values in scores.items()} | slab_scores)
        per_slice += [
            {"method": name, "slice": label}
            | {key: float(v[n]) for key, v in scores.items()}
            | (slab_scores if across else {})
            for n, label in enumerate(labels)
        ]
        if slab_scores and not across:
            per_slice.append({"method": name, "slice": f"{first}..{last}"} | slab_scores)
    return Comparison(rows, per_slice, images)


class Evaluation(NamedTuple):
    """What :func:`evaluate` or :func:`evaluate_pair` measured.

    model: The model's name. scan: The HR scan (sample name or path). degradation: What made the LR slab from HR;
    for a real pair (``lr`` set), what the model assumes made it. slab: What was scored. comparison: The scores of
    the baselines and the model. window: What the normalised [0, 1] stands for, in physical units (HU for CT).
    lr: The real LR scan of a pair; None when the LR was simulated. sources: Each input file -> its SHA-256
    (:func:`scan_digest`). weights_sha256: Of the model's weights file. card: The model card (Markdown).
    trust: The model's trust maps and how they relate to its error (``uncertainty.Trust``), when asked for.
    """

    model: str
    scan: str
    degradation: Degradation
    slab: Slab
    comparison: Comparison
    window: Window
    lr: str | None
    sources: dict[str, str]
    weights_sha256: str
    card: str
    trust: Trust | None = None


def scan_digest(path: Path) -> str:
    """SHA-256 (hex) of a scan file, or of a folder's files (a DICOM series) read one after another in sorted
    order of their paths: ``find DIR -type f -print0 | LC_ALL=C sort -z | xargs -0 cat | sha256sum``."""
    path = Path(path)
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in sorted(files, key=bytes):
        with file.open("rb") as data:
            while chunk := data.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _seen_scans(model: SRModel) -> tuple[list[Path], list[Path], list[Path]]:
    """The scans ``model`` trained on, was validated on, and trained on whole (``data.extra_train_scans``). The split
    fit() saved holds the training machine's paths; the config's split, rebuilt, this machine's: both count."""
    from medsr.samples import resolve_scan
    from medsr.train import training_scans

    saved = model.description.get("scans", {})
    here = training_scans(model.config)
    train, val = ([Path(p) for p in saved.get(k, [])] + paths for k, paths in (("train", here[0]), ("val", here[1])))
    return train, val, [resolve_scan(extra) for extra in model.config.data.extra_train_scans]


def evaluate(
    model: SRModel | str | Path,
    scan: str | Path = "colin27",
    slices: tuple[int, int] | None = None,
    *,
    precision: str = "auto",
    kspace_consistency: bool | None = None,
    adapt_seconds: float = 0.0,
    device: str = "cpu",
    uncertainty: bool = False,
    slice_axis: int = 2,
) -> Evaluation:
    """Score a trained model next to the interpolation baselines on held-out data of an HR scan: the scan is
    degraded as the model was trained (its ``degradation``), every method upsamples the same LR slab, and each is
    scored against HR (HFEN, 3D SSIM, ``hf_ratio``, ``lr_rmse`` and errors in physical units included).

    Args:
        model: A loaded model, a shipped name or a checkpoint folder.
        scan: A sample name (``medsr samples``) or the path of an HR scan.
        slices: ``[start, stop)`` along the model's split axis; default: its test slab on a training scan, all of a
            scan it never saw. Slabs overlapping its training or validation region, and scans it trained or was
            validated on whole, are refused.
        precision: Inference precision (``infer.model_predictor``).
        kspace_consistency: Score the model with the LR's k-space band put back, as ``medsr upscale`` runs it;
            None (default): as ``medsr upscale`` decides, i.e. for MR k-space models.
        adapt_seconds: Also score the model fine-tuned for this long on the LR slab itself (``adapt.adapt``, as
            ``medsr upscale --adapt``), as ``<name>+adapted``; its time, steps and whether the fine-tuned model was
            kept go in its row (``adapt_seconds``, ``adapt_steps``, ``adapt_kept``).
            A slab too small to adapt on is scored without (a warning says so).
        device: Where the model runs ('cpu', 'cuda', 'cuda:N', 'mps' or 'auto'; ``infer.resolve_device``); the
            adaptation itself trains on the CPU.
        uncertainty: Also make the model's trust maps (``uncertainty.maps``: about 10x the model's time) and score
            them against the truth (``Evaluation.trust``: rank correlation with the error, interval coverage).
        slice_axis: The scan's voxel axis that plays the slice axis k of a through-plane model
            (:func:`reference_scan`): 2 (default), or 1 (0) to score it across the rows (columns) of single coronal
            or sagittal images, whose rows run from head to foot; ``slices`` then count along that axis.

    >>> result = evaluate("edsr_mr_x2", "colin27", (120, 124), precision="fp32")
    >>> [row["method"] for row in result.comparison.rows], str(result.slab)
    (['nearest', 'linear', 'cubic', 'zerofill', 'edsr_mr_x2'], 'k 120..123')
    """
    from medsr.samples import resolve_scan
    from medsr.zoo import SRModel, load_model

    where = resolve_device(device)  # a device this machine lacks: refused before any work
    model = model if isinstance(model, SRModel) else load_model(model)
    config = model.config
    path = resolve_scan(str(scan))
    train, val, extra = _seen_scans(model)
    if path in extra:
        raise ValueError(f"{path} is a scan {model.name} trained on (data.extra_train_scans); evaluate on another")
    if config.data.split == "scan" and path in train + val:  # validation picked the checkpoint: not held out
        raise ValueError(f"{path} is a scan {model.name} trained or was validated on; evaluate on a test scan")
    if slice_axis != 2 and path in train + val:  # its training region is a slab along k
        raise ValueError(f"{path}: {model.name} trained on part of it; score it along k, its training slice axis")
    if config.data.split == "region" and path in train:
        slices = slices or config.data.test_slices
        for region, (start, stop) in (("train", config.data.train_slices), ("val", config.data.val_slices)):
            if slices[0] < stop and start < slices[1]:
                raise ValueError(
                    f"slices {slices} overlap the {region} slices ({start}, {stop}) of {model.name} "
                    f"on {path}; choose a held-out slab with --slices"
                )
    hr = reference_scan(model, path, slice_axis)
    axis = config.data.split_axis
    slices = slices or (0, hr.spatial_shape[axis])  # a scan the model never saw: all of it
    if not 0 <= slices[0] < slices[1] <= hr.spatial_shape[axis]:
        raise ValueError(
            f"{path}: has {hr.spatial_shape[axis]} voxels along {'ijk'[axis]}; choose a slab inside it with --slices"
        )
    slab, lr = degraded_slab(hr, config.degradation, slices=slices, axis=axis)
    options = dict(precision=precision, kspace_consistency=kspace_consistency, adapt_seconds=adapt_seconds)
    options |= {"uncertainty": uncertainty}
    scored = Slab(*slices, axis if slice_axis == 2 else slice_axis)  # along the scan's own axis
    return _score_model(model, slab, lr, scored, scan=str(scan), sources=[path], device=where, **options)


def reference_scan(model: SRModel, path: Path, slice_axis: int = 2) -> Volume:
    """An HR scan as ``model`` is scored on it: read in the model's modality, its voxel axis ``slice_axis`` swapped
    with k (through-plane models only: a coronal image's rows, head to foot, become the slices to thin out), then
    normalised and cropped to the model's factors (``data.prepare_scan``).

    >>> from medsr.zoo import load_model
    >>> from medsr.samples import resolve_scan
    >>> reference_scan(load_model("edsr_mr_slices_x4"), resolve_scan("mr_t1_coronal"), 1).spatial_shape
    (256, 1, 256)
    """
    from medsr.data import prepare_scan
    from medsr.io import read_volume
    from medsr.zoo import is_through_plane

    if slice_axis != 2 and not is_through_plane(model.scale):
        raise ValueError(
            f"{model.name} upsamples in-plane: only a through-plane model is scored across axis {slice_axis}"
        )
    return prepare_scan(swap_into_k(read_volume(path, modality=model.modality), slice_axis), model.degradation)


PAIR_TOLERANCE = 0.5  # HR voxels: how far apart the corners of an LR/HR pair's fields of view may be


def check_pair(lr: Volume, hr: Volume, scale: Sequence[int], *, names: tuple[str, str] | None = None) -> None:
    """Refuse an LR/HR pair that does not sample one field of view at ``scale``: the HR's shape must be the LR's
    times ``scale``, and each corner of the LR's field of view (``volume.scale_affine``) must be within
    ``PAIR_TOLERANCE`` times the largest HR voxel edge of the HR's. ``names``: of the LR and HR files, for the error.

    >>> from medsr.volume import scale_affine
    >>> lr = Volume(torch.zeros(1, 4, 4, 2), np.eye(4))
    >>> check_pair(lr, Volume(torch.zeros(1, 8, 8, 2), scale_affine(np.eye(4), (2, 2, 1))), (2, 2, 1))
    >>> check_pair(lr, Volume(torch.zeros(1, 8, 8, 2), np.eye(4)), (2, 2, 1))
    Traceback (most recent call last):
    ...
    ValueError: LR and HR are not a pair at scale 2x2x1: fields of view 5.66 mm apart at a corner (tolerance 0.5 mm)
    """
    expected = tuple(n * s for n, s in zip(lr.spatial_shape, scale, strict=True))
    files = "LR and HR" if names is None else f"LR {names[0]} and HR {names[1]}"
    problem = f"{files} are not a pair at scale {'x'.join(map(str, scale))}: "
    if hr.spatial_shape != expected:
        raise ValueError(
            f"{problem}HR shape {hr.spatial_shape} is not LR shape {lr.spatial_shape} x scale = {expected}"
        )
    edges = np.stack(np.meshgrid(*[(-0.5, n - 0.5) for n in hr.spatial_shape], indexing="ij"), -1).reshape(-1, 3)
    corners = np.c_[edges, np.ones(len(edges))].T  # (4, 8) HR voxel indices of the field of view's corners
    apart = float(np.linalg.norm(((scale_affine(lr.affine, scale) - hr.affine) @ corners)[:3], axis=0).max())
    tolerance = PAIR_TOLERANCE * max(hr.spacing)
    if apart > tolerance:
        raise ValueError(f"{problem}fields of view {apart:.3g} mm apart at a corner (tolerance {tolerance:.3g} mm)")


def evaluate_pair(
    model: SRModel | str | Path,
    lr: str | Path,
    hr: str | Path,
    *,
    precision: str = "auto",
    kspace_consistency: bool | None = None,
    adapt_seconds: float = 0.0,
    device: str = "cpu",
    uncertainty: bool = False,
) -> Evaluation:
    """Score a model next to the baselines on a real LR/HR pair: two scans of one subject over the same field of
    view, the HR at the model's scale. Nothing is simulated: every method upsamples the given LR to the HR grid
    (:func:`check_pair`), both normalised with the LR's window (``intensity.default_window``, as ``medsr upscale``
    normalises its input). Misregistration between the two acquisitions lowers every method's score alike.
    The other arguments are those of :func:`evaluate`.

    >>> import tempfile, medsr
    >>> from medsr.samples import sample_path
    >>> lr, hr = (Path(tempfile.mkdtemp()) / name for name in ("lr.nii.gz", "hr.nii.gz"))
    >>> scan = medsr.read_volume(sample_path("mr_t1_coronal"), modality="MR")
    >>> medsr.write_volume(medsr.degrade(scan, Degradation((2, 2, 1), modality="MR")), lr)
    >>> medsr.write_volume(scan, hr)
    >>> [row["method"] for row in evaluate_pair("edsr_mr_x2", lr, hr, precision="fp32").comparison.rows]
    ['nearest', 'linear', 'cubic', 'zerofill', 'edsr_mr_x2']
    """
    from medsr.io import read_volume
    from medsr.samples import resolve_scan
    from medsr.zoo import SRModel, load_model

    where = resolve_device(device)  # a device this machine lacks: refused before any work
    model = model if isinstance(model, SRModel) else load_model(model)
    paths = resolve_scan(str(lr)), resolve_scan(str(hr))
    if paths[1] in {p for seen in _seen_scans(model) for p in seen}:
        raise ValueError(f"{paths[1]} is a scan {model.name} trained or was validated on; evaluate on another")
    low, high = (read_volume(path, modality=model.modality) for path in paths)
    check_pair(low, high, model.scale, names=(str(lr), str(hr)))
    window = default_window(low)
    low, high = (normalize(v, window).replace(meta=v.meta | {"window": window}) for v in (low, high))
    options = dict(precision=precision, kspace_consistency=kspace_consistency, adapt_seconds=adapt_seconds)
    options |= {"uncertainty": uncertainty}
    slab = Slab(0, high.spatial_shape[2], 2)
    return _score_model(model, high, low, slab, scan=str(hr), lr_scan=str(lr), sources=paths, device=where, **options)


def _score_model(
    model: SRModel,
    hr: Volume,
    lr: Volume,
    where: Slab,
    *,
    scan: str,
    sources: Sequence[Path],
    device: torch.device,
    precision: str,
    kspace_consistency: bool | None,
    adapt_seconds: float,
    uncertainty: bool,
    lr_scan: str | None = None,
) -> Evaluation:
    """The model (and its copy adapted to ``lr``) next to the baselines on one slab: what :func:`evaluate` and
    :func:`evaluate_pair` share."""
    from medsr.infer import model_predictor
    from medsr.pipeline import weights_digest

    def predictor(network: torch.nn.Module) -> Predictor:
        return model_predictor(on_device(network, device), precision=precision)

    degradation = model.degradation
    models = {model.name: predictor(model.network)}
    adapted = None
    if adapt_seconds > 0:
        from medsr.adapt import adapt
        from medsr.intensity import denormalize

        try:
            adapted = adapt(model, denormalize(lr, hr.meta["window"]), seconds=adapt_seconds, precision=precision)
        except ValueError as error:  # too small to make LLR pairs from: scored without
            LOG.warning("%s: not adapted: %s", scan, error)
        else:
            models[f"{model.name}+adapted"] = predictor(adapted.model.network)
    kspace = kspace_applies(degradation) if kspace_consistency is None else kspace_consistency
    comparison = score_methods(
        hr, lr, degradation, models, where, spatial_dims=model.config.model.spatial_dims, extras=True, kspace=kspace
    )
    trusted = None
    if uncertainty:
        from medsr.uncertainty import maps, trust

        scale = {"model_scale": model.model_scale, "scale": integer_scale(degradation.factors)}
        result = maps(models[model.name], lr, degradation, consistency=kspace, progress=False, **scale)
        trusted = trust(result, hr, model.description.get("uncertainty", {}).get("factors"))
    if adapted is not None:  # what --adapt gives: the fine-tuned model, or the model itself when it was not kept
        row = next(row for row in comparison.rows if row["method"] == f"{model.name}+adapted")
        row |= {"adapt_seconds": adapted.seconds, "adapt_steps": adapted.steps, "adapt_kept": adapted.kept}
    digests = {str(path): scan_digest(path) for path in sources}
    window, digest = hr.meta["window"], weights_digest(model)
    return Evaluation(
        model.name, scan, degradation, where, comparison, window, lr_scan, digests, digest, model.card, trusted
    )
