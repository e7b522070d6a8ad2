"""The inputs a model was trained on (LR spacing and intensity range), and the checks of a scan against them.

A model only knows the scans it saw. ``fit`` records, for its training scans' simulated LR versions, the voxel
spacing along the axes the model upsamples and the intensity range (0.5th and 99.9th percentiles, in physical
units); ``medsr upscale`` warns when a scan lies outside. Intensities are compared as the units allow: CT (HU) and
ultrasound B-mode (0..255) are absolute, so the percentiles themselves are compared; MR units are arbitrary (each
scan is normalised by its own percentiles), so only the window's offset, its lower end over its width, is: a
magnitude image starts near 0, a CT read as MR or a phase image does not. Radiographs are not checked: their
detector units are arbitrary and start anywhere (the chest and tibia training images differ by 0.08 in offset, a
held-out region of the chest by 0.18), so no rule would separate good inputs from bad ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medsr.intensity import CT_WINDOW_HU

SPACING_TOLERANCE = 1.5  # a scan's spacing may be this factor finer or coarser than the training scans'
INTENSITY_TOLERANCE = 0.1  # fraction of the training window's width a scan's percentiles may lie outside
ABSOLUTE_UNITS = ("CT", "US")  # the same tissue has the same value in every scan (HU, B-mode grey level)
PROJECTION = ("CR", "DX")  # radiographs: pixel size at the detector depends on magnification; often missing


AIR_HU = (-1200.0, -500.0)  # where a CT scan's 0.5th percentile lies: air (-1000 HU) ...
PADDING_HU = (-3100.0, -1900.0)  # ... or the padding outside the reconstruction circle (-2000, -3024)


def guess_modality(intensities: tuple[float, float]) -> tuple[str | None, str]:
    """(modality, reason) for a scan whose file names none (NIfTI, PNG/TIFF), from its 0.5th and 99.9th intensity
    percentiles: 'CT' when the low one is air or CT padding in HU and the high one is tissue or bone (< 5000 HU);
    'MR' when no intensity is clearly negative (a magnitude image, the usual content of a NIfTI file); None when
    neither holds (negative values that are not air in HU: a phase map, a z-scored or subtracted image).

    >>> guess_modality((-1024.0, 1650.0))[0], guess_modality((0.0, 812.0))[0], guess_modality((-3.1, 2.9))[0]
    ('CT', 'MR', None)
    """
    low, high = intensities
    hu_low = AIR_HU[0] <= low <= AIR_HU[1] or PADDING_HU[0] <= low <= PADDING_HU[1]
    if hu_low and 0 < high < 5000:
        return "CT", f"0.5th percentile {low:.4g} is air in HU, 99.9th {high:.4g}"
    if low >= -0.01 * abs(high):
        return "MR", f"no negative intensities ({low:.4g}..{high:.4g}): a magnitude image"
    return None, f"intensities {low:.4g}..{high:.4g} are neither CT in HU nor a magnitude image"


def training_inputs(spacings: Sequence[Sequence[float]], ranges: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """The record ``fit`` saves in ``model.json`` under ``inputs``, from the training scans' LR versions: the
    per-axis spacing range (mm, i, j, k), each scan's percentiles (``intensity.intensity_range``, ``scans``) and the
    ranges of the lower and upper one over the scans (``low``, ``high``)."""
    spacings, ranges = np.array(spacings, dtype=np.float64), np.array(ranges, dtype=np.float64)
    return {
        "spacing_mm": {"min": spacings.min(0).tolist(), "max": spacings.max(0).tolist()},
        "low": [float(ranges[:, 0].min()), float(ranges[:, 0].max())],
        "high": [float(ranges[:, 1].min()), float(ranges[:, 1].max())],
        "scans": ranges.tolist(),
    }


def input_warnings(
    inputs: dict[str, Any],
    *,
    modality: str,
    spacing: Sequence[float] | None,
    scale: Sequence[int],
    intensities: tuple[float, float],
) -> list[str]:
    """Ways a scan lies outside what a model was trained on; empty when it lies inside.

    Args:
        inputs: The model's ``inputs`` record (:func:`training_inputs`).
        modality: The model's modality.
        spacing: The scan's voxel spacing in mm (i, j, k); None when the file gives none (PNG/TIFF): not checked.
        scale: The model's scale per axis (i, j, k); the spacing is checked along the axes it upsamples (radiographs
            excepted: their pixel size is not a property of the anatomy).
        intensities: The scan's (0.5th, 99.9th) percentiles in physical units (``intensity.intensity_range``).

    Absolute units (CT, US): the scan's percentiles must not reach beyond the training scans' (by more than
    ``INTENSITY_TOLERANCE`` of the narrowest training window); a narrower range (a CT slice with little bone) lies
    inside. MR: the scan's window offset must lie within the training scans' offsets, give or take
    ``INTENSITY_TOLERANCE``. Radiographs: none.
    """
    warnings = []
    if spacing is not None and modality not in PROJECTION:
        lowest, highest = inputs["spacing_mm"]["min"], inputs["spacing_mm"]["max"]
        for axis, (s, a, b, factor) in enumerate(zip(spacing, lowest, highest, scale, strict=True)):
            if factor > 1 and not a / SPACING_TOLERANCE <= s <= b * SPACING_TOLERANCE:
                trained = f"{a:.3g} mm" if a == b else f"{a:.3g}..{b:.3g} mm"
                warnings.append(f"spacing along {'ijk'[axis]} is {s:.3g} mm; the model was trained on {trained}")
    scans = np.array(inputs["scans"], dtype=np.float64)  # (scans, 2): each training scan's (low, high)
    low, high = intensities
    if modality == "CT":  # below air is padding, which the model sees as air (``intensity.Window.floor``)
        low, high = max(low, CT_WINDOW_HU[0]), max(high, CT_WINDOW_HU[0])
    if modality in ABSOLUTE_UNITS:
        margin = INTENSITY_TOLERANCE * float((scans[:, 1] - scans[:, 0]).min())
        if low < scans[:, 0].min() - margin or high > scans[:, 1].max() + margin:
            warnings.append(
                f"intensities span {low:.4g}..{high:.4g} (0.5th..99.9th percentile), beyond the training scans' "
                f"{scans[:, 0].min():.4g}..{scans[:, 1].max():.4g}"
            )
    elif modality == "MR":
        offsets = scans[:, 0] / (scans[:, 1] - scans[:, 0])
        offset = low / (high - low) if high > low else float("inf")
        if not offsets.min() - INTENSITY_TOLERANCE <= offset <= offsets.max() + INTENSITY_TOLERANCE:
            trained = f"{offsets.min():+.2f}" + (f"..{offsets.max():+.2f}" if offsets.max() > offsets.min() else "")
            warnings.append(
                f"the intensity window starts at {offset:+.2f} of its width from 0 ({low:.4g}..{high:.4g}); the "
                f"model's training scans at {trained} (not a magnitude image, an offset, or another modality?)"
            )
    return warnings
