"""Tables, figures and an HTML report a person can read.

* Text: ``format_table``; ``summary_rows`` (mean ± std per method) and ``difference_rows`` (model minus each
  baseline, paired, with a t confidence interval), which feed both the text table and the HTML report.
* Figures (matplotlib, written atomically as PNG): ``comparison_figure`` (side by side with a zoomed detail),
  ``error_map_figure`` (|method - HR| on one colour scale), ``profile_figure`` (intensities along a line across the
  strongest edge), ``degradation_figure`` (HR | LR | difference).
* ``write_html_report``: one self-contained HTML file with the setup, the tables and the figures.
"""

from __future__ import annotations

import base64
import csv
import datetime
import importlib.metadata
import io
import json
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path

import numpy as np
import torch

from medsr.config import config_from_dict
from medsr.consistency import kspace_applies
from medsr.degrade import explain, summary
from medsr.evaluation import Evaluation, Slab, baselines, best_baseline, body_mask, strongest_baseline
from medsr.inputs import PROJECTION
from medsr.io import atomic_output, write_bytes
from medsr.metrics import paired_difference
from medsr.zoo import is_through_plane, upscaled_axes

# The score columns medsr reports, in display order: name -> (heading, number format). HFEN is the only one for
# which lower is better.
METRICS = {
    "psnr": ("PSNR (dB)", "{:.2f}"),
    "ssim": ("SSIM", "{:.4f}"),
    "psnr_body": ("PSNR body (dB)", "{:.2f}"),
    "ssim_body": ("SSIM body", "{:.4f}"),
    "ssim3d": ("3D SSIM", "{:.4f}"),
    "hfen": ("HFEN", "{:.4f}"),
    "hf_ratio": ("HF energy / HR", "{:.3f}"),  # detail energy relative to HR: 1 is as sharp as HR
    "lr_rmse": ("LR consistency RMSE", "{:.4f}"),  # the output degraded again, against its LR input
}
_MISSING = "\N{EN DASH}"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def format_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> str:
    """A fixed-width text table; metric columns get their usual precision (PSNR 2 decimals, SSIM 4)."""

    def cell(row: Mapping[str, object], column: str) -> str:
        value = row.get(column, _MISSING)
        return METRICS.get(column, (column, "{}"))[1].format(value) if isinstance(value, float) else str(value)

    cells = [[cell(row, c) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(columns, widths, strict=True)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        lines.append("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True))))
    return "\n".join(lines)


def _mean_std(values: Sequence[float], number: str) -> str:
    """'mean ± std' (sample std, n - 1) in the metric's format; the value alone for one, a dash for none."""
    if len(values) < 2:
        return number.format(values[0]) if values else _MISSING
    return f"{number.format(np.mean(values))} ± {number.format(np.std(values, ddof=1))}"


def _counted(cells: Mapping[str, tuple[str, int]]) -> dict[str, str]:
    """Text cells from ``{metric: (text, items)}``, plus ``n``, the most items; a cell from fewer says its own n."""
    n = max((count for _, count in cells.values()), default=0)
    return {"n": str(n)} | {m: text if count in (0, n) else f"{text} (n={count})" for m, (text, count) in cells.items()}


def summary_rows(rows: Sequence[Mapping[str, object]], metrics: Sequence[str]) -> list[dict[str, str]]:
    """Mean ± sample standard deviation of each metric over each method's rows, as text; one row per method.

    Args:
        rows: One row per method and item (scan or slice): ``method`` and metric values (names from ``METRICS``).
            A metric missing from some rows (e.g. a 3D score given for a whole slab only) is summarised over the
            rows that have it, and its cell says how many, as "0.9512 (n=1)".
        metrics: Which metrics, in order.

    Returns:
        ``{"method", "n", *metrics}`` in the order the methods first appear.
    """
    groups: dict[str, list[Mapping[str, object]]] = {}
    for row in rows:
        groups.setdefault(str(row["method"]), []).append(row)
    summary = []
    for method, group in groups.items():
        values = {m: [float(r[m]) for r in group if m in r] for m in metrics}
        summary.append(
            {"method": method} | _counted({m: (_mean_std(v, METRICS[m][1]), len(v)) for m, v in values.items()})
        )
    return summary


def _scores_by_unit(rows: Sequence[Mapping[str, object]], method: str, unit: str, metric: str) -> dict[str, float]:
    """``{item: score}`` of one method and metric, the item named by the ``unit`` column (e.g. a slice index)."""
    scores: dict[str, float] = {}
    for row in rows:
        if row["method"] == method and metric in row:
            item = str(row[unit])
            if item in scores:
                raise ValueError(f"two rows for method {method!r} and {unit} {item!r}; each {unit} must be scored once")
            scores[item] = float(row[metric])
    return scores


def difference_rows(
    rows: Sequence[Mapping[str, object]],
    *,
    model: str,
    baselines: Sequence[str],
    unit: str,
    metrics: Sequence[str],
    confidence: float = 0.95,
) -> list[dict[str, str]]:
    """Model minus each baseline, paired by ``unit``, as text: 'mean [low, high]' with a Student t interval.

    Args:
        rows: As for ``summary_rows``, each also naming its item in the ``unit`` column.
        model: Method whose scores come first in each difference.
        baselines: Methods subtracted, one row each.
        unit: Column that identifies the paired items, e.g. ``"scan"`` or ``"slice"``.
        metrics: Which metrics, in order.
        confidence: Coverage of the interval (see ``metrics.paired_difference``).

    Returns:
        ``{"method": "model − baseline", "n", *metrics}`` per baseline; ``n`` counts the items both were scored
        on (a cell from fewer says its own n, as in ``summary_rows``); a dash where fewer than 2 are paired.
    """
    out = []
    for baseline in baselines:
        cells = {}
        for metric in metrics:
            ours = _scores_by_unit(rows, model, unit, metric)
            theirs = _scores_by_unit(rows, baseline, unit, metric)
            common = [item for item in ours if item in theirs]
            text = _MISSING
            if len(common) >= 2:
                d = paired_difference([ours[i] for i in common], [theirs[i] for i in common], confidence=confidence)
                signed = METRICS[metric][1].replace("{:", "{:+")
                text = f"{signed.format(d.mean)} [{signed.format(d.low)}, {signed.format(d.high)}]"
            cells[metric] = (text, len(common))
        out.append({"method": f"{model} \N{MINUS SIGN} {baseline}"} | _counted(cells))
    return out


def _upright(affine: np.ndarray, vertical_axis: int) -> bool:
    """Whether voxel index along ``vertical_axis`` increases towards world anterior/superior (then it goes up).

    Radiological displays put anterior (axial) or superior (coronal, sagittal) at the top; an unrotated DICOM
    image's rows run to posterior, so its row 0 shows at the top.
    """
    direction = affine[:3, vertical_axis]
    return bool(direction[np.argmax(np.abs(direction))] > 0)


def _save(figure, path: Path, title: str) -> None:
    """Title, lay out and write a matplotlib figure as PNG atomically; close it."""
    plt = _pyplot()
    if title:
        figure.suptitle(title, fontsize=9)
    if figure.get_layout_engine() is None:  # figures with a shared colourbar use the constrained layout instead
        figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=115, format="png")
    plt.close(figure)
    write_bytes(path, buffer.getvalue())


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _show(ax, image: torch.Tensor, **style):
    """Draw an (I, J) slice with i to the right and j up (the neurological view of RAS data), without ticks."""
    shown = ax.imshow(image.numpy().T, origin="lower", interpolation="nearest", **style)
    ax.set_xticks([])
    ax.set_yticks([])
    return shown


def detail_box(hr: torch.Tensor, size: int) -> tuple[int, int]:
    """Corner (i, j) of the ``size`` x ``size`` square of an (I, J) image with the most edge energy."""
    image = hr.double()
    gradient = (image.diff(dim=0)[:, :-1] ** 2 + image.diff(dim=1)[:-1, :] ** 2)[None, None]
    energy = torch.nn.functional.avg_pool2d(gradient, size, stride=max(1, size // 4))[0, 0]
    i, j = np.unravel_index(int(energy.argmax()), tuple(energy.shape))
    return int(i) * max(1, size // 4), int(j) * max(1, size // 4)


def comparison_figure(path: Path, panels: Mapping[str, torch.Tensor], *, title: str = "") -> None:
    """Side-by-side panels of one slice (top row) and the same zoomed detail of each (bottom row); atomic write.

    Args:
        path: PNG to write.
        panels: Title -> (I, J) slice, all covering the same field of view (the first may be the coarser LR).
            The last panel is taken as the reference (HR) for choosing the zoom box. Shown in the neurological
            convention for RAS volumes: i (Right) to the right, j (Anterior) up.
        title: Figure title (say the degradation, scale and slice).
    """
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    reference = list(panels.values())[-1]
    full_i, full_j = reference.shape
    size = max(8, min(full_i, full_j) // 4)
    box_i, box_j = detail_box(reference, size)
    low, high = np.percentile(reference.numpy(), [0.5, 99.5])
    figure, axes = plt.subplots(
        2,
        len(panels),
        figsize=(3.0 * len(panels), 6.4),
        squeeze=False,
        gridspec_kw={"height_ratios": [full_j / full_i, 1]},
    )
    for column, (name, image) in enumerate(panels.items()):
        # Every panel spans the same field of view, whatever its voxel count (the LR has fewer).
        shown = dict(cmap="gray", vmin=low, vmax=high, extent=(0, full_i, 0, full_j))
        whole, zoom = axes[0, column], axes[1, column]
        _show(whole, image, **shown)
        whole.add_patch(Rectangle((box_i, box_j), size, size, fill=False, edgecolor="yellow", linewidth=1))
        whole.set_title(f"{name} ({image.shape[0]}x{image.shape[1]})", fontsize=9)
        _show(zoom, image, **shown)
        zoom.set_xlim(box_i, box_i + size)
        zoom.set_ylim(box_j, box_j + size)
        zoom.set_title(f"{name}, zoom x{full_i / size:.0f}", fontsize=8)
        for spine in zoom.spines.values():
            spine.set_edgecolor("yellow")
    _save(figure, path, title)


def _check_same_grid(hr: torch.Tensor, methods: Mapping[str, torch.Tensor]) -> None:
    if hr.ndim != 2:
        raise ValueError(f"hr must be one (I, J) slice, got shape {tuple(hr.shape)}")
    for name, image in methods.items():
        if image.shape != hr.shape:
            raise ValueError(f"{name}: shape {tuple(image.shape)} is not the HR grid {tuple(hr.shape)}")


def error_map_figure(path: Path, hr: torch.Tensor, methods: Mapping[str, torch.Tensor], *, title: str = "") -> None:
    """|method - HR| of one slice per method, all on one colour scale with one colourbar; atomic write.

    The scale runs from 0 to the 99.5th percentile of all the errors pooled, so that a few hot voxels do not wash
    out every map; larger errors show in the top colour (the colourbar's arrow). Same view as
    ``comparison_figure``: i to the right, j up.

    Args:
        path: PNG to write.
        hr: (I, J) reference slice.
        methods: Name -> (I, J) slice on the HR grid (baselines and model), in display order.
        title: Figure title (say the slice and the degradation).
    """
    _check_same_grid(hr, methods)
    plt = _pyplot()
    errors = {name: (image.double() - hr.double()).abs() for name, image in methods.items()}
    vmax = float(np.percentile(torch.cat([e.flatten() for e in errors.values()]).numpy(), 99.5)) or 1.0
    figure, axes = plt.subplots(
        1, len(errors), figsize=(2.6 * len(errors) + 1.0, 3.0 * hr.shape[1] / hr.shape[0] + 0.6), squeeze=False
    )
    figure.set_layout_engine("constrained")
    for ax, (name, error) in zip(axes[0], errors.items(), strict=True):
        shown = _show(ax, error, cmap="inferno", vmin=0.0, vmax=vmax)
        ax.set_title(f"|{name} \N{MINUS SIGN} HR|", fontsize=9)
    colourbar = figure.colorbar(shown, ax=axes[0].tolist(), extend="max", shrink=0.9)
    colourbar.set_label("absolute error (image intensity units)", fontsize=8)
    colourbar.ax.tick_params(labelsize=7)
    _save(figure, path, title)


def profile_line(
    hr: torch.Tensor, *, mask: torch.Tensor | None = None, half_length: int = 16
) -> tuple[int | slice, int | slice]:
    """Where to take an intensity profile: a short line across the strongest edge of an (I, J) HR slice.

    The edge is the voxel with the largest gradient magnitude (central differences) inside ``mask``, e.g. the body
    mask, so that the line crosses anatomy rather than noise in the air. The line runs along the axis of the larger
    gradient component there (crossing the edge as squarely as an axis-aligned line can) and extends
    ``half_length`` voxels to each side, clipped to the image.

    Args:
        hr: (I, J) reference slice, at least 2 voxels along each axis.
        mask: Optional (I, J) boolean tensor.
        half_length: Voxels on each side of the edge.

    Returns:
        An index into (I, J) that yields the 1D profile, e.g. ``(slice(24, 57), 30)``: along i at j = 30.
    """
    gradient_i, gradient_j = torch.gradient(hr.double())
    magnitude = torch.hypot(gradient_i, gradient_j)
    if mask is not None:
        if not mask.any():
            raise ValueError("mask selects no voxels; cannot choose a profile line inside it")
        magnitude = torch.where(mask, magnitude, -1.0)
    i, j = (int(n) for n in np.unravel_index(int(magnitude.argmax()), tuple(hr.shape)))
    if abs(gradient_i[i, j]) >= abs(gradient_j[i, j]):
        return slice(max(0, i - half_length), min(hr.shape[0], i + half_length + 1)), j
    return i, slice(max(0, j - half_length), min(hr.shape[1], j + half_length + 1))


def profile_figure(
    path: Path,
    hr: torch.Tensor,
    methods: Mapping[str, torch.Tensor],
    *,
    mask: torch.Tensor | None = None,
    title: str = "",
) -> None:
    """Intensity profiles of HR and each method along the line of ``profile_line``, beside the HR slice showing
    where the line is; atomic write. Blurred edges show as shallow ramps, ringing as over- and undershoots.

    Args:
        path: PNG to write.
        hr: (I, J) reference slice.
        methods: Name -> (I, J) slice on the HR grid (baselines and model), in display order.
        mask: Optional (I, J) boolean body mask in which to look for the edge.
        title: Figure title.
    """
    _check_same_grid(hr, methods)
    plt = _pyplot()
    line = profile_line(hr, mask=mask)
    along = 0 if isinstance(line[0], slice) else 1
    fixed = line[1 - along]
    positions = np.arange(*line[along].indices(hr.shape[along]))
    figure, (view, plot) = plt.subplots(1, 2, figsize=(10.0, 4.0), gridspec_kw={"width_ratios": [1, 1.6]})
    low, high = np.percentile(hr.numpy(), [0.5, 99.5])
    _show(view, hr, cmap="gray", vmin=low, vmax=high)
    constant = np.full_like(positions, fixed)
    # imshow of the transposed slice with origin "lower" puts voxel (i, j) at x = i, y = j
    view.plot(*((positions, constant) if along == 0 else (constant, positions)), color="yellow", linewidth=1.5)
    view.set_title("HR, profile line in yellow", fontsize=9)
    plot.plot(positions, hr[line].numpy(), color="black", linewidth=2.5, label="HR")
    for name, image in methods.items():
        plot.plot(positions, image[line].numpy(), linewidth=1.2, marker=".", markersize=4, label=name)
    plot.set_xlabel(f"{'ij'[along]} (voxels), at {'ji'[along]} = {fixed}", fontsize=8)
    plot.set_ylabel("intensity", fontsize=8)
    plot.tick_params(labelsize=7)
    plot.legend(fontsize=8)
    plot.grid(alpha=0.3)
    _save(figure, path, title)


def held_out_text(scan: str, slab: Slab | None) -> str:
    """How a held-out set is named in cards and tables: a scan's region, or (None) a whole scan never seen."""
    return f"{scan} (whole scan, never seen)" if slab is None else f"{scan}, {slab}"


def model_card(name: str, description: Mapping, held_out: Sequence[Mapping], *, precision: str) -> str:
    """A Markdown model card: what the model is for, what it was trained on, held-out scores next to baselines.

    ``held_out``: one entry per held-out set, ``{"data": held_out_text(...), "rows": compare_methods rows}``.
    ``precision`` is the inference precision the scores were computed with ('fp32' or 'bf16')."""
    config = config_from_dict(description["config"])
    data, train = config.data, config.train
    kwargs = ", ".join(f"{k}={v}" for k, v in description["model_kwargs"].items())
    validation = description.get("scores", {}).get("validation", {})
    scale = description["scale"]
    factors = "x".join(str(f) for f in scale)
    in_plane = f"x{scale[0]}" if scale[0] == scale[1] else f"{scale[0]}x{scale[1]}"
    task = f"slices {scale[2]}x thinner (through-plane)" if is_through_plane(scale) else f"in-plane {in_plane}"
    patch = "x".join(str(p) for p in (data.patch * 2 if len(data.patch) == 1 else data.patch))
    axis = "ijk"[data.split_axis]
    if data.split == "region":
        split = (
            f"region split along {axis}: training {axis} {data.train_slices[0]}..{data.train_slices[1] - 1}, "
            f"validation {data.val_slices[0]}..{data.val_slices[1] - 1}, test {data.test_slices[0]}.."
            f"{data.test_slices[1] - 1}"
        )
    else:
        split = f"split by scan ({', '.join(f'{f:g}' for f in data.fractions)} train/validation/test)"
    inputs = description.get("inputs")
    if inputs:
        low, high = inputs["spacing_mm"]["min"], inputs["spacing_mm"]["max"]
        spacing = ", ".join(
            f"{'ijk'[a]} {low[a]:.3g}" + (f"..{high[a]:.3g}" if high[a] != low[a] else "") + " mm"
            for a in upscaled_axes(scale)
        )
        if description["modality"] in PROJECTION:
            spacing = "not checked (radiographs: the pixel size depends on magnification; these files give none)"
        low, high = (f"{a:.4g}" if a == b else f"{a:.4g}..{b:.4g}" for a, b in (inputs["low"], inputs["high"]))
        trained_on = (
            f"\n- **Inputs it was trained on** (LR): spacing {spacing}; intensity percentiles 0.5th {low}, 99.9th "
            f"{high} (physical units). `medsr upscale` warns outside these."
        )
    else:
        trained_on = ""
    columns = ["method", "psnr", "ssim", "psnr_body", "ssim_body", "ssim3d", "hfen"]
    tables = "\n\n".join(
        f"{entry['data']}: {gain_text(name, entry['rows'])}\n\n```\n{format_table(entry['rows'], columns)}\n```"
        for entry in held_out
    )
    limits = "".join(f"\n- {limit}" for limit in config.card.limits)
    extra = f"; whole scans for training only: {', '.join(data.extra_train_scans)}" if data.extra_train_scans else ""
    gamma = "" if tuple(data.gamma) == (1.0, 1.0) else f", intensity gamma {data.gamma[0]:g}..{data.gamma[1]:g}"
    consistency = (
        ", then the input's measured k-space band put back (k-space consistency, `medsr upscale`'s default here)"
        if kspace_applies(config.degradation)
        else ""
    )
    return f"""# Model card: {name}

- **Task**: {description["modality"]} super-resolution, {task}; scale {factors} per voxel axis (i x j x k).
- **Architecture**: `{description["model_name"]}` ({kwargs}); {description.get("parameters", "?")} parameters.
- **Training data**: {", ".join(data.scans)}; {split}{extra}.
- **Degradation learned**: {explain(config.degradation)}.{trained_on}
- **Intensities**: {description["intensity"]}.
- **Training**: {train.steps} steps, batch {data.batch_size} of {patch} HR patches, Adam lr {train.lr} with
  {train.schedule} decay, {train.loss} loss, seed {train.seed}{", bf16" if train.bf16 else ""}{gamma}, on CPU. Best
  validation step {description["step"]} (validation PSNR {validation.get("psnr", float("nan")):.2f} dB, bicubic
  {validation.get("psnr_cubic", float("nan")):.2f} dB).

## Held-out scores

Data never seen in training or model selection, degraded as above. PSNR (dB) and SSIM per 2D (i, j) slice,
averaged, and SSIM over the slab in 3D (slabs of 11 slices or more); HFEN (high-frequency error norm, lower is
better) per slice; `data_range = 1` on normalised intensities; `*_body` inside the dilated foreground mask.
Inference in {precision} (`--precision auto` picks bf16 on CPUs with bf16 instructions){consistency}.

{tables}

## Intended use and limits

- {config.card.intended_use or "See the degradation above: the model inverts that and nothing else."}{limits}
- Not a diagnostic device. Super-resolution adds no information the scanner did not measure; the scores above
  measure agreement with high-resolution references of a few scans.

Reproduce: `medsr train configs/{name}.yaml --out runs/{name}`, copy `runs/{name}/best` to
`src/medsr/weights/{name}`, then `medsr models --evaluate {name}` (scores, this card).
"""


def gain_text(name: str, rows: Sequence[Mapping]) -> str:
    """The PSNR gain of model ``name`` over the best interpolation baseline among a comparison's ``rows``.

    >>> rows = [{"method": "cubic", "psnr": 30.0}, {"method": "zerofill", "psnr": 31.0}, {"method": "sr", "psnr": 31.5}]
    >>> gain_text("sr", rows)
    '+0.50 dB PSNR over the best baseline (zerofill, 31.00 dB)'
    """
    baseline, best = best_baseline(rows)
    model = next(row["psnr"] for row in rows if row["method"] == name)
    return f"{model - best:+.2f} dB PSNR over the best baseline ({baseline}, {best:.2f} dB)"


def degradation_figure(path: Path, hr, lr, *, title: str = "") -> None:
    """HR | LR | (LR interpolated to the HR grid) - HR, for one plane, in mm at true aspect, radiological
    orientation (anterior/superior up, patient right on the left); written atomically.

    The plane is (i, j) through the middle slice, or (i, k) through the middle of j when the k axis lost
    resolution (thick slices), so the loss is visible. ``hr`` and ``lr`` are Volumes covering the same field
    of view (``lr`` from ``degrade``).
    """
    plt = _pyplot()

    through_plane = lr.spatial_shape[2] != hr.spatial_shape[2]
    upright = _upright(hr.affine, 2 if through_plane else 1)
    # Radiological convention: the patient's right on the viewer's left, so an i axis running to R is mirrored.
    right_to_left = abs(hr.affine[0, 0]) == np.abs(hr.affine[:3, 0]).max() and hr.affine[0, 0] > 0
    source = hr.meta.get("dicom")
    # MONOCHROME1 (common in CR/DX) stores high values as dark: show it as a radiologist would see it.
    grey = "gray_r" if source is not None and source.get("PhotometricInterpretation") == "MONOCHROME1" else "gray"
    upsampled = torch.nn.functional.interpolate(  # same-FOV grids: align_corners=False maps centres correctly
        lr.array[None].double(), size=hr.spatial_shape, mode="trilinear", align_corners=False
    )[0].to(hr.array.dtype)

    def plane(array: torch.Tensor) -> np.ndarray:
        return (array[0, :, array.shape[2] // 2, :] if through_plane else array[0, :, :, array.shape[3] // 2]).numpy()

    extent = (
        0,
        hr.spatial_shape[0] * hr.spacing[0],
        0,
        hr.spatial_shape[2 if through_plane else 1] * hr.spacing[2 if through_plane else 1],
    )
    low, high = np.percentile(plane(hr.array), [0.5, 99.5])
    difference = plane(upsampled) - plane(hr.array)
    limit = float(np.percentile(np.abs(difference), 99.5)) or 1.0
    figure, axes = plt.subplots(1, 3, figsize=(11, 4.2))
    panels = [
        ("HR", plane(hr.array), grey, (low, high)),
        ("LR", plane(lr.array), grey, (low, high)),
        ("LR (linear) - HR", difference, "coolwarm", (-limit, limit)),
    ]
    for ax, (name, image, cmap, (vmin, vmax)) in zip(axes, panels, strict=True):
        shown = ax.imshow(
            image.T,
            cmap=cmap,
            vmin=vmin,
            vmax=vmax,
            interpolation="nearest",
            origin="lower" if upright else "upper",
            extent=extent if upright else (extent[0], extent[1], extent[3], extent[2]),
        )
        ax.set_title(f"{name} ({image.shape[0]}x{image.shape[1]})", fontsize=9)
        if right_to_left:
            ax.invert_xaxis()
        ax.set_xlabel("i (mm)", fontsize=8)
        ax.set_ylabel(f"{'k' if through_plane else 'j'} (mm)", fontsize=8)
        ax.tick_params(labelsize=7)
    figure.colorbar(shown, ax=axes[2], fraction=0.046)
    _save(figure, path, title)


# Sets data-images-loaded and data-errors on <html> for automated checks (tests/test_report_html.py): how many
# images decoded, and how many error events (failed image loads, script errors; captured, as they do not bubble).
_CHECK_SCRIPT = """addEventListener("error", () => {
  const data = document.documentElement.dataset;
  data.errors = Number(data.errors || 0) + 1;
}, true);
addEventListener("load", () => {
  document.documentElement.dataset.imagesLoaded = [...document.images].filter((i) => i.naturalWidth > 0).length;
});"""

_STYLE = """body { font: 14px/1.45 system-ui, sans-serif; color: #222; max-width: 1200px; margin: 2em auto; }
body { padding: 0 1em; } .scroll { overflow-x: auto; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
dl.setup { display: grid; grid-template-columns: max-content 1fr; gap: 0.2em 1em; }
dl.setup dt { font-weight: 600; } dl.setup dd { margin: 0; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; margin: 0.5em 0; }
th, td { padding: 0.25em 0.7em; border-bottom: 1px solid #e4e4e4; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; } thead th { border-bottom: 2px solid #999; }
.note { color: #555; font-size: 0.9em; max-width: 60em; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; } footer { margin-top: 3em; color: #777; font-size: 0.85em; }"""


def _html_table(columns: Sequence[str], headings: Sequence[str], rows: Sequence[Mapping[str, object]]) -> str:
    """An HTML table of text cells (escaped); numbers are formatted as in ``format_table``, missing cells a dash."""

    def cell(row: Mapping[str, object], column: str) -> str:
        if column not in row:
            return _MISSING
        value = row[column]
        return METRICS[column][1].format(value) if column in METRICS and isinstance(value, float) else str(value)

    head = "".join(f"<th>{escape(h)}</th>" for h in headings)
    body = "\n".join("<tr>" + "".join(f"<td>{escape(cell(row, c))}</td>" for c in columns) + "</tr>" for row in rows)
    return f'<div class="scroll"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table></div>'


def _figure_html(caption: str, path: Path) -> str:
    """A <figure> with the PNG embedded as a base64 data URI, so the report is one file that can be mailed."""
    data = Path(path).read_bytes()
    if not data.startswith(_PNG_SIGNATURE):
        raise ValueError(f"{path}: figures must be PNG files")
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    text = escape(caption)
    return f'<figure>\n<img src="{uri}" alt="{text}">\n<figcaption>{text}</figcaption>\n</figure>'


def write_html_report(
    path: Path,
    rows: Sequence[Mapping[str, object]],
    *,
    model: str,
    baselines: Sequence[str],
    unit: str,
    degradation: str,
    data_range: float,
    intensities: str,
    mask: str,
    split: str,
    figures: Mapping[str, Path] | None = None,
    confidence: float = 0.95,
    title: str = "medsr evaluation",
) -> None:
    """Write one self-contained HTML report (figures embedded as PNG data URIs), atomically.

    It states what was evaluated (the honesty rules of the design: model, baselines on the same data, degradation,
    data range, mask, held-out split), then a table of mean ± std per method, model minus each baseline paired by
    ``unit`` with a Student t interval, the figures, and every row. All text is HTML-escaped.

    Args:
        path: HTML file to write.
        rows: One row per method and item: ``method``, the ``unit`` column naming the item (e.g. a slice index or
            a scan name) and scores named as in ``METRICS`` (``psnr``, ``ssim``, ``psnr_body``, ``ssim_body``,
            ``ssim3d``, ``hfen``). A score may be missing from some rows (e.g. ``ssim3d`` only on a slab row).
        model: The method under test; must appear in ``rows``.
        baselines: Methods it is compared with, e.g. ``("nearest", "linear", "cubic")``; each must appear in ``rows``.
        unit: Column that identifies the items the scores are paired on: ``"scan"``, ``"slice"``, ...
        degradation: How the LR input was made from HR, e.g. "k-space truncation 2x2x1, Hann window, no noise".
        data_range: The ``data_range`` passed to PSNR and SSIM.
        intensities: What the intensities are, e.g. "normalised to [0, 1] by the LR scan's 0.5-99.9th percentiles".
        mask: What ``*_body`` scores are restricted to, e.g. "foreground > 5 %, dilated by 2 voxels".
        split: Which data and why it is held out, e.g. "colin27 axial slices 150..169, never used in training or
            model selection".
        figures: Caption -> PNG file, in display order.
        confidence: Coverage of the difference intervals.
        title: Page title.
    """
    incomplete = [row for row in rows if "method" not in row or unit not in row]
    if incomplete:
        raise ValueError(f"every row needs 'method' and '{unit}' columns, got {dict(incomplete[0])}")
    methods = {str(row["method"]) for row in rows}
    absent = [m for m in (model, *baselines) if m not in methods]
    if absent:
        raise ValueError(f"no rows for method(s) {absent}; rows have {sorted(methods)}")
    unknown = sorted({key for row in rows for key in row} - {"method", unit, *METRICS})
    if unknown:
        raise ValueError(f"unknown columns {unknown} in rows; expected method, {unit} and scores among {list(METRICS)}")
    metrics = [m for m in METRICS if any(m in row for row in rows)]
    headings = [METRICS[m][0] for m in metrics]
    order = [*baselines, model]  # then any other methods in the rows, as they come (sorted is stable)
    summary = sorted(
        summary_rows(rows, metrics), key=lambda r: order.index(r["method"]) if r["method"] in order else len(order)
    )
    differences = difference_rows(
        rows, model=model, baselines=baselines, unit=unit, metrics=metrics, confidence=confidence
    )
    try:
        version = importlib.metadata.version("medsr")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was not installed
        version = "(not installed)"
    written = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    setup = {
        "Model": model,
        "Baselines": f"{', '.join(baselines)}, run on the same LR input",
        "Degradation": degradation,
        "Data range": f"{data_range:g}; intensities {intensities}",
        "Mask (*body scores)": mask,
        "Held-out data": split,
        "Statistics": (
            f"mean ± sample standard deviation over the {unit}s; differences are paired by {unit}, with a "
            f"{confidence:.0%} Student t interval of the mean, which assumes independent {unit}s (neighbouring "
            f"slices of one scan are not, so for slices the interval understates the uncertainty)"
        ),
    }
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        '<head>\n<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title>",
        f"<style>\n{_STYLE}\n</style>",
        f"<script>\n{_CHECK_SCRIPT}\n</script>",
        "</head>\n<body>",
        f"<h1>{escape(title)}</h1>",
        '<dl class="setup">',
        *(f"<dt>{escape(key)}</dt><dd>{escape(value)}</dd>" for key, value in setup.items()),
        "</dl>",
        "<h2>Scores: mean ± std</h2>",
        _html_table(["method", "n", *metrics], ["method", "n", *headings], summary),
        f"<h2>{escape(model)} minus each baseline: mean [{confidence:.0%} CI]</h2>",
        _html_table(["method", "n", *metrics], ["difference", "n", *headings], differences),
        '<p class="note">PSNR and SSIM: higher is better. HFEN (high-frequency error norm, Ravishankar and Bresler '
        "2011): relative error of the Laplacian-of-Gaussian-filtered image, lower is better. An interval that "
        f"excludes 0 means the difference is unlikely to be chance variation between {escape(unit)}s (under the "
        "independence assumption above).</p>",
        *(["<h2>Figures</h2>", *(_figure_html(caption, file) for caption, file in figures.items())] if figures else []),
        f"<details>\n<summary>Scores per {escape(unit)} ({len(rows)} rows)</summary>",
        _html_table(["method", unit, *metrics], ["method", unit, *headings], rows),
        "</details>",
        f"<footer>Written by medsr {escape(version)} on {written}.</footer>",
        "</body>\n</html>\n",
    ]
    write_bytes(Path(path), "\n".join(parts).encode("utf-8"))


SCORE_COLUMNS = ("method", "psnr", "ssim", "psnr_body", "ssim_body", "ssim3d", "hfen", "hf_ratio", "lr_rmse")


def scores_text(evaluation: Evaluation) -> str:
    """The printed table of an :func:`~medsr.evaluation.evaluate` result, under a caption naming the scan, slab,
    degradation, data range and mask."""
    caption = (
        f"{evaluation.scan}, held-out slab {evaluation.slab}, {summary(evaluation.degradation)}; PSNR/SSIM/HFEN "
        "per 2D slice, SSIM 3D over the slab, data_range 1 on intensities normalised by the LR scan's 0.5..99.9th "
        "percentiles; *_body: within the dilated foreground mask"
    )
    rows = evaluation.comparison.rows
    return (
        f"\n{caption}\n\n{format_table(rows, SCORE_COLUMNS)}\n{evaluation.model}: {gain_text(evaluation.model, rows)}"
    )


def write_evaluation(evaluation: Evaluation, directory: Path) -> None:
    """scores.csv/json (means per method), per_slice.csv/json, three figures and report.html: a new ``directory``
    that appears complete or not at all (an existing one is replaced as a whole)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(directory, folder=True) as tmp:
        _write_evaluation(evaluation, tmp)


def _write_evaluation(evaluation: Evaluation, directory: Path) -> None:
    model, scan, degradation, slab, comparison = evaluation
    for name, rows, columns in (
        ("scores", comparison.rows, SCORE_COLUMNS),
        ("per_slice", comparison.slices, ("method", "slice", *SCORE_COLUMNS[1:-2])),  # hf_ratio, lr_rmse: slab-wide
    ):
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
        write_bytes(directory / f"{name}.csv", text.getvalue().encode())
        write_bytes(directory / f"{name}.json", (json.dumps(rows, indent=2) + "\n").encode())
    images = comparison.images
    middle = images["hr"].shape[0] // 2
    hr = images["hr"][middle, 0]
    strongest = strongest_baseline(degradation)
    methods = {name: images[name][middle, 0] for name in (strongest, model)}
    title = f"slice {slab.k_index(middle)}, {summary(degradation)}"
    figures = {
        "Side by side, with a zoomed detail": directory / "comparison.png",
        "Absolute error against HR": directory / "error_map.png",
        "Intensity profile across the strongest edge": directory / "profile.png",
    }
    lr_middle = middle * images["lr"].shape[0] // images["hr"].shape[0]  # the thick slice holding it
    panels = {"LR": images["lr"][lr_middle, 0]} | {
        name: images[key][middle, 0] for name, key in ((strongest, strongest), (model, model), ("HR", "hr"))
    }
    comparison_figure(figures["Side by side, with a zoomed detail"], panels, title=title)
    error_map_figure(figures["Absolute error against HR"], hr, methods, title=title)
    mask = body_mask(images["hr"][middle : middle + 1])[0, 0]
    profile_figure(figures["Intensity profile across the strongest edge"], hr, methods, mask=mask, title=title)
    write_html_report(
        directory / "report.html",
        comparison.slices,
        model=model,
        baselines=baselines(degradation),
        unit="slice",
        degradation=summary(degradation),
        data_range=1.0,
        intensities="normalised by the LR scan's 0.5..99.9th percentiles (CT: -1024..3071 HU) to [0, 1]",
        mask="foreground (> 5 % of the window), dilated by 2 voxels in-plane",
        split=f"{scan}, {slab}, held out from training and validation",
        figures=figures,
        title=f"medsr evaluation: {model} on {scan}",
    )
