"""Tables, figures and an HTML report a person can read.

* Text: ``format_table``; ``summary_rows`` (mean ± std per method) and ``difference_rows`` (model minus each
  baseline, paired, with a t confidence interval), which feed both the text table and the HTML report.
* Figures (matplotlib, written atomically as PNG): ``comparison_figure`` (side by side with a zoomed detail, one or
  more slices), ``error_map_figure`` (|method - HR| on one colour scale, one or more slices), ``profile_figure``
  (intensities along a line across the strongest edge), ``degradation_figure`` (HR | LR | difference).
* ``write_html_report``: one self-contained HTML file with the setup, the tables, the figures, the model card and
  the provenance; ``write_evaluation``: that report, the scores as CSV/JSON and the figures of an evaluation.
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
from medsr.uncertainty import Trust
from medsr.zoo import is_through_plane, upscaled_axes

# The score columns medsr reports, in display order: name -> (heading, number format); {unit} in a heading is the
# intensities' physical unit (HU for CT). For the errors (RMSE, MAE, HFEN, LR consistency) lower is better.
METRICS = {
    "psnr": ("PSNR (dB)", "{:.2f}"),
    "ssim": ("SSIM", "{:.4f}"),
    "psnr_body": ("PSNR body (dB)", "{:.2f}"),
    "ssim_body": ("SSIM body", "{:.4f}"),
    "rmse_body": ("RMSE body ({unit})", "{:#.4g}"),
    "mae_body": ("MAE body ({unit})", "{:#.4g}"),
    "ssim3d": ("3D SSIM", "{:.4f}"),
    "hfen": ("HFEN", "{:.4f}"),
    "hf_ratio": ("HF energy / HR", "{:.3f}"),  # detail energy relative to HR: 1 is as sharp as HR
    "lr_rmse": ("LR consistency RMSE", "{:.4f}"),  # the output degraded again, against its LR input
}
# What each score means, for the note under the report's tables (only the scores it shows).
_EXPLAINED = {
    "psnr": "PSNR and SSIM: higher is better.",
    "rmse_body": "RMSE and MAE body: root-mean-square and mean absolute error inside the mask, in {unit} (the "
    "normalised error times the window's width); lower is better.",
    "hfen": "HFEN (high-frequency error norm, Ravishankar and Bresler 2011): relative error of the "
    "Laplacian-of-Gaussian-filtered image, lower is better.",
    "hf_ratio": "HF energy / HR: energy above the LR's band relative to HR's, over the slab; 1 is as much detail "
    "as HR, below 1 blurred, above 1 noise or invented detail.",
    "lr_rmse": "LR consistency RMSE: the output degraded again as the LR was made (or, for a real LR, as the model "
    "assumes), against that LR, over the slab, normalised intensities; lower is more faithful to what was "
    "measured.",
}
_MISSING = "\N{EN DASH}"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def format_table(
    rows: Sequence[Mapping[str, object]], columns: Sequence[str], headings: Sequence[str] | None = None
) -> str:
    """A fixed-width text table; metric columns get their usual precision (PSNR 2 decimals, SSIM 4). ``headings``:
    what to print above each column instead of its name."""

    def cell(row: Mapping[str, object], column: str) -> str:
        value = row.get(column, _MISSING)
        return METRICS.get(column, (column, "{}"))[1].format(value) if isinstance(value, float) else str(value)

    headings = list(columns if headings is None else headings)
    cells = [[cell(row, c) for c in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headings)]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headings, widths, strict=True)))]
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


def _stack(image: torch.Tensor) -> torch.Tensor:
    """An (I, J) slice as a stack of one, (1, I, J); an (S, I, J) stack as it is."""
    return image[None] if image.ndim == 2 else image


def comparison_figure(
    path: Path, panels: Mapping[str, torch.Tensor], *, title: str = "", labels: Sequence[str] = ()
) -> None:
    """Side-by-side panels of one or more slices: per slice, a row of whole views above a row of the same zoomed
    detail; atomic write.

    Args:
        path: PNG to write.
        panels: Title -> (I, J) slice, or (S, I, J) for S slices, all covering the same field of view (the first
            may be the coarser LR). The last panel is taken as the reference (HR) for choosing each zoom box. Shown
            in the neurological convention for RAS volumes: i (Right) to the right, j (Anterior) up.
        title: Figure title (say the degradation and scale).
        labels: One per slice, written beside its rows, e.g. "slice 12".
    """
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    stacks = {name: _stack(image) for name, image in panels.items()}
    reference = list(stacks.values())[-1]
    count, full_i, full_j = reference.shape
    size = max(8, min(full_i, full_j) // 4)
    inches = 3.0 if count == 1 else 2.3  # per panel: three slices stay about one screen high
    figure, axes = plt.subplots(
        2 * count,
        len(stacks),
        figsize=(inches * len(stacks), inches * count * (full_j / full_i + 1) + 0.4),
        squeeze=False,
        gridspec_kw={"height_ratios": [full_j / full_i, 1] * count},
    )
    for row in range(count):
        box_i, box_j = detail_box(reference[row], size)
        low, high = np.percentile(reference[row].numpy(), [0.5, 99.5])
        # Every panel spans the same field of view, whatever its voxel count (the LR has fewer).
        shown = dict(cmap="gray", vmin=low, vmax=high, extent=(0, full_i, 0, full_j))
        for column, (name, stack) in enumerate(stacks.items()):
            whole, zoom = axes[2 * row, column], axes[2 * row + 1, column]
            _show(whole, stack[row], **shown)
            whole.add_patch(Rectangle((box_i, box_j), size, size, fill=False, edgecolor="yellow", linewidth=1))
            _show(zoom, stack[row], **shown)
            zoom.set_xlim(box_i, box_i + size)
            zoom.set_ylim(box_j, box_j + size)
            for spine in zoom.spines.values():
                spine.set_edgecolor("yellow")
            if row == 0:
                whole.set_title(f"{name} ({stack.shape[1]}x{stack.shape[2]})", fontsize=9)
                zoom.set_title(f"{name}, zoom x{full_i / size:.0f}", fontsize=8)
        if labels:
            axes[2 * row, 0].set_ylabel(labels[row], fontsize=9)
    _save(figure, path, title)


def _check_same_grid(hr: torch.Tensor, methods: Mapping[str, torch.Tensor]) -> None:
    if hr.ndim not in (2, 3):
        raise ValueError(f"hr must be an (I, J) slice or (S, I, J) slices, got shape {tuple(hr.shape)}")
    for name, image in methods.items():
        if image.shape != hr.shape:
            raise ValueError(f"{name}: shape {tuple(image.shape)} is not the HR grid {tuple(hr.shape)}")


def error_map_figure(
    path: Path,
    hr: torch.Tensor,
    methods: Mapping[str, torch.Tensor],
    *,
    title: str = "",
    labels: Sequence[str] = (),
    unit: str = "image intensity units",
) -> None:
    """|method - HR| per method (columns) and slice (rows), all on one colour scale with one colourbar; atomic write.

    The scale runs from 0 to the 99.5th percentile of all the errors pooled, so that a few hot voxels do not wash
    out every map; larger errors show in the top colour (the colourbar's arrow). Same view as
    ``comparison_figure``: i to the right, j up.

    Args:
        path: PNG to write.
        hr: (I, J) reference slice, or (S, I, J) slices.
        methods: Name -> slices on the HR grid, shaped as ``hr`` (baselines and model), in display order.
        title: Figure title (say the degradation).
        labels: One per slice, written beside its row, e.g. "slice 12".
        unit: Of the intensities (e.g. "HU"), named on the colourbar.
    """
    _check_same_grid(hr, methods)
    plt = _pyplot()
    reference = _stack(hr).double()
    errors = {name: (_stack(image).double() - reference).abs() for name, image in methods.items()}
    vmax = float(np.percentile(torch.cat([e.flatten() for e in errors.values()]).numpy(), 99.5)) or 1.0
    count, full_i, full_j = reference.shape
    inches = 2.6 if count == 1 else 2.2
    figure, axes = plt.subplots(
        count, len(errors), figsize=(inches * len(errors) + 1.0, count * inches * full_j / full_i + 0.8), squeeze=False
    )
    figure.set_layout_engine("constrained")
    for row in range(count):
        for ax, (name, error) in zip(axes[row], errors.items(), strict=True):
            shown = _show(ax, error[row], cmap="inferno", vmin=0.0, vmax=vmax)
            if row == 0:
                ax.set_title(f"|{name} \N{MINUS SIGN} HR|", fontsize=9)
        if labels:
            axes[row, 0].set_ylabel(labels[row], fontsize=9)
    colourbar = figure.colorbar(shown, ax=axes.ravel().tolist(), extend="max", shrink=0.9)
    colourbar.set_label(f"absolute error ({unit})", fontsize=8)
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
    unit: str = "",
) -> None:
    """Intensity profiles of HR and each method along the line of ``profile_line``, beside the HR slice showing
    where the line is; atomic write. Blurred edges show as shallow ramps, ringing as over- and undershoots.

    Args:
        path: PNG to write.
        hr: (I, J) reference slice.
        methods: Name -> (I, J) slice on the HR grid (baselines and model), in display order.
        mask: Optional (I, J) boolean body mask in which to look for the edge.
        title: Figure title.
        unit: Of the intensities (e.g. "HU"), named on the axis.
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
    plot.set_ylabel(f"intensity ({unit})" if unit else "intensity", fontsize=8)
    plot.tick_params(labelsize=7)
    plot.legend(fontsize=8)
    plot.grid(alpha=0.3)
    _save(figure, path, title)


def held_out_text(scan: str, slab: Slab | None, slice_axis: int = 2) -> str:
    """How a held-out set is named in cards and tables: a scan's region, or (None) a whole scan never seen; a
    through-plane model scored across another axis than k says which.

    >>> held_out_text("mr_t1_coronal", None, 1)
    'mr_t1_coronal (whole scan, never seen; j as the slice axis)'
    """
    across = "" if slice_axis == 2 else f"; {'ijk'[slice_axis]} as the slice axis"
    return f"{scan} (whole scan, never seen{across})" if slab is None else f"{scan}, {slab}{across}"


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
    recipe = ", bf16" if train.bf16 else ""  # then the augmentations
    if tuple(data.gamma) != (1.0, 1.0):
        recipe += f", intensity gamma {data.gamma[0]:g}..{data.gamma[1]:g}"
    if data.contrasts:
        recipe += f", {data.contrasts} random intensity curves (contrasts)"
    if tuple(data.slice_axes) != (2,):
        turned = ", ".join("ijk"[a] for a in data.slice_axes)
        in_plane = config.degradation.factors[2] == 1
        recipe += f", planes perpendicular to {turned}" if in_plane else f", thick slices across {turned}"
    if tuple(data.zooms) != (1.0,):
        recipe += f", voxels {', '.join(f'{z:g}' for z in data.zooms)}x the training scans'"
    if tuple(data.blurs) != (0.0,):
        recipe += f", Gaussian blur of {', '.join(f'{b:g}' for b in data.blurs)} voxels"
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
  {train.schedule} decay, {train.loss} loss, seed {train.seed}{recipe}, on CPU. Best
  validation step {description["step"]} (validation PSNR {validation.get("psnr", float("nan")):.2f} dB, bicubic
  {validation.get("psnr_cubic", float("nan")):.2f} dB).

## Held-out scores

Data never seen in training or model selection, degraded as above. PSNR (dB) and SSIM per 2D (i, j) slice,
averaged, and SSIM over the slab in 3D (slabs of 11 slices or more); HFEN (high-frequency error norm, lower is
better) per slice; `data_range = 1` on normalised intensities; `*_body` inside the dilated foreground mask.
Inference in {precision} (`--precision auto` picks bf16 on CPUs with bf16 instructions){consistency}.

{tables}

{_uncertainty_section(name, description.get("uncertainty"))}## Intended use and limits

- {config.card.intended_use or "See the degradation above: the model inverts that and nothing else."}{limits}
- Not a diagnostic device. Super-resolution adds no information the scanner did not measure; the scores above
  measure agreement with high-resolution references of a few scans.

Reproduce: `medsr train configs/{name}.yaml --out runs/{name}`, copy `runs/{name}/best` to
`src/medsr/weights/{name}`, then `medsr models --evaluate {name}` (scores, this card).
"""


def _uncertainty_section(name: str, record: Mapping | None) -> str:
    """The model card's account of its calibrated uncertainty (``uncertainty.calibrate``), or nothing."""
    if record is None:
        return ""
    from medsr.uncertainty import CALIBRATION_COLUMNS, calibration_rows

    table = format_table(calibration_rows(name, record), CALIBRATION_COLUMNS[1:])
    return f"""## Uncertainty (`medsr upscale --uncertainty`)

sigma = sqrt(a^2 spread^2 + b^2): the spread of the prediction under flips and quarter turns, scaled on each scan
one scale down (its LR degraded once more). The {1 - record["alpha"]:.0%} interval is output +- {record["factor"]:.3g}
sigma, the split-conformal factor over all voxels of the sets below (equal weight each). Coverage of each set: with
the factor calibrated on the other sets (leave one out); Spearman: rank correlation of sigma with the true error
(the ceiling: that of the true local error, which the HR's own noise limits).

```
{table}
```

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


# Sets data-images-loaded, data-tables-clipped and data-errors on <html> for automated checks
# (tests/test_report_html.py): how many images decoded, how many shown tables are wider than the page (they scroll),
# and how many error events (failed image loads, script errors; captured, as they do not bubble).
_CHECK_SCRIPT = """addEventListener("error", () => {
  const data = document.documentElement.dataset;
  data.errors = Number(data.errors || 0) + 1;
}, true);
addEventListener("load", () => {
  const data = document.documentElement.dataset;
  data.imagesLoaded = [...document.images].filter((i) => i.naturalWidth > 0).length;
  data.tablesClipped = [...document.querySelectorAll(".scroll")].filter((d) => d.scrollWidth > d.clientWidth).length;
});"""

_STYLE = """body { font: 14px/1.45 system-ui, sans-serif; color: #222; max-width: 1200px; margin: 2em auto; }
body { padding: 0 1em; } .scroll { overflow-x: auto; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
dl.setup { display: grid; grid-template-columns: max-content 1fr; gap: 0.2em 1em; }
dl.setup dt { font-weight: 600; } dl.setup dd { margin: 0; white-space: pre-line; overflow-wrap: anywhere; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; margin: 0.5em 0; }
th, td { padding: 0.25em 0.7em; border-bottom: 1px solid #e4e4e4; text-align: right; vertical-align: top; }
th { vertical-align: bottom; }
th:first-child, td:first-child { text-align: left; } thead th { border-bottom: 2px solid #999; }
td span { white-space: nowrap; } table.stacked td span { display: block; }
.note { color: #555; font-size: 0.9em; max-width: 60em; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
pre.card { white-space: pre-wrap; background: #f7f7f7; padding: 0.8em 1em; font-size: 0.85em; }"""


def _html_table(
    columns: Sequence[str], headings: Sequence[str], rows: Sequence[Mapping[str, object]], *, stacked: bool = False
) -> str:
    """An HTML table of text cells (escaped); numbers are formatted as in ``format_table``, missing cells a dash.
    Cells wrap after their first word only, so that a table fits the page ("42.31" above "± 0.95"); ``stacked``
    cells always do."""

    def cell(row: Mapping[str, object], column: str) -> str:
        if column not in row:
            return _MISSING
        value = row[column]
        return METRICS[column][1].format(value) if column in METRICS and isinstance(value, float) else str(value)

    def wrapping(text: str) -> str:  # a narrow window breaks a cell only after its first word: 42.31 | ± 0.95
        first, space, rest = text.partition(" ")
        return escape(first) + (f" <span>{escape(rest)}</span>" if space else "")

    head = "".join(f"<th>{escape(h)}</th>" for h in headings)
    body = "\n".join("<tr>" + "".join(f"<td>{wrapping(cell(row, c))}</td>" for c in columns) + "</tr>" for row in rows)
    table = '<table class="stacked">' if stacked else "<table>"
    return f'<div class="scroll">{table}\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table></div>'


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
    physical_unit: str = "physical units",
    model_card: str | None = None,
    provenance: Mapping[str, str] | None = None,
) -> None:
    """Write one self-contained HTML report (figures embedded as PNG data URIs), atomically.

    It states what was evaluated (the honesty rules of the design: model, baselines on the same data, degradation,
    data range, mask, held-out split), then a table of mean ± std per method, model minus each baseline paired by
    ``unit`` with a Student t interval, the figures, every row, the model card and the provenance (``provenance``,
    then the medsr version and the date). All text is HTML-escaped.

    Args:
        path: HTML file to write.
        rows: One row per method and item: ``method``, the ``unit`` column naming the item (e.g. a slice index or
            a scan name) and scores named as in ``METRICS`` (``psnr``, ``ssim``, ``psnr_body``, ``ssim_body``,
            ``rmse_body``, ``mae_body``, ``ssim3d``, ``hfen``, ``hf_ratio``, ``lr_rmse``). A score may be missing
            from some rows (e.g. the slab-wide ``ssim3d`` only on a slab row).
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
        physical_unit: Unit of ``rmse_body`` and ``mae_body``, e.g. "HU".
        model_card: The model card (Markdown), shown as it is.
        provenance: What made the report, e.g. ``{"Command line": ..., "Model weights SHA-256": ...}``.
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
    headings = [METRICS[m][0].format(unit=physical_unit) for m in metrics]
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
    explained = [text.format(unit=physical_unit) for metric, text in _EXPLAINED.items() if metric in metrics]
    made = {**(provenance or {}), "medsr version": version, "Written": written}
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
        _definitions(setup),
        "<h2>Scores: mean ± std</h2>",
        _html_table(["method", "n", *metrics], ["method", "n", *headings], summary, stacked=True),
        f"<h2>{escape(model)} minus each baseline: mean [{confidence:.0%} CI]</h2>",
        _differences_html(differences, metrics, headings, unit),
        f'<p class="note">{escape(" ".join(explained))} An interval that excludes 0 means the difference is '
        f"unlikely to be chance variation between {escape(unit)}s (under the independence assumption above).</p>",
        *(["<h2>Figures</h2>", *(_figure_html(caption, file) for caption, file in figures.items())] if figures else []),
        f"<details>\n<summary>Scores per {escape(unit)} ({len(rows)} rows)</summary>",
        _html_table(["method", unit, *metrics], ["method", unit, *headings], rows),
        "</details>",
        *([f'<h2>Model card</h2>\n<pre class="card">{escape(model_card)}</pre>'] if model_card else []),
        "<h2>Provenance</h2>",
        _definitions(made),
        "</body>\n</html>\n",
    ]
    write_bytes(Path(path), "\n".join(parts).encode("utf-8"))


def _differences_html(
    differences: Sequence[Mapping[str, str]], metrics: Sequence[str], headings: Sequence[str], unit: str
) -> str:
    """``difference_rows`` as a table with one row per score (that has pairs) and a column per baseline, so that
    it stays as narrow as the page however many scores there are."""
    columns = [row["method"] for row in differences]
    scores = [
        {"score": heading} | {row["method"]: row[metric] for row in differences}
        for metric, heading in zip(metrics, headings, strict=True)
        if any(not row[metric].startswith(_MISSING) for row in differences)
    ]
    if not scores:
        return f'<p class="note">Fewer than two {escape(unit)}s were scored, so there are no paired differences.</p>'
    paired = {"score": f"paired {unit}s"} | {row["method"]: row["n"] for row in differences}
    return _html_table(["score", *columns], ["score", *columns], [paired, *scores])


def _definitions(items: Mapping[str, str]) -> str:
    """A two-column list of names and (escaped) values."""
    return "\n".join(
        ['<dl class="setup">', *(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in items.items()), "</dl>"]
    )


SCORE_COLUMNS = (
    "method",
    "psnr",
    "ssim",
    "psnr_body",
    "ssim_body",
    "rmse_body",
    "mae_body",
    "ssim3d",
    "hfen",
    "hf_ratio",
    "lr_rmse",
)
_PHYSICAL = ("rmse_body", "mae_body")  # the scores in physical units (HU for CT)


def intensity_unit(modality: str) -> str:
    """The unit of a modality's intensities: HU for CT, else the scanner's own arbitrary units as stored (MR signal,
    ultrasound grey level, X-ray pixel value).

    >>> intensity_unit("CT"), intensity_unit("MR")
    ('HU', 'a.u.')
    """
    return "HU" if modality == "CT" else "a.u."


def _intensities(evaluation: Evaluation) -> str:
    """How the scores' intensities were normalised: the window, in physical units, and where it came from."""
    window, unit = evaluation.window, intensity_unit(evaluation.degradation.modality)
    lr = "real LR scan" if evaluation.lr else "simulated LR"
    source = (
        f"CT's fixed window; below {window.floor:g} HU raised to it"
        if window.floor is not None
        else f"the {lr}'s 0.5th..99.9th percentiles"
    )
    return f"normalised to [0, 1] from {window.lo:.4g}..{window.hi:.4g} {unit} ({source})"


def _data(evaluation: Evaluation) -> str:
    """The scan, slab and LR in a few words, for captions."""
    if evaluation.lr:
        return f"{evaluation.scan}, {evaluation.slab}, with its real LR {evaluation.lr} (nothing simulated)"
    simulated = summary(evaluation.degradation)
    if evaluation.degradation.factors[2] > 1 and evaluation.slab.axis != 2:  # evaluate(slice_axis=...)
        simulated += f", its {'ijk'[evaluation.slab.axis]} axis taking the place of k"
    return f"{evaluation.scan}, held-out slab {evaluation.slab}, LR simulated: {simulated}"


def scores_text(evaluation: Evaluation) -> str:
    """The printed table of an :func:`~medsr.evaluation.evaluate` or :func:`~medsr.evaluation.evaluate_pair`
    result, under a caption naming the scan, slab, LR, data range, intensity window and mask."""
    unit = intensity_unit(evaluation.degradation.modality)
    caption = (
        f"{_data(evaluation)}; PSNR/SSIM/HFEN per 2D slice, SSIM 3D over the slab, data_range 1 on intensities "
        f"{_intensities(evaluation)}; *_body: within the dilated foreground mask, rmse/mae in {unit}"
    )
    rows = evaluation.comparison.rows
    headings = [f"{c}[{unit}]" if c in _PHYSICAL else c for c in SCORE_COLUMNS]
    table = format_table(rows, SCORE_COLUMNS, headings)
    text = f"\n{caption}\n\n{table}\n{evaluation.model}: {gain_text(evaluation.model, rows)}"
    return text if evaluation.trust is None else f"{text}\n{trust_text(evaluation.trust)}"


def trust_text(trusted: Trust) -> str:
    """One line: how the uncertainty map ranks the true error, and the calibrated 90 % interval's coverage."""
    coverage = trusted.coverage.get("0.9")
    interval = (
        f"the calibrated 90 % interval holds {coverage:.1%} of the voxels"
        if coverage is not None
        else "no calibrated interval (the model has no calibration: medsr models NAME --calibrate)"
    )
    rho = [_correlation(v) for v in (trusted.spearman, trusted.spearman_body, trusted.spearman_ceiling)]
    return (
        f"uncertainty: Spearman(sigma, |error|) {rho[0]} over all voxels, {rho[1]} in the body mask (ceiling from "
        f"the true local error {rho[2]}); {interval}"
    )


def _correlation(value: float | None) -> str:
    return "- (constant)" if value is None else f"{value:.2f}"


def write_evaluation(evaluation: Evaluation, directory: Path, *, command_line: str | None = None) -> None:
    """scores.csv/json (means per method), per_slice.csv/json, the figures and report.html: a new ``directory``
    that appears complete or not at all (an existing one is replaced as a whole). ``command_line``: what ran it,
    for the report's provenance (None: called from Python)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(directory, folder=True) as tmp:
        _write_evaluation(evaluation, tmp, command_line)


def _write_scores(path: Path, rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> None:
    """``rows`` as ``path``.csv (``columns`` first, then any others as they come) and ``path``.json."""
    columns = list(dict.fromkeys([*columns, *(key for row in rows for key in row)]))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes(path.with_suffix(".csv"), text.getvalue().encode())
    write_bytes(path.with_suffix(".json"), (json.dumps(rows, indent=2) + "\n").encode())


FIGURE_SLICES = 3  # slices shown in the comparison and error figures, spread over the slab


def figure_slices(depth: int) -> list[int]:
    """Which of a slab's ``depth`` slices the figures show: the middles of its thirds (fewer for thin slabs).

    >>> figure_slices(1), figure_slices(40)
    ([0], [6, 20, 33])
    """
    return sorted({(2 * n + 1) * depth // (2 * FIGURE_SLICES) for n in range(FIGURE_SLICES)})


def evaluation_figures(evaluation: Evaluation, directory: Path) -> dict[str, Path]:
    """Write the figures of an evaluation into ``directory``: caption -> PNG, in display order (the comparison
    and the error maps on ``figure_slices`` of the slab, the profile on its middle slice)."""
    degradation, slab, images = evaluation.degradation, evaluation.slab, evaluation.comparison.images
    depth = images["hr"].shape[0]
    shown = figure_slices(depth)
    labels = [f"slice {slab.k_index(k)}" for k in shown]
    strongest = strongest_baseline(degradation)
    methods = [strongest, *(m for m in images if m not in ("lr", "hr", *baselines(degradation)))]
    lr_shown = [k * images["lr"].shape[0] // depth for k in shown]  # the thick slice holding each
    unit = intensity_unit(degradation.modality)
    title = f"{evaluation.scan}: {'real LR' if evaluation.lr else summary(degradation)}"
    where = f"slice{'s' * (len(shown) > 1)} {', '.join(str(slab.k_index(k)) for k in shown)}"
    figures = {
        f"Side by side, each slice with a zoomed detail ({where})": directory / "comparison.png",
        f"Absolute error against HR in {unit} ({where})": directory / "error_map.png",
        f"Intensity profile across the strongest edge (slice {slab.k_index(depth // 2)})": directory / "profile.png",
    }
    paths = iter(figures.values())
    panels = {"LR": images["lr"][lr_shown, 0]} | {name: images[name][shown, 0] for name in methods}
    comparison_figure(next(paths), panels | {"HR": images["hr"][shown, 0]}, title=title, labels=labels)
    hr = evaluation.window.to_physical(images["hr"][:, 0])  # (K, I, J) in physical units
    physical = {name: evaluation.window.to_physical(images[name][:, 0]) for name in methods}
    at = {name: image[shown] for name, image in physical.items()}
    error_map_figure(next(paths), hr[shown], at, title=title, labels=labels, unit=unit)
    middle = depth // 2
    mask = body_mask(images["hr"][middle : middle + 1])[0, 0]
    at = {name: image[middle] for name, image in physical.items()}
    profile_figure(next(paths), hr[middle], at, mask=mask, title=title, unit=unit)
    return figures


def trust_figure(
    path: Path, maps: Mapping[str, torch.Tensor], *, title: str = "", labels: Sequence[str] = (), unit: str
) -> None:
    """The trust maps beside the true error, per slice (rows): |error| and sigma on one colour scale (0 to the 99.5th
    percentile of both), the consistent and the contradicting detail on one signed scale; atomic write.

    Args:
        maps: ``error``, ``sigma``, ``consistent``, ``residual``: (S, I, J) each, in ``unit``.
        labels: One per slice, e.g. "slice 12".
    """
    plt = _pyplot()
    count, full_i, full_j = maps["error"].shape
    top = float(np.percentile(torch.cat([maps[k].flatten() for k in ("error", "sigma")]).numpy(), 99.5)) or 1.0
    signed = float(
        np.percentile(torch.cat([maps[k].abs().flatten() for k in ("consistent", "residual")]).numpy(), 99.5)
    )
    panels = {
        "error": ("|output \N{MINUS SIGN} HR|", "inferno", 0.0, top),
        "sigma": ("uncertainty (sigma)", "inferno", 0.0, top),
        "consistent": ("added, consistent", "RdBu_r", -(signed or 1.0), signed or 1.0),
        "residual": ("contradicts the input", "RdBu_r", -(signed or 1.0), signed or 1.0),
    }
    inches = 2.2
    figure, axes = plt.subplots(
        count, 4, figsize=(inches * 4 + 1.6, count * inches * full_j / full_i + 0.8), squeeze=False
    )
    figure.set_layout_engine("constrained")
    shown = {}
    for row in range(count):
        for ax, (key, (heading, cmap, low, high)) in zip(axes[row], panels.items(), strict=True):
            shown[key] = _show(ax, maps[key][row], cmap=cmap, vmin=low, vmax=high)
            if row == 0:
                ax.set_title(heading, fontsize=9)
        if labels:
            axes[row, 0].set_ylabel(labels[row], fontsize=9)
    for keys, label in ((("error", "sigma"), f"{unit}"), (("consistent", "residual"), f"signed ({unit})")):
        bar = figure.colorbar(
            shown[keys[0]], ax=axes[:, [list(panels).index(k) for k in keys]].ravel().tolist(), extend="max", shrink=0.9
        )
        bar.set_label(label, fontsize=8)
        bar.ax.tick_params(labelsize=7)
    _save(figure, path, title)


def calibration_figure(path: Path, coverage: Mapping[str, float], *, title: str = "") -> None:
    """Observed against expected coverage of the calibrated intervals (the diagonal is perfect calibration);
    ``coverage``: {expected level as text, e.g. "0.9": observed share of voxels inside}. Atomic write."""
    plt = _pyplot()
    expected = [float(level) for level in coverage]
    figure, ax = plt.subplots(figsize=(3.6, 3.4))
    figure.set_layout_engine("constrained")
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, label="perfect calibration")
    ax.plot(expected, list(coverage.values()), "o-", color="C3", label="this scan")
    ax.set(xlim=(0.4, 1.0), ylim=(0.4, 1.0), xlabel="expected coverage", ylabel="observed coverage")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(figure, path, title)


def trust_figures(evaluation: Evaluation, directory: Path) -> dict[str, Path]:
    """The trust maps beside the error (:func:`trust_figure`) and, for a calibrated model, the calibration plot;
    captions carry the rank correlation of sigma with the error and the 90 % interval's coverage."""
    trusted, slab = evaluation.trust, evaluation.slab
    shown = figure_slices(trusted.maps["error"].shape[3])
    labels = [f"slice {slab.k_index(k)}" for k in shown]
    width = evaluation.window.hi - evaluation.window.lo
    unit = intensity_unit(evaluation.degradation.modality)
    at = {
        key: trusted.maps[key][0][..., shown].permute(2, 0, 1) * width
        for key in ("error", "sigma", "consistent", "residual")
    }
    rho = (
        f"Spearman rank correlation of sigma with |output - HR| over all voxels {_correlation(trusted.spearman)}, "
        f"within the body mask {_correlation(trusted.spearman_body)} (the true local error, its 5 x 5 neighbours' "
        f"RMS, reaches {_correlation(trusted.spearman_ceiling)}: the HR's own noise limits any map)"
    )
    maps_png = directory / "trust_maps.png"
    figures = {f"Trust maps beside the true error, in {unit}. {rho}": maps_png}
    trust_figure(maps_png, at, title=f"{evaluation.scan}: {evaluation.model}", labels=labels, unit=unit)
    if trusted.coverage:
        covered = trusted.coverage.get("0.9")
        caption = (
            "Calibration: the share of voxels inside output +- factor x sigma, for the model's conformal factor of "
            f"each expected coverage (calibrated on its held-out sets by medsr models --calibrate); 90 %: {covered:.1%}"
        )
        figures[caption] = directory / "calibration.png"
        calibration_figure(figures[caption], trusted.coverage, title=f"{evaluation.scan}: {evaluation.model}")
    return figures


def _write_evaluation(evaluation: Evaluation, directory: Path, command_line: str | None) -> None:
    model, degradation, comparison = evaluation.model, evaluation.degradation, evaluation.comparison
    unit = intensity_unit(degradation.modality)
    rows, per_slice = ([row | {"error_unit": unit} for row in r] for r in (comparison.rows, comparison.slices))
    _write_scores(directory / "scores", rows, SCORE_COLUMNS)
    _write_scores(directory / "per_slice", per_slice, ("method", "slice", *SCORE_COLUMNS[1:]))
    if evaluation.lr:
        made = (
            f"none simulated: the LR is a real acquisition ({evaluation.lr}), which every method upsamples to the HR "
            "grid. Misregistration or motion between the two acquisitions lowers every method's score alike. "
            f"The model was trained for: {explain(degradation)}"
        )
        split = f"{evaluation.scan} and its real LR {evaluation.lr}, {evaluation.slab}, not scans the model saw"
    else:
        made = f"simulated from HR as the model was trained: {explain(degradation)}"
        split = f"{evaluation.scan}, {evaluation.slab}, held out from training and validation"
    provenance = {
        "Command line": command_line or "(none: called from Python)",
        "Model weights SHA-256": evaluation.weights_sha256,
        "Inputs: SHA-256, path": "\n".join(
            f"{digest}  {path}" + (" (its files one after another, in sorted order)" if Path(path).is_dir() else "")
            for path, digest in evaluation.sources.items()
        ),
    }
    figures = evaluation_figures(evaluation, directory)  # caption -> PNG
    if evaluation.trust is not None:
        figures |= trust_figures(evaluation, directory)
    write_html_report(
        directory / "report.html",
        comparison.slices,
        model=model,
        baselines=baselines(degradation),
        unit="slice",
        degradation=made,
        data_range=1.0,
        intensities=_intensities(evaluation),
        mask="foreground (> 5 % of the window), dilated by 2 voxels in-plane",
        split=split,
        figures=figures,
        title=f"medsr evaluation: {model} on {evaluation.scan}"
        + (", real LR (nothing simulated)" if evaluation.lr else ""),
        physical_unit=unit,
        model_card=evaluation.card,
        provenance=provenance,
    )
