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


def detail_box(hr: torch.Tensor, size: int) -> tuple[int, int]:
    """Corner (i, j) of the ``size`` x ``size`` square of an (I, J) image with the most edge energy."""
    image = hr.double()
    gradient = (image.diff(dim=0)[:, :-1] ** 2 + image.diff(dim=1)[:-1, :] ** 2)[None, None]
    energy = torch.nn.functional.avg_pool2d(gradient, size, stride=max(1, size // 4))[0, 0]
    i, j = np.unravel_index(int(energy.argmax()), tuple(energy.shape))
    return int(i) * max(1, size // 4), int(j) * max(1, size // 4)


def comparison_figure(path: Path, panels: Mapping[str, torch.Tensor], *, title: str = "") -> None:
    """Side-by-side panels of one slice, each with a zoomed inset of the same detail; written atomically.

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
    figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (name, image) in zip(axes[0], panels.items(), strict=True):
        extent = (0, full_i, 0, full_j)  # every panel spans the same field of view, whatever its voxel count
        shown = dict(cmap="gray", vmin=low, vmax=high, origin="lower", interpolation="nearest", extent=extent)
        ax.imshow(image.numpy().T, **shown)
        ax.add_patch(Rectangle((box_i, box_j), size, size, fill=False, edgecolor="yellow", linewidth=1))
        inset = ax.inset_axes((0.58, 0.58, 0.4, 0.4))
        inset.imshow(image.numpy().T, **shown)
        inset.set_xlim(box_i, box_i + size)
        inset.set_ylim(box_j, box_j + size)
        inset.set_xticks([])
        inset.set_yticks([])
        for spine in inset.spines.values():
            spine.set_edgecolor("yellow")
        ax.set_title(f"{name} ({image.shape[0]}x{image.shape[1]})", fontsize=9)
        ax.axis("off")
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    tmp = path.with_name(f".tmp.{path.name}")
    figure.savefig(tmp, dpi=120, format="png")
    plt.close(figure)
    os.replace(tmp, path)
