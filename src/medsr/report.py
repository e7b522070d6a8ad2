"""Tables and figures a person can read: a text table of scores and a side-by-side comparison with zoom."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

METRIC_FORMATS = {"psnr": "{:.2f}", "ssim": "{:.4f}", "psnr_body": "{:.2f}", "ssim_body": "{:.4f}"}


def format_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> str:
    """A fixed-width text table; metric columns get their usual precision (PSNR 2 decimals, SSIM 4)."""

    def cell(row: Mapping[str, object], column: str) -> str:
        value = row[column]
        return METRIC_FORMATS.get(column, "{}").format(value) if isinstance(value, float) else str(value)

    cells = [[cell(row, c) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(columns, widths, strict=True)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        lines.append("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True))))
    return "\n".join(lines)


def _upright(affine: np.ndarray, vertical_axis: int) -> bool:
    """Whether voxel index along ``vertical_axis`` increases towards world anterior/superior (then it goes up).

    Radiological displays put anterior (axial) or superior (coronal, sagittal) at the top; an unrotated DICOM
    image's rows run to posterior, so its row 0 shows at the top.
    """
    direction = affine[:3, vertical_axis]
    return bool(direction[np.argmax(np.abs(direction))] > 0)


def _save(figure, path: Path, title: str) -> None:
    """Title, lay out and write a matplotlib figure as PNG atomically (temporary file, then rename); close it."""
    import matplotlib.pyplot as plt

    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    tmp = path.with_name(f".tmp.{path.name}")
    figure.savefig(tmp, dpi=115, format="png")
    plt.close(figure)
    os.replace(tmp, path)


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
        shown = dict(
            cmap="gray", vmin=low, vmax=high, origin="lower", interpolation="nearest", extent=(0, full_i, 0, full_j)
        )
        whole, zoom = axes[0, column], axes[1, column]
        whole.imshow(image.numpy().T, **shown)
        whole.add_patch(Rectangle((box_i, box_j), size, size, fill=False, edgecolor="yellow", linewidth=1))
        whole.set_title(f"{name} ({image.shape[0]}x{image.shape[1]})", fontsize=9)
        zoom.imshow(image.numpy().T, **shown)
        zoom.set_xlim(box_i, box_i + size)
        zoom.set_ylim(box_j, box_j + size)
        zoom.set_title(f"{name}, zoom x{full_i / size:.0f}", fontsize=8)
        for ax in (whole, zoom):
            ax.set_xticks([])
            ax.set_yticks([])
        for spine in zoom.spines.values():
            spine.set_edgecolor("yellow")
    _save(figure, path, title)


def model_card(name: str, description: Mapping, rows: Sequence[Mapping], *, scan: str, slices: tuple[int, int]) -> str:
    """A Markdown model card: what the model is for, what it was trained on, held-out scores next to baselines."""
    config = description["config"]
    data, degradation, train = config["data"], config["degradation"], config["train"]
    kwargs = ", ".join(f"{k}={v}" for k, v in description["model_kwargs"].items())
    validation = description.get("scores", {}).get("validation", {})
    factors = "x".join(f"{f:g}" for f in degradation["factors"])
    table = format_table(rows, ["method", "psnr", "ssim", "psnr_body", "ssim_body"])
    return f"""# Model card: {name}

- **Task**: {description["modality"]} super-resolution by {factors} (per voxel axis i x j x k).
- **Architecture**: `{description["model_name"]}` ({kwargs}); {description.get("parameters", "?")} parameters.
- **Training data**: {", ".join(data["scans"])}, axial slices {data["train_slices"][0]}..{data["train_slices"][1] - 1}
  (k index); validation slices {data["val_slices"][0]}..{data["val_slices"][1] - 1}.
- **Degradation learned**: k-space truncation {factors}, {degradation["kspace_window"]} window, no added noise.
- **Intensities**: {description["intensity"]}.
- **Training**: {train["steps"]} steps, batch {data["batch_size"]} of {data["patch"]}x{data["patch"]} HR patches,
  Adam lr {train["lr"]} with cosine decay, {train["loss"]} loss, seed {train["seed"]}, on CPU. Best validation
  step {description["step"]} (validation PSNR {validation.get("psnr", float("nan")):.2f} dB, bicubic
  {validation.get("psnr_cubic", float("nan")):.2f} dB).

## Held-out scores

{scan}, axial slices {slices[0]}..{slices[1] - 1}, never seen in training or model selection. PSNR (dB) and SSIM
per 2D slice, averaged; `data_range = 1` on normalised intensities; `*_body` inside the dilated head mask.

```
{table}
```

## Intended use and limits

- MR magnitude images whose in-plane resolution was lost the way k-space truncation loses it (a lower
  acquisition matrix over the same field of view), upsampled x2 in-plane; slices are processed independently.
- Trained on **one subject** (Colin27, a T1 average of 27 scans: very high SNR). Noisy clinical scans, other
  contrasts (T2, FLAIR), other anatomy or other degradations (partial Fourier, thick slices) are outside what it
  saw; check against your own data with `medsr evaluate` before trusting it.
- Not a diagnostic device. Super-resolution adds no information the scanner did not measure; the scores above
  measure agreement with one high-resolution reference.

Reproduce: `medsr train configs/edsr_mr_x2.yaml --out runs/edsr_mr_x2` then
`medsr evaluate --model runs/edsr_mr_x2/best --card`.
"""


def degradation_figure(path: Path, hr, lr, *, title: str = "") -> None:
    """HR | LR | (LR interpolated to the HR grid) - HR, for one plane, in mm at true aspect, radiological
    orientation (anterior/superior up, patient right on the left); written atomically.

    The plane is (i, j) through the middle slice, or (i, k) through the middle of j when the k axis lost
    resolution (thick slices), so the loss is visible. ``hr`` and ``lr`` are Volumes covering the same field
    of view (``lr`` from ``degrade``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
